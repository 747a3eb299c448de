"""One training step of the embedded model's image tokenizer in fp32 and under bf16 autocast, side by side.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_vq_training.py [--repeats 8] [--batch-size 16]

The tokenizer is the embedded model's (`transformers_f2ace/pretrained/unif2ace-synthface`, `model.vq`: 64 px faces,
4x downsampling, 10-bit LFQ), trained as the recipe's stage vq trains it: forward with the losses, backward, gradient
clipping, AdamW (`transformers_f2ace.training.vq.train_vq(autocast_dtype=...)`), on SynthFace training faces. The
arms alternate within every repeat; the table gives median wall times. CPU bf16 autocast pays off where the CPU has
native bf16 arithmetic (AVX-512 BF16 / AMX); elsewhere it may be slower (`transformers_f2ace.recipe.cpu_bf16_supported`
says whether oneDNN has bf16 kernels at all, the recipe's default for `--vq-bf16`).
"""

import argparse
import time

import torch

from transformers_f2ace.demo import EMBEDDED_MODEL_DIR
from transformers_f2ace.modeling_unif2ace import UniF2aceForConditionalGeneration
from transformers_f2ace.recipe import cpu_bf16_supported, synthface_examples
from transformers_f2ace.training.vq import train_vq

from timing import interleaved_medians, ratio_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    vq = UniF2aceForConditionalGeneration.from_pretrained(EMBEDDED_MODEL_DIR).model.vq
    faces = synthface_examples(args.batch_size, vq.config.resolution, seed=0)
    images = [face["image"] for face in faces]

    def step(dtype: torch.dtype | None) -> float:
        start = time.perf_counter()  # lr tiny: every repeat does the same work on nearly the same weights
        train_vq(vq, images, steps=2, lr=1e-9, batch_size=args.batch_size, seed=0, progress=False,
                 autocast_dtype=dtype)
        return (time.perf_counter() - start) / 2

    medians = interleaved_medians({"fp32": lambda: step(None), "bf16 autocast": lambda: step(torch.bfloat16)},
                                  args.repeats)
    print(f"tokenizer training step, batch {args.batch_size} x 64 px, {torch.get_num_threads()} threads, "
          f"oneDNN bf16 kernels: {cpu_bf16_supported()}; median of {args.repeats}")
    print(ratio_table(medians, baseline="fp32"))


if __name__ == "__main__":
    main()
