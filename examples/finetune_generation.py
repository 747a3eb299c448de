#!/usr/bin/env python
"""D3Diff finetuning of UniF²ace's face generation on caption records (`{"image", "caption"}`): the images are
tokenized by the frozen VQ tokenizer, a cosine-scheduled share of each image's tokens is masked, and the model
learns to predict them with `L_mask + α · L_score` (SPEC §4; `mask_loss` and `score_loss` are logged separately).
`UniF2aceTrainer` + `UniF2aceDataCollator` do the work; prompts are dropped with `condition_dropout_prob` for
classifier-free guidance. At the end, faces are drawn for a few captions into `<output_dir>/samples.png`.

    python examples/finetune_generation.py --tiny --max_steps 2 --output_dir runs/generation        # seconds, CPU
    python examples/finetune_generation.py --model path/to/unif2ace --lora --lora_parts attention,experts ...
    accelerate launch --config_file examples/accelerate_configs/ddp.yaml examples/finetune_generation.py --tiny ...

Arguments as in `train_unified.py` (`--model`, `--tiny`, `--lora`, every `TrainingArguments` option), plus the
sampling ones below.
"""

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from train_unified import ModelArguments, build_trainer, parse_args, run, save_result, toy_face_records
from transformers_f2ace.demo import image_grid


@dataclass
class GenerationArguments(ModelArguments):
    """`ModelArguments` plus the samples drawn after training."""

    num_samples: int = field(default=4, metadata={"help": "Faces drawn from training captions after training "
                                                            "(0: none)."})
    num_inference_steps: int = field(default=8, metadata={"help": "MaskGIT steps for the samples."})
    guidance_scale: float | None = field(default=None, metadata={"help": "CFG scale of the samples (default: the "
                                                                           "model config's)."})


def draw_samples(model, processor, captions: list[str], steps: int, guidance_scale: float | None, seed: int,
                 path: Path) -> None:
    """Generate one face per caption and save them as a PNG row."""
    model.eval()
    inputs = processor(text=captions, mode="t2i", return_tensors="pt").to(model.device)
    images = model.generate_images(**inputs, num_inference_steps=steps, guidance_scale=guidance_scale,
                                   generator=torch.Generator(model.device).manual_seed(seed), progress=False)
    image_grid([images]).save(path)


def main(argv: Sequence[str] | None = None):
    script_args, training_args = parse_args(argv, __doc__.split("\n\n")[0], script_class=GenerationArguments,
                                            output_dir="runs/generation")
    records = toy_face_records(script_args.num_examples, t2i_fraction=1.0, seed=training_args.seed)
    eval_records = toy_face_records(script_args.num_eval_examples, t2i_fraction=1.0, seed=training_args.seed + 1)
    trainer, processor = build_trainer(script_args, training_args, records, eval_records or None)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if script_args.num_samples > 0 and trainer.is_world_process_zero():
        captions = [record["caption"] for record in records if "caption" in record][: script_args.num_samples]
        draw_samples(trainer.model, processor, captions, script_args.num_inference_steps, script_args.guidance_scale,
                     training_args.seed, Path(training_args.output_dir) / "samples.png")
    save_result(trainer, processor, script_args)
    return trainer


if __name__ == "__main__":
    run(main, sys.argv[1:])
