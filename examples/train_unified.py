#!/usr/bin/env python
"""Unified training of UniF²ace, as in the paper: every step mixes understanding (MMU: face + question -> answer,
next-token cross-entropy) and generation (T2I: caption -> face, D3Diff) records, and the loss is
`L_mmu + L_d3diff + λ · L_balance` (SPEC §4), computed by the model and logged term by term by `UniF2aceTrainer`
(`text_loss`, `mask_loss`, `score_loss`, `aux_loss`).

    python examples/train_unified.py --tiny --max_steps 2 --output_dir runs/unified           # seconds, on a CPU
    python examples/train_unified.py --model path/to/unif2ace --lora --max_steps 1000 --output_dir runs/unified
    accelerate launch --config_file examples/accelerate_configs/ddp.yaml examples/train_unified.py --tiny ...
    torchrun --nproc_per_node 2 examples/train_unified.py --tiny ...

Without `--model`, a small untrained checkpoint is built under `<output_dir>/base` (`--tiny`: a ~1M-parameter one)
and the data is a toy set of drawn faces (hair colour, background, glasses) with captions and questions. Every
`transformers.TrainingArguments` option is accepted (`--help` lists them). The result (`<output_dir>`) is a full
checkpoint with its processor, or with `--lora` a PEFT adapter whose `base_model_name_or_path` is the base folder
(`--merge_lora` also writes the merged checkpoint to `<output_dir>/merged`); both load with
`AutoModelForImageTextToText.from_pretrained`.

This file also holds the pieces the other examples share (toy data, base checkpoint, LoRA, resumable mask seeds).
"""

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    HfArgumentParser,
    TrainingArguments,
)

from transformers_f2ace import (  # importing the package registers the Auto classes
    UniF2aceConfig,
    UniF2aceForConditionalGeneration,
    UniF2aceImageProcessor,
    UniF2aceProcessor,
)
from transformers_f2ace.demo import build_untrained_checkpoint
from transformers_f2ace.peft_utils import DEFAULT_LORA_PARTS, LORA_PARTS, default_lora_config
from transformers_f2ace.tokenization_unif2ace import train_unif2ace_tokenizer
from transformers_f2ace.training import StepSeededCollator, UniF2aceDataCollator, UniF2aceTrainer


# ---------------------------------------------------------------------------------------------- script arguments
@dataclass
class ModelArguments:
    """What every example takes: the model, the toy data size, the balance loss and LoRA."""

    model: str | None = field(default=None, metadata={
        "help": "Local folder with a UniF²ace checkpoint and its processor. Default: build an untrained one under "
                "<output_dir>/base (UniF2aceConfig.small(), or .tiny() with --tiny)."})
    tiny: bool = field(default=False, metadata={"help": "Build the ~1M-parameter UniF2aceConfig.tiny() model."})
    num_examples: int = field(default=64, metadata={"help": "Size of the toy face dataset."})
    num_eval_examples: int = field(default=0, metadata={
        "help": "Held-out toy examples (another seed) for evaluation (with --eval_strategy steps|epoch)."})
    balance_loss: bool = field(default=True, metadata={
        "help": "Add the MoE load-balancing loss (router_aux_loss_coef · aux_loss) to the training loss."})
    lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of the full model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale alpha / r)."})
    lora_parts: str = field(default=",".join(DEFAULT_LORA_PARTS), metadata={
        "help": f"Comma-separated decoder parts that get LoRA, among {', '.join(LORA_PARTS)}."})
    merge_lora: bool = field(default=False, metadata={"help": "Also save the merged model to <output_dir>/merged."})


@dataclass
class UnifiedArguments(ModelArguments):
    t2i_fraction: float = field(default=0.5, metadata={"help": "Share of generation (caption) records; the rest "
                                                                  "are understanding (question/answer) records."})

    def __post_init__(self):
        if not 0.0 <= self.t2i_fraction <= 1.0:
            raise ValueError(f"--t2i_fraction must be in [0, 1], got {self.t2i_fraction}")


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


