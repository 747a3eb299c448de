"""D3Diff loss cost against plain masked cross-entropy, LM head included (forward + backward).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_d3diff.py [--quick]

Default shapes: 8 images x 256 tokens with half of them masked (M = 1024 rows), hidden 1024, 8192 image codes; the
head `Linear(hidden, codes)` runs on the masked rows only. Methods:

- `masked CE`: `F.cross_entropy(F.linear(h, W, b), y)`, the baseline;
- `D3Diff bayes`: `D3DiffLoss()(F.linear(h, W, b), y, r)` (materialised logits, one shared log-softmax);
- `D3Diff chunked`: `D3DiffLoss().forward_from_hidden(h, W, b, y, r)` (256-row chunks, no (M, K) logits).

Time: median wall time of forward + backward over interleaved repeats (methods alternate, so drift of the shared
CPU hits all of them alike). Peak memory: every CPU allocation and free is reported by c10 to the profiler when
`profile_memory=True`; the peak is the maximum running sum of those byte deltas during one forward + backward (inputs
and parameters exist before and are not counted; gradients created during backward are). This counts exactly the
tensors torch allocates, independent of the libc allocator's caching, which `resource`/RSS would not.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from transformers_f2ace.loss_d3diff import D3DiffLoss, mask_image_tokens


def make_inputs(images: int, tokens: int, hidden_size: int, codes: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    masking = mask_image_tokens(
        torch.randint(0, codes, (images, tokens), generator=gen), codes, gen, t=torch.full((images,), 2 / 3)
    )  # cos(pi/3) = 1/2: half of each image masked
    ratio = masking.mask_ratio[:, None].expand(images, tokens)[masking.mask]
    rows = ratio.numel()
    hidden = torch.randn(rows, hidden_size, generator=gen).requires_grad_(True)
    weight = (torch.randn(codes, hidden_size, generator=gen) * hidden_size**-0.5).requires_grad_(True)
    bias = torch.zeros(codes).requires_grad_(True)
    targets = torch.randint(0, codes, (rows,), generator=gen)
    return hidden, weight, bias, targets, ratio


def build_methods(loss_fn: D3DiffLoss, chunk_size: int):
    return {
        "masked CE": lambda h, w, b, y, r: F.cross_entropy(F.linear(h, w, b), y),
        "D3Diff bayes": lambda h, w, b, y, r: loss_fn(F.linear(h, w, b), y, r).loss,
        "D3Diff chunked": lambda h, w, b, y, r: loss_fn.forward_from_hidden(h, w, b, y, r, chunk_size).loss,
    }


def run_once(method, inputs) -> None:
    for tensor in inputs[:3]:
        tensor.grad = None
    method(*inputs).backward()


def peak_bytes(method, inputs) -> int:
    run_once(method, inputs)  # warm up, then drop the grads so they are allocated inside the profiled region
    for tensor in inputs[:3]:
        tensor.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        method(*inputs).backward()
    deltas = sorted(
        (event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events() if event.name() == "[memory]"
    )
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, a few seconds")
    parser.add_argument("--repeats", type=int, default=None)
    # One thread by default: on a CPU shared with other jobs, OpenMP barriers waiting for a descheduled worker thread
    # inflate small kernels ~100x and make the timings noise.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        images, tokens, hidden_size, codes, chunk_size, repeats = 4, 64, 128, 1024, 32, args.repeats or 5
    else:
        images, tokens, hidden_size, codes, chunk_size, repeats = 8, 256, 1024, 8192, 256, args.repeats or 7
    inputs = make_inputs(images, tokens, hidden_size, codes)
    methods = build_methods(D3DiffLoss(alpha=0.01, score_form="bayes"), chunk_size)

    times = {name: [] for name in methods}
    for method in methods.values():
        run_once(method, inputs)  # warm-up
    for _ in range(repeats):
        for name, method in methods.items():
            start = time.perf_counter()
            run_once(method, inputs)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    peaks = {name: peak_bytes(method, inputs) for name, method in methods.items()}

    rows = inputs[0].shape[0]
    print(
        f"D3Diff vs masked CE, fwd+bwd incl. LM head: {images} images x {tokens} tokens, {rows} masked rows, "
        f"hidden {hidden_size}, {codes} codes, chunk {chunk_size}, median of {repeats}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'method':<16} {'time ms':>9} {'x CE':>6} {'peak MiB':>9} {'x CE':>6}")
    base = "masked CE"
    for name in methods:
        print(
            f"{name:<16} {medians[name] * 1e3:>9.1f} {medians[name] / medians[base]:>6.2f} "
            f"{peaks[name] / 2**20:>9.1f} {peaks[name] / peaks[base]:>6.2f}"
        )
    checks = [
        ("D3Diff/CE time", medians["D3Diff bayes"] / medians[base], 1.10),
        ("D3Diff/CE peak memory", peaks["D3Diff bayes"] / peaks[base], 1.05),
        ("chunked/materialised peak memory", peaks["D3Diff chunked"] / peaks["D3Diff bayes"], 0.50),
    ]
    if args.quick:
        print("(--quick: tiny shapes where per-op overhead dominates; the targets refer to the default shapes)")
    for label, value, target in checks:
        print(f"{label:<34} {value:5.2f}  (target <= {target:.2f}: {'ok' if value <= target else 'MISSED'})")


if __name__ == "__main__":
    main()
