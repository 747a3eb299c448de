"""One training step of the embedded model's recipe with and without full logits (`skip_logits`).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_training_step.py [--repeats 5] [--bf16]

The step is the recipe's: one micro-batch of 8 captions (T2I, D3Diff) and one of 8 conversations of 10 questions
(MMU, text loss) of SynthFace training faces, each grouped by length as the trainer groups them, forward + backward
with the balance loss, then AdamW, on the embedded model (`transformers_f2ace/pretrained/unif2ace-synthface`, its
tokenizer and encoders frozen as in training). `full logits` builds the (B, T, V) logits of every position, as a
plain forward does; `skip_logits` runs the LM head at the labelled positions only (the losses are the same: the
script checks). `--bf16` adds a third arm under CPU bf16 autocast. Time: median wall time over interleaved repeats.
"""

import argparse
import time

import torch

from transformers_f2ace.demo import EMBEDDED_MODEL_DIR
from transformers_f2ace.modeling_unif2ace import UniF2aceForConditionalGeneration
from transformers_f2ace.processing_unif2ace import UniF2aceProcessor
from transformers_f2ace.recipe import mixed_records, synthface_examples
from transformers_f2ace.training import UniF2aceDataCollator

from timing import interleaved_medians, ratio_table


def recipe_batches(model, processor, size: int = 8) -> list[dict]:
    """A caption micro-batch and a conversation micro-batch of `size` records each, both of median length."""
    examples = synthface_examples(20 * size, model.config.vq_config.resolution, seed=0)
    records = mixed_records(examples, t2i_fraction=0.5, describe_fraction=0.1, questions_per_record=10, seed=0)
    collator = UniF2aceDataCollator.from_config(processor, model.config, seed=0)
    lengths = collator.record_lengths(records)
    batches = []
    for kind in ("caption", "messages"):
        ranked = sorted((i for i, record in enumerate(records) if kind in record), key=lengths.__getitem__)
        middle = len(ranked) // 2 - size // 2
        batches.append(collator([records[i] for i in ranked[middle : middle + size]]))
    return batches


def step(model, optimizer, batches, skip_logits: bool, bf16: bool = False) -> float:
    """Seconds of forward + backward of every micro-batch, then one optimizer step."""
    start = time.perf_counter()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(**batch, output_router_logits=True, skip_logits=skip_logits).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="also time skip_logits under CPU bf16 autocast")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = UniF2aceForConditionalGeneration.from_pretrained(EMBEDDED_MODEL_DIR).train()
    processor = UniF2aceProcessor.from_pretrained(EMBEDDED_MODEL_DIR)
    batches = recipe_batches(model, processor)
    losses = []
    with torch.no_grad():
        for skip in (False, True):
            torch.manual_seed(0)  # the same draws (e.g. the noise expert's) for both
            losses.append(sum(model(**b, skip_logits=skip).loss.item() for b in batches))
    assert abs(losses[0] - losses[1]) < 1e-4 * abs(losses[0]), f"the losses differ: {losses}"
    # lr 0: the weights, and so the work of every repeat, stay the same
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    arms = {"full logits": (False, False), "skip_logits": (True, False)}
    if args.bf16:
        arms["skip_logits + bf16 autocast"] = (True, True)
    calls = {name: lambda skip=skip, bf16=bf16: step(model, optimizer, batches, skip, bf16)
             for name, (skip, bf16) in arms.items()}
    medians = interleaved_medians(calls, args.repeats)
    shapes = ", ".join(f"{tuple(b['input_ids'].shape)}" for b in batches)
    print(f"micro-batches (records, positions): {shapes}; {torch.get_num_threads()} threads; "
          f"median of {args.repeats}")
    print(ratio_table(medians, baseline="full logits"))


if __name__ == "__main__":
    main()
