"""Grouped token-level MoE dispatch against its baselines, measured side by side in one run.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_moe.py [--quick] [--threads 1] [--clock cpu|wall]

Every method runs the real `UniF2aceSparseMoeBlock` (grouped top-k router, E routed experts per task group top-k,
one shared expert per group), switching only `config._experts_implementation`:

- `naive loop`: `"eager"`, the class's own reference forward, Show-o style: a Python loop over the experts that got
  tokens, indexing their tokens (`index_add_` back);
- `tf grouped_mm`: transformers' own `grouped_mm` experts path (also used for the shared experts);
- `tf batched_mm` (decode rows only): transformers' `batched_mm`, which gathers each assignment's expert weights and
  runs `bmm`, i.e. the "gather the chosen weights" decode strategy;
- `ours`: `"unif2ace_fused"` (`transformers_f2ace.moe_dispatch`).

`dense proxy` is the physical-limit reference: ONE dense Phi MLP (fc1 -> tanh-GELU -> fc2) with the same active FLOPs,
width k·I + S (k routed experts of width I plus the shared expert of width S). Ratios are against it.

Rows: training shapes (2048 tokens, hidden 512/1024, expert width 512/1024, shared width 2x, 8 experts per group top-4,
fp32 and bf16, forward and forward+backward with the loss `(out * g).sum()`, g random); decode shapes (1 and 16 tokens,
forward only, through a stack of 4 independent layers, as a decoding model streams each layer's weights from memory
while its code stays hot; times are per stack); a
mixed MMU+T2I batch (sequences alternating, the worst order) against a single-group batch of the same size.

Allocator: with glibc's default malloc, blocks of 32 MB and more are mmapped and returned to the OS on free, so every
step page-faults them in again. The dispatch paths hold (N·k, H) buffers, four times the token count, and pay for that
at the largest shapes; running with `MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736` (or
jemalloc/tcmalloc) removes the page faults for every method alike. The header says which allocator settings were on.

Timing: median over interleaved repeats (the methods alternate within each repeat, so drift of the shared machine hits
all alike). `--clock cpu` (default) reads the process CPU time, which a descheduled process does not accrue: on a CPU
shared with other jobs it is the stable measure of the work done; `--clock wall` reads wall time.
"""

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from transformers_f2ace import UniF2aceConfig
from transformers_f2ace.modeling_unif2ace import UniF2aceSparseMoeBlock
from transformers_f2ace.moe_dispatch import FUSED_EXPERTS_IMPLEMENTATION

TRAINING_METHODS = {"naive loop": "eager", "tf grouped_mm": "grouped_mm", "ours": FUSED_EXPERTS_IMPLEMENTATION}
DECODE_METHODS = {**TRAINING_METHODS, "tf batched_mm": "batched_mm"}
TARGETS = {"fwd+bwd": 1.10, "decode 1": 2.0, "decode 16": 2.0, "mixed/single": 1.05}
DECODE_LAYERS = 4  # a stack of layers whose weights (>= 40 MB per layer) overflow the 32 MB last-level cache


@dataclass
class Shape:
    tokens: int
    hidden: int
    width: int  # routed expert width I; the shared expert is 2I wide
    experts: int = 8
    top_k: int = 4

    @property
    def shared(self) -> int:
        return 2 * self.width


def build_block(shape: Shape, dtype: torch.dtype) -> UniF2aceSparseMoeBlock:
    config = UniF2aceConfig.tiny(
        text_config={"hidden_size": shape.hidden, "intermediate_size": shape.hidden},
        moe_config={"num_experts": shape.experts, "num_experts_per_tok": shape.top_k,
                    "expert_intermediate_size": shape.width, "shared_expert_intermediate_size": shape.shared},
    )
    block = UniF2aceSparseMoeBlock(config)
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            parameter.normal_(0.0, 0.02) if "bias" not in name else parameter.uniform_(-0.02, 0.02)
    return block.to(dtype)


def build_proxy(shape: Shape, dtype: torch.dtype) -> nn.Module:
    width = shape.top_k * shape.width + shape.shared
    torch.manual_seed(1)
    fc1, fc2 = nn.Linear(shape.hidden, width), nn.Linear(width, shape.hidden)
    return nn.Sequential(fc1, nn.GELU(approximate="tanh"), fc2).to(dtype)