# Defaults that differ from TrainingArguments' (all remain overridable on the command line)
TRAINING_DEFAULTS = dict(
    max_steps=20, per_device_train_batch_size=4, learning_rate=5e-4, warmup_steps=0, logging_steps=1,
    save_strategy="no", report_to="none", ddp_find_unused_parameters=True, disable_tqdm=True,
    # CPU-only machines: `use_cpu` also makes torchrun / accelerate launch run DDP over gloo (without it each process
    # would train alone)
    use_cpu=not _has_accelerator(), dataloader_pin_memory=_has_accelerator(),
)


def parse_args(argv: Sequence[str] | None, description: str, script_class, training_class=TrainingArguments,
               output_dir: str = "runs/unif2ace", **defaults):
    """(script arguments, training arguments) from `argv` (default: the command line)."""
    parser = HfArgumentParser((script_class, training_class), description=description)
    parser.set_defaults(output_dir=output_dir, **{**TRAINING_DEFAULTS, **defaults})
    return parser.parse_args_into_dataclasses(args=argv)


# --------------------------------------------------------------------------------------------------- toy face data
HAIR = {"red": (190, 40, 30), "black": (25, 25, 25), "blond": (235, 200, 90), "brown": (110, 70, 40)}
BACKGROUND = {"blue": (60, 90, 200), "green": (60, 160, 80), "grey": (150, 150, 150)}
SKIN = (235, 200, 170)
QUESTIONS = {
    "hair": "what colour is the hair?",
    "background": "what colour is the background?",
    "glasses": "does the person wear glasses?",
}


def draw_face(hair: str, background: str, glasses: bool, size: int = 64) -> Image.Image:
    """A flat-coloured face: background, hair cap, skin oval, eyes, mouth, optional glasses (drawn large, so that a
    small VQ tokenizer keeps them)."""
    image = Image.new("RGB", (size, size), BACKGROUND[background])
    draw = ImageDraw.Draw(image)
    s = size / 64
    draw.ellipse((10 * s, 4 * s, 54 * s, 44 * s), fill=HAIR[hair])
    draw.ellipse((16 * s, 14 * s, 48 * s, 60 * s), fill=SKIN)
    for x in (25, 39):
        draw.ellipse(((x - 3) * s, 30 * s, (x + 3) * s, 35 * s), fill=(30, 30, 30))
        if glasses:
            draw.rectangle(((x - 6) * s, 27 * s, (x + 6) * s, 38 * s), outline=(20, 20, 20), width=max(1, round(2 * s)))
    draw.arc((25 * s, 42 * s, 39 * s, 52 * s), 20, 160, fill=(150, 40, 40), width=max(1, round(2 * s)))
    return image