class Case:
    """One shape/dtype: `layers` independent MoE blocks and as many dense proxies, an input batch (B, T, H) with task
    ids, a loss weight g. Each call runs every layer on the same input (decode: a stack of layers larger than the
    last-level cache, so each layer's weights come from memory as in a real decoder, while code stays hot)."""

    def __init__(self, shape: Shape, dtype: torch.dtype, task_ids: list[int], layers: int = 1, seed: int = 0):
        torch.manual_seed(seed)
        self.blocks = [build_block(shape, dtype) for _ in range(layers)]
        self.proxies = [build_proxy(shape, dtype) for _ in range(layers)]
        batch = len(task_ids)
        self.task_ids = torch.tensor(task_ids)
        self.inputs = torch.randn(batch, shape.tokens // batch, shape.hidden, dtype=dtype)
        self.loss_weight = torch.randn_like(self.inputs)

    def run(self, implementation: str | None, backward: bool) -> None:
        """implementation None: the dense proxy."""
        for block in self.blocks:  # the experts read the choice from their config at call time
            block.experts.config._experts_implementation = implementation or "eager"
        modules = self.proxies if implementation is None else self.blocks
        if not backward:
            with torch.no_grad():
                for module in modules:
                    self._forward(module, implementation, self.inputs)
            return
        for module in modules:
            inputs = self.inputs.detach().requires_grad_(True)
            (self._forward(module, implementation, inputs) * self.loss_weight).sum().backward()
            for parameter in module.parameters():
                parameter.grad = None

    def _forward(self, module: nn.Module, implementation: str | None, inputs: torch.Tensor) -> torch.Tensor:
        return module(inputs) if implementation is None else module(inputs, self.task_ids)


def medians(calls: dict[str, Callable[[], None]], repeats: int, clock: Callable[[], float]) -> dict:
    for call in calls.values():  # warm-up
        call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = clock()
            call()
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def methods_for(case: Case, implementations: dict[str, str], backward: bool) -> dict[str, Callable[[], None]]:
    calls = {"dense proxy": lambda: case.run(None, backward)}
    for name, implementation in implementations.items():
        calls[name] = lambda implementation=implementation: case.run(implementation, backward)
    return calls


def format_row(label: str, times: dict[str, float], columns: list[str]) -> str:
    base = times["dense proxy"]
    cells = [f"{times[c] * 1e3:.2f} ({times[c] / base:.2f}x)" if c in times else "" for c in columns]
    return f"| {label} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats, a few seconds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="training-shape repeats (decode: 10x)")
    parser.add_argument("--sections", default="training,decode,mixed", help="comma-separated subset to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.quick:
        training = [Shape(256, 128, 128)]
        decode = [Shape(1, 128, 128), Shape(16, 128, 128)]
        repeats = args.repeats or 3
    else:
        training = [Shape(2048, h, w) for h in (512, 1024) for w in (512, 1024)]
        decode = [Shape(n, h, h) for h in (512, 1024) for n in (1, 16)]
        repeats = args.repeats or 5
    dtypes = (torch.float32, torch.bfloat16)

    columns = ["dense proxy", *DECODE_METHODS]
    print(
        f"Grouped token MoE: 2 task groups x 8 experts top-4 + shared (2I), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {args.clock} time, medians of interleaved repeats; "
        "each cell: ms (x dense proxy); malloc: "
        + (", ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")) or "glibc defaults")
        + "\n"
    )
    print("| case | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    checks = []
    sections = set(args.sections.split(","))
    training = training if "training" in sections else []
    decode = decode if "decode" in sections else []
    for shape in training:
        for dtype in dtypes:
            case = Case(shape, dtype, task_ids=[0, 0, 0, 0])
            for backward in (False, True):
                times = medians(methods_for(case, TRAINING_METHODS, backward), repeats, clock)
                kind = "fwd+bwd" if backward else "fwd"
                label = f"N={shape.tokens} H={shape.hidden} I={shape.width} {str(dtype)[6:]} {kind}"
                print(format_row(label, times, columns), flush=True)
                if backward:
                    checks.append((label, "ours", times["ours"] / times["dense proxy"], TARGETS["fwd+bwd"]))
    for shape in decode:
        for dtype in dtypes:
            case = Case(shape, dtype, task_ids=[0], layers=DECODE_LAYERS)
            times = medians(methods_for(case, DECODE_METHODS, False), 10 * repeats, clock)
            label = f"decode N={shape.tokens} H={shape.hidden} I={shape.width} {str(dtype)[6:]} fwd"
            print(format_row(label, times, columns), flush=True)
            checks.append((label, "ours", times["ours"] / times["dense proxy"], TARGETS[f"decode {min(shape.tokens, 16)}"]))

    mixed_shape = Shape(256, 128, 128) if args.quick else Shape(2048, 512, 512)
    print("\n| mixed vs single group, fwd+bwd | single (ms) | mixed (ms) | mixed / single |")
    print("|---|---|---|---|")
    for dtype in dtypes if "mixed" in sections else ():
        single = Case(mixed_shape, dtype, task_ids=[0, 0, 0, 0])
        mixed = Case(mixed_shape, dtype, task_ids=[0, 1, 0, 1])
        for name, implementation in (("ours", FUSED_EXPERTS_IMPLEMENTATION), ("tf grouped_mm", "grouped_mm")):
            calls = {label: lambda case=case, implementation=implementation: case.run(implementation, True)
                     for label, case in (("single", single), ("mixed", mixed))}
            times = medians(calls, repeats, clock)
            ratio = times["mixed"] / times["single"]
            label = f"{name} N={mixed_shape.tokens} H={mixed_shape.hidden} I={mixed_shape.width} {str(dtype)[6:]}"
            print(f"| {label} | {times['single'] * 1e3:.1f} | {times['mixed'] * 1e3:.1f} | {ratio:.3f} |", flush=True)
            if name == "ours":
                checks.append((label, "mixed/single", ratio, TARGETS["mixed/single"]))

    if args.quick:
        print("\n(--quick: tiny shapes where per-op overhead dominates; the targets refer to the default shapes)")
    print("\n| check | value | target | |\n|---|---|---|---|")
    for label, what, value, target in checks:
        print(f"| {label}: {what} | {value:.2f} | <= {target:.2f} | {'ok' if value <= target else 'MISSED'} |")


if __name__ == "__main__":
    main()