def toy_face_records(num_examples: int, t2i_fraction: float = 0.5, seed: int = 0, size: int = 64) -> list[dict]:
    """`num_examples` records over random attribute combinations, a share `t2i_fraction` of them T2I
    (`{"image", "caption"}`) and the rest MMU (`{"image", "messages"}`, one question and its answer), interleaved
    evenly (0.5: MMU, T2I, MMU, ...), so that even sequential batches mix both tasks."""
    rng = np.random.default_rng(seed)
    records = []
    for index in range(num_examples):
        hair, background = rng.choice(list(HAIR)), rng.choice(list(BACKGROUND))
        glasses = bool(rng.integers(2))
        image = draw_face(hair, background, glasses, size)
        if math.floor((index + 1) * t2i_fraction) > math.floor(index * t2i_fraction):
            caption = f"a face with {hair} hair{' and glasses' if glasses else ''} on a {background} background"
            records.append({"image": image, "caption": caption})
            continue
        topic = rng.choice(list(QUESTIONS))
        answer = {"hair": hair, "background": background, "glasses": "yes" if glasses else "no"}[topic]
        records.append({"image": image, "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[topic]}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]})
    return records


def toy_corpus() -> list[str]:
    """Every word the toy data and the chat template use, for a tokenizer trained from scratch."""
    words = [*HAIR, *BACKGROUND, *QUESTIONS.values(), "a face with hair and glasses on a background", "yes no",
             "USER: ASSISTANT:", "describe the face."]
    return [" ".join(words)] * 8


# ----------------------------------------------------------------------------------------------- model and result
def build_toy_checkpoint(folder: Path, config: UniF2aceConfig | None = None, seed: int = 0) -> None:
    """An untrained UniF²ace with its processor in `folder`: of `config` (tokenizer trained on the toy corpus), or by
    default the demo's `UniF2aceConfig.small()` checkpoint."""
    if config is None:
        build_untrained_checkpoint(folder, seed)
        return
    torch.manual_seed(seed)
    UniF2aceForConditionalGeneration(config).save_pretrained(folder)
    tokenizer = train_unif2ace_tokenizer(toy_corpus(), config, min_frequency=1)
    image_processor = UniF2aceImageProcessor.from_model_config(config)
    UniF2aceProcessor(image_processor, tokenizer, num_image_tokens=config.num_image_tokens).save_pretrained(folder)


def load_model_and_processor(script_args, training_args: TrainingArguments):
    """The `--model` folder (or a freshly built `<output_dir>/base`), loaded through the Auto classes, with LoRA
    applied when `--lora`. The main process builds the base checkpoint while the others wait."""
    model_dir = Path(script_args.model) if script_args.model else Path(training_args.output_dir) / "base"
    if script_args.model is None:
        with training_args.main_process_first(desc="building the base checkpoint"):
            if training_args.process_index == 0 and not (model_dir / "config.json").exists():
                config = UniF2aceConfig.tiny() if script_args.tiny else None
                build_toy_checkpoint(model_dir, config, training_args.seed)
    elif not (model_dir / "config.json").is_file():
        raise ValueError(f"--model {model_dir} is not a folder with a config.json (a local UniF²ace checkpoint)")
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    if script_args.lora:
        from peft import get_peft_model

        parts = tuple(part.strip() for part in script_args.lora_parts.split(",") if part.strip())
        model = get_peft_model(model, default_lora_config(model.config, parts=parts, r=script_args.lora_r,
                                                          lora_alpha=script_args.lora_alpha))
    return model, processor


def save_result(trainer, processor, script_args) -> Path:
    """Save the model (or the adapter) and the processor to `output_dir`; with `--merge_lora` also the merged
    checkpoint to `output_dir/merged`. Returns the folder that loads as a full model."""
    output_dir = Path(trainer.args.output_dir)
    trainer.save_model(str(output_dir))
    if trainer.args.process_index != 0:
        return output_dir
    processor.save_pretrained(output_dir)
    if script_args.lora and script_args.merge_lora:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(output_dir / "merged")
        processor.save_pretrained(output_dir / "merged")
        return output_dir / "merged"
    return output_dir


def build_trainer(script_args, training_args, records, eval_records=None):
    """Model, processor, step-seeded collator and trainer for `records` (raw T2I / MMU records)."""
    model, processor = load_model_and_processor(script_args, training_args)
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    collator = StepSeededCollator(UniF2aceDataCollator.from_config(processor, model.config), seed=seed)
    trainer = UniF2aceTrainer(
        model=model, args=training_args, data_collator=collator, train_dataset=records, eval_dataset=eval_records,
        processing_class=processor, balance_loss=script_args.balance_loss,
    )
    return trainer, processor


def main(argv: Sequence[str] | None = None) -> UniF2aceTrainer:
    script_args, training_args = parse_args(argv, __doc__.split("\n\n")[0], UnifiedArguments, output_dir="runs/unified")
    records = toy_face_records(script_args.num_examples, script_args.t2i_fraction, seed=training_args.seed)
    eval_records = toy_face_records(script_args.num_eval_examples, script_args.t2i_fraction, training_args.seed + 1)
    trainer, processor = build_trainer(script_args, training_args, records, eval_records or None)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_result(trainer, processor, script_args)
    return trainer


def run(script_main, argv: Sequence[str]) -> None:
    """Run a script's `main`, then end the process group (under `torchrun` / `accelerate launch`) in order: a rank
    that exits with gloo's threads still running aborted now and then ("terminate called without an active
    exception") after a finished run."""
    script_main(argv)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run(main, sys.argv[1:])
