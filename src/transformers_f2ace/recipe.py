"""The training recipe of the embedded default model (`unif2ace train`) and its evaluation (`unif2ace eval`).

Training has two stages (DESIGN §4):

1. `vq`: the image tokenizer ([`UniF2aceVQModel`] of the preset's `vq_config`) trained with [`train_vq`] on
   SynthFace train renders at the tokenizer's resolution; saved to `OUTPUT_DIR/vq`.
2. `model`: a UniF²ace of the preset (the trained tokenizer's weights in `model.model.vq`, a BPE tokenizer trained on
   SynthFace captions and QA text; its semantic (CLIP) encoder first pretrained on the training faces' attributes by
   [`train_semantic_encoder`], our offline stand-in for a pretrained CLIP, then frozen) trained with
   [`UniF2aceTrainer`] on a mix of T2I caption records and MMU records (attribute questions, plus "Describe the
   face." answered by the caption), checkpointed to `OUTPUT_DIR/checkpoints` (resumable) and saved, with its
   processor, to `OUTPUT_DIR/final`.

Evaluation measures understanding on held-out SynthFace faces (VQA exact match per attribute, caption attribute
recall) and, with an attribute judge (`transformers_f2ace.evaluation`), generation (judged attribute accuracy of
generated faces, Fréchet distance in the judge's feature space).
"""

import collections
import copy
import importlib
import json
import math
import re
import shutil
import string
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.utils.chat_template_utils import render_jinja_template

from .configuration_unif2ace import UniF2aceConfig
from .data import (ABSENT_VALUE, attribute_class_counts, attribute_labels, conversation, example_attributes,
                   make_example)
from .data.text import EXPRESSION_QUESTION, QUESTIONS, expression, vqa_pairs
from .image_processing_unif2ace import UniF2aceImageProcessor
from .modeling_unif2ace import UniF2aceForConditionalGeneration
from .modeling_unif2ace_vq import UniF2aceVQModel
from .processing_unif2ace import UniF2aceProcessor
from .tokenization_unif2ace import train_unif2ace_tokenizer

PRESETS = {"small": UniF2aceConfig.small, "tiny": UniF2aceConfig.tiny}
STAGES = ("vq", "model", "all")
DESCRIBE_QUESTION = "Describe the face."
CHAT_WORDS = "USER: ASSISTANT:"
RECIPE_ARGS_FILE = "recipe_args.json"  # in the run folder and in its final model folder
SEMANTIC_PROBE_FILE = "semantic_probe.json"  # in the run folder and in its final model folder


# ------------------------------------------------------------------------------------------------------- training
@dataclass
class RecipeArguments:
    """Everything `unif2ace train` takes.

    The defaults are the embedded model's run, sized to about 100 minutes on an uncontended 2-core CPU: the tokenizer
    (4x downsampling, 256 tokens per 64 px face) for 6,000 steps of 16 images, AdamW 2e-3 with 50 warm-up steps and
    cosine decay, under bf16 autocast where the CPU has bf16 kernels (`vq_bf16`; about half the fp32 step time);
    the semantic encoder's attribute pretraining, 1,500 steps of 128 faces (about
    2 minutes); then the model for 3,000 steps of 16 records (4.0 epochs of 12,000 faces, 0.9-1.4 s/step), AdamW
    5e-4, 100 warm-up steps, cosine decay, 50% generation / 50% understanding records, each understanding record a
    conversation of `questions_per_record` attribute questions (or, for a share `describe_fraction`, "Describe the
    face."). With `mix_tasks` every step accumulates one micro-batch of half the records of each task, each of
    records of similar length (`UniF2aceTrainer(mix_tasks_per_step=True)`); without it the step's records are grouped
    by length alone (so a step is mostly one task), batches shuffled (`ShuffledLengthGroupedSampler`) either way.
    Every stage prints its own estimate after measuring a few steps. `d3diff_alpha`, `moe` and `vq_dir` are for the
    ablations (README): another loss or a dense model on the tokenizer of another run.
    """

    output_dir: str
    stage: str = "all"
    config: str = "small"
    seed: int = 0
    num_train: int = 12000
    # stage 1: the VQ tokenizer
    vq_steps: int = 6000
    vq_batch_size: int = 16
    vq_lr: float = 2e-3
    vq_warmup_steps: int = 50
    vq_bf16: bool | None = None  # bf16 autocast for the tokenizer; None: where the CPU has bf16 kernels
    vq_dir: str | None = None
    # stage 2: the model (first its semantic encoder's attribute pretraining; 0 steps keeps it random)
    semantic_steps: int = 1500
    semantic_batch_size: int = 128
    semantic_lr: float = 2e-3
    semantic_probe_faces: int = 500  # validation faces of the encoder's probe accuracy
    model_steps: int = 3000
    batch_size: int = 16
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    adam_beta2: float = 0.999
    t2i_fraction: float = 0.5
    describe_fraction: float = 0.1
    questions_per_record: int = 10
    mix_tasks: bool = True
    save_steps: int = 100
    save_total_limit: int = 2
    logging_steps: int = 25
    resume: bool = False
    progress: bool = True
    # ablations: the preset's D3Diff weight (None) or another (0 = mask-only loss); both MoE levels or a dense model
    d3diff_alpha: float | None = None
    moe: bool = True

    def __post_init__(self):
        if self.vq_bf16 is None:
            self.vq_bf16 = cpu_bf16_supported()
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.config not in PRESETS:
            raise ValueError(f"config must be one of {tuple(PRESETS)}, got {self.config!r}")
        for name in ("num_train", "vq_steps", "vq_batch_size", "model_steps", "batch_size", "save_steps",
                     "logging_steps", "save_total_limit", "questions_per_record"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.semantic_steps < 0 or self.semantic_batch_size < 1 or self.semantic_probe_faces < 1:
            raise ValueError("semantic_steps must be >= 0, semantic_batch_size and semantic_probe_faces >= 1, got "
                             f"{self.semantic_steps}, {self.semantic_batch_size}, {self.semantic_probe_faces}")
        for name in ("vq_lr", "lr", "semantic_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.d3diff_alpha is not None and self.d3diff_alpha < 0:
            raise ValueError(f"d3diff_alpha must be >= 0, got {self.d3diff_alpha}")
        if self.vq_dir is not None and self.stage != "model":
            raise ValueError("vq_dir (a tokenizer trained by another run) only goes with stage 'model'")
        if self.warmup_steps < 0 or self.vq_warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError(f"warmup_steps, vq_warmup_steps and weight_decay must be >= 0, got {self.warmup_steps}, "
                             f"{self.vq_warmup_steps}, {self.weight_decay}")
        if not 0.0 <= self.adam_beta2 < 1.0:
            raise ValueError(f"adam_beta2 must be in [0, 1), got {self.adam_beta2}")
        for name in ("t2i_fraction", "describe_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mix_tasks and self.batch_size % 2:
            raise ValueError(f"mix_tasks takes half the batch from each task: batch_size must be even, got "
                             f"{self.batch_size}")


@dataclass
class RecipeResult:
    """What `run_recipe` did: the saved folders, the tokenizer's last losses, the semantic encoder's probe accuracy
    on validation faces (None when not pretrained), the Trainer's log history and final step, and the wall seconds
    per stage that ran."""

    vq_dir: Path | None = None
    final_dir: Path | None = None
    vq_losses: dict[str, float] = field(default_factory=dict)
    semantic_probe: dict[str, float] | None = None
    log_history: list[dict[str, float]] = field(default_factory=list)
    global_step: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def cpu_bf16_supported() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512 and newer; native bf16 arithmetic with AVX-512 BF16 or
    AMX, as on the project's machines). The tokenizer stage trains on the CPU, so this decides its bf16 autocast."""
    is_supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(is_supported is not None and is_supported())


def face_pixels(examples: list[dict[str, Any]]) -> torch.Tensor:
    """The examples' renders as one uint8 tensor (N, 3, R, R), as the tokenizer trains on them."""
    images = torch.from_numpy(np.stack([np.asarray(example["image"].convert("RGB")) for example in examples]))
    return images.permute(0, 3, 1, 2).contiguous()


def synthface_examples(num: int, size: int, seed: int, split: str = "train") -> list[dict[str, Any]]:
    """The first `num` SynthFace examples of `split` at `size` px (`make_example` records)."""
    return [make_example(split, index, size=size, seed=seed) for index in range(num)]


def _takes_share(index: int, fraction: float) -> bool:
    """Whether item `index` is among a share `fraction` of items spread evenly (0.8: 4 of every 5)."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def multi_turn(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """A VQA conversation of several (question, answer) turns about one image (the image in the first user turn)."""
    messages = conversation(*pairs[0])
    for question, answer in pairs[1:]:
        messages += [{"role": "user", "content": [{"type": "text", "text": question}]},
                     {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return messages


def mixed_records(examples: list[dict[str, Any]], t2i_fraction: float, describe_fraction: float,
                  questions_per_record: int = 1, seed: int = 0) -> list[dict]:
    """One training record per example, interleaved evenly: a share `t2i_fraction` are T2I (`{"image", "caption"}`),
    the others MMU (`{"image", "messages"}`): of those a share `describe_fraction` ask "Describe the face." (answer:
    the caption), the rest `questions_per_record` attribute questions about the face in one conversation (the
    example's own question first, then others drawn from its `vqa_pairs` with a generator seeded by `seed` and the
    example's index)."""
    records, num_mmu = [], 0
    for index, example in enumerate(examples):
        if _takes_share(index, t2i_fraction):
            records.append({"image": example["image"], "caption": example["caption"]})
            continue
        if _takes_share(num_mmu, describe_fraction):
            messages = conversation(DESCRIBE_QUESTION, example["caption"])
        else:
            rng = np.random.default_rng([seed, index])
            others = [pair for pair in vqa_pairs(example["attributes"], rng) if pair[0] != example["qa"][0]]
            picked = rng.permutation(len(others))[: questions_per_record - 1]
            messages = multi_turn([tuple(example["qa"]), *(others[i] for i in picked)])
        records.append({"image": example["image"], "messages": messages})
        num_mmu += 1
    return records


def tokenizer_corpus(examples: list[dict[str, Any]]) -> list[str]:
    """Captions, QA text and every question template, for the BPE tokenizer."""
    templates = [q for questions in QUESTIONS.values() for q in questions]
    fixed = " ".join([*templates, EXPRESSION_QUESTION, DESCRIBE_QUESTION, CHAT_WORDS])
    return [fixed] * 4 + [example["caption"] + " " + " ".join(example["qa"]) for example in examples]


def _estimate(label: str, seconds_per_step: float, steps: int) -> None:
    print(f"[unif2ace train] {label}: {seconds_per_step:.2f} s/step measured -> about "
          f"{seconds_per_step * steps / 60:.1f} min for {steps} steps", flush=True)


def _vq_autocast(args: RecipeArguments) -> torch.dtype | None:
    return torch.bfloat16 if args.vq_bf16 else None


def _time_vq_step(vq: UniF2aceVQModel, images: torch.Tensor, args: RecipeArguments) -> float:
    """Seconds per training step of the tokenizer, measured on a copy (one warm-up step, then two)."""
    from .training.vq import train_vq

    probe = copy.deepcopy(vq)
    settings = dict(lr=args.vq_lr, batch_size=args.vq_batch_size, seed=0, progress=False,
                    autocast_dtype=_vq_autocast(args))
    train_vq(probe, images[: args.vq_batch_size], steps=1, **settings)
    start = time.perf_counter()
    train_vq(probe, images[: args.vq_batch_size], steps=2, **settings)
    return (time.perf_counter() - start) / 2


def train_vq_stage(args: RecipeArguments, config: UniF2aceConfig, examples: list[dict[str, Any]]) -> dict[str, float]:
    """Stage 1: train the preset's image tokenizer on the examples' renders; save it to `output_dir/vq`."""
    from .training.vq import train_vq

    torch.manual_seed(args.seed)
    vq = UniF2aceVQModel(config.vq_config)
    images = face_pixels(examples)  # the examples are rendered at the tokenizer's resolution
    label = "stage vq" + (" (bf16 autocast)" if args.vq_bf16 else "")
    _estimate(label, _time_vq_step(vq, images, args), args.vq_steps)
    return train_vq(vq, images, steps=args.vq_steps, lr=args.vq_lr, batch_size=args.vq_batch_size, seed=args.seed,
                    progress=args.progress, output_dir=str(Path(args.output_dir) / "vq"), lr_schedule="cosine",
                    warmup_steps=args.vq_warmup_steps, autocast_dtype=_vq_autocast(args))


def build_processor(config: UniF2aceConfig, examples: list[dict[str, Any]]) -> UniF2aceProcessor:
    """The processor of the recipe: image processor sized from `config`, BPE tokenizer trained on SynthFace text."""
    tokenizer = train_unif2ace_tokenizer(tokenizer_corpus(examples), config)
    return UniF2aceProcessor(UniF2aceImageProcessor.from_model_config(config), tokenizer,
                             num_image_tokens=config.num_image_tokens)


def build_model(config: UniF2aceConfig, vq_dir: Path, seed: int) -> UniF2aceForConditionalGeneration:
    """A freshly initialised UniF²ace of `config` with the trained tokenizer of `vq_dir` in `model.model.vq`."""
    vq = UniF2aceVQModel.from_pretrained(vq_dir)
    metadata = {"_name_or_path": None, "architectures": None, "dtype": None, "transformers_version": None}
    if vq.config.to_dict() | metadata != config.vq_config.to_dict() | metadata:
        raise ValueError(f"the tokenizer in {vq_dir} was trained with another vq_config than the preset's: "
                         "train the vq stage again with the same --config")
    torch.manual_seed(seed)
    model = UniF2aceForConditionalGeneration(config)
    model.model.vq.load_state_dict(vq.state_dict())
    return model


def pretrain_semantic_encoder(args: RecipeArguments, model: UniF2aceForConditionalGeneration,
                              processor: UniF2aceProcessor, examples: list[dict[str, Any]]) -> dict[str, float] | None:
    """Train the model's semantic encoder in place on the attributes of `examples` ([`train_semantic_encoder`]) and
    return its probe accuracy per category on the first `args.semantic_probe_faces` validation faces (written to
    `output_dir/SEMANTIC_PROBE_FILE`); None, with nothing trained, when the model has no semantic encoder or
    `args.semantic_steps` is 0."""
    from .training import probe_accuracy, train_semantic_encoder

    encoders = model.model.feature_encoders
    if encoders is None or encoders.semantic_encoder is None or args.semantic_steps == 0:
        return None

    def views(faces: list[dict[str, Any]]) -> torch.Tensor:
        images = [face["image"] for face in faces]
        return processor.image_processor(images, return_tensors="pt")["semantic_pixel_values"]

    def labels(faces: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        indices = attribute_labels([face["attributes"] for face in faces])
        return {name: torch.from_numpy(values) for name, values in indices.items()}

    layer = model.config.moe_config.semantic_feature_layer
    num_classes = attribute_class_counts()
    heads, _ = train_semantic_encoder(
        encoders.semantic_encoder, views(examples), labels(examples), num_classes, feature_layer=layer,
        steps=args.semantic_steps, batch_size=args.semantic_batch_size, lr=args.semantic_lr, seed=args.seed,
        progress=args.progress,
    )
    probe = synthface_examples(args.semantic_probe_faces, model.config.vq_config.resolution, args.seed, "validation")
    accuracy = probe_accuracy(encoders.semantic_encoder, heads, views(probe), labels(probe), feature_layer=layer)
    (Path(args.output_dir) / SEMANTIC_PROBE_FILE).write_text(json.dumps(accuracy, indent=2))
    print(f"[unif2ace train] semantic encoder: attribute probe accuracy {accuracy['overall']:.3f} on "
          f"{len(probe)} validation faces")
    return accuracy


class EstimateCallback(TrainerCallback):
    """Prints the measured time per step and the estimate for the run after a few steps (the first excluded: it
    includes the warm-up)."""

    def __init__(self, max_steps: int, measured_steps: int = 3):
        self.max_steps, self.measured_steps = max_steps, measured_steps
        self.first_step, self.start = None, None

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is None:
            self.first_step, self.start = state.global_step, time.perf_counter()
        elif state.global_step == self.first_step + self.measured_steps:
            seconds = (time.perf_counter() - self.start) / self.measured_steps
            _estimate("stage model", seconds, self.max_steps - self.first_step)


def recipe_config(args: RecipeArguments) -> UniF2aceConfig:
    """The preset `args.config`, with the ablation switches applied (`d3diff_alpha`; `moe=False`: dense MLPs and no
    sequence-level experts)."""
    overrides: dict[str, Any] = {}
    if args.d3diff_alpha is not None:
        overrides["d3diff_alpha"] = args.d3diff_alpha
    if not args.moe:
        overrides["moe_config"] = {"token_moe": False, "sequence_moe": False}
    return PRESETS[args.config](**overrides)


def tokenizer_dir(args: RecipeArguments) -> Path:
    """Where stage model reads the trained image tokenizer: `args.vq_dir`, else `output_dir/vq`."""
    return Path(args.vq_dir) if args.vq_dir is not None else Path(args.output_dir) / "vq"


def check_records_fit(records: list[dict[str, Any]], processor: UniF2aceProcessor, config: UniF2aceConfig,
                      num_longest: int = 8) -> None:
    """Collate the `num_longest` records of each kind (T2I, MMU) with the most text tokens — every record has one
    image, so they make the longest sequences — so that one the model cannot take fails before training, not at the
    step that first draws it. Raises ValueError (the collator's reason, e.g. a sequence longer than the model's
    positions)."""
    from .training import UniF2aceDataCollator

    collator = UniF2aceDataCollator.from_config(processor, config, seed=0)
    lengths = collator.record_lengths(records)
    for kind in ("caption", "messages"):
        longest = sorted((i for i, record in enumerate(records) if kind in record), key=lengths.__getitem__)
        if not longest:
            continue
        try:
            collator([records[i] for i in longest[-num_longest:]])
        except ValueError as error:
            raise ValueError(f"The longest training records cannot be collated, checked before training: {error} "
                             "(conversations too long? lower questions_per_record)") from error


def model_training_arguments(args: RecipeArguments, checkpoints: Path) -> TrainingArguments:
    """The `TrainingArguments` of stage model: AdamW with cosine decay, checkpoints in `checkpoints`, batches grouped
    by length; with `mix_tasks`, two accumulated micro-batches of half the records each (one per task)."""
    return TrainingArguments(
        output_dir=str(checkpoints), max_steps=args.model_steps,
        per_device_train_batch_size=args.batch_size // 2 if args.mix_tasks else args.batch_size,
        gradient_accumulation_steps=2 if args.mix_tasks else 1,
        learning_rate=args.lr, warmup_steps=args.warmup_steps, lr_scheduler_type="cosine",
        weight_decay=args.weight_decay, adam_beta2=args.adam_beta2, max_grad_norm=1.0, logging_steps=args.logging_steps,
        save_strategy="steps", save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        seed=args.seed, report_to="none", use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=False,
        disable_tqdm=not args.progress, train_sampling_strategy="group_by_length",
    )


def train_model_stage(args: RecipeArguments, config: UniF2aceConfig, examples: list[dict[str, Any]]):
    """Stage 2: the semantic encoder's pretraining (skipped on resume), then the unified MMU + T2I training; returns
    the trainer after saving `output_dir/final`, and the encoder's probe accuracy (None when skipped)."""
    from transformers.trainer_utils import get_last_checkpoint

    from .training import UniF2aceTrainer

    output = Path(args.output_dir)
    checkpoints = output / "checkpoints"
    resume_from = None
    if args.resume:
        resume_from = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
        if resume_from is None:
            raise ValueError(f"--resume: no checkpoint-* folder in {checkpoints}; run without --resume to start")
        processor = UniF2aceProcessor.from_pretrained(output / "processor")
    else:
        processor = build_processor(config, examples)
        processor.save_pretrained(output / "processor")
    records = mixed_records(examples, args.t2i_fraction, args.describe_fraction, args.questions_per_record, args.seed)
    check_records_fit(records, processor, config)
    model = build_model(config, tokenizer_dir(args), args.seed)
    semantic_probe = None  # on resume the checkpoint holds the pretrained encoder, and the run folder its probe
    if resume_from is None:
        (output / SEMANTIC_PROBE_FILE).unlink(missing_ok=True)
        semantic_probe = pretrain_semantic_encoder(args, model, processor, examples)
    trainer = UniF2aceTrainer(
        model=model, args=model_training_arguments(args, checkpoints), train_dataset=records, processing_class=processor, balance_loss=True,
        mix_tasks_per_step=args.mix_tasks,
        callbacks=[EstimateCallback(args.model_steps)],
    )
    trainer.train(resume_from_checkpoint=resume_from)
    final = output / "final"
    trainer.save_model(str(final))
    processor.save_pretrained(final)
    # the recipe's arguments replace the Trainer's pickled training_args.bin: the folder is meant to be published
    (final / "training_args.bin").unlink(missing_ok=True)
    (final / RECIPE_ARGS_FILE).write_text(json.dumps(asdict(args), indent=2))
    if (output / SEMANTIC_PROBE_FILE).is_file():
        shutil.copy(output / SEMANTIC_PROBE_FILE, final / SEMANTIC_PROBE_FILE)
    return trainer, semantic_probe


def run_recipe(args: RecipeArguments) -> RecipeResult:
    """Run the stages `args.stage` asks for; `--resume` skips a VQ stage whose tokenizer is already saved."""
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / RECIPE_ARGS_FILE).write_text(json.dumps(asdict(args), indent=2))
    config = recipe_config(args)
    examples = synthface_examples(args.num_train, config.vq_config.resolution, args.seed)
    result = RecipeResult()
    if args.stage in ("vq", "all"):
        if args.resume and (output / "vq" / "config.json").is_file():
            print(f"[unif2ace train] stage vq: --resume keeps the tokenizer already in {output / 'vq'}")
        else:
            start = time.perf_counter()
            result.vq_losses = train_vq_stage(args, config, examples)
            result.seconds["vq"] = time.perf_counter() - start
        result.vq_dir = output / "vq"
    if args.stage in ("model", "all"):
        if not (tokenizer_dir(args) / "config.json").is_file():
            raise ValueError(f"stage model needs the trained tokenizer in {tokenizer_dir(args)}: run --stage vq first "
                             "(or pass the vq folder of another run)")
        start = time.perf_counter()
        trainer, result.semantic_probe = train_model_stage(args, config, examples)
        result.seconds["model"] = time.perf_counter() - start
        result.final_dir = output / "final"
        result.log_history = trainer.state.log_history
        result.global_step = trainer.state.global_step
    return result


# ----------------------------------------------------------------------------------------------------- evaluation
# Words that show a "yes" of a yes/no category in a caption (the captions leave "no" / "none" values out).
YES_WORDS: dict[str, tuple[str, ...]] = {
    "bald": ("bald",), "bangs": ("bangs",), "eyes_closed": ("closed eyes",), "eyebrows_raised": ("raised",),
    "moustache": ("moustache",), "stubble": ("stubble",), "sunglasses": ("sunglasses",), "mask": ("mask",),
    "blush": ("blushing",), "smiling": ("smiling", "laughing"), "mouth_open": ("laughing", "surprised"),
}


def normalise_answer(text: str) -> str:
    """Lower-case, punctuation removed, whitespace collapsed."""
    text = text.lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
    return " ".join(text.split())


def mentioned(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `text` as whole words (after `normalise_answer` of both)."""
    return re.search(rf"\b{re.escape(normalise_answer(phrase))}\b", normalise_answer(text)) is not None


def attribute_questions(attributes: dict[str, str | None]) -> list[tuple[str, str, str]]:
    """(attribute, question, answer) for every visible category (its first question template) and the expression."""
    items = [(name, QUESTIONS[name][0], value) for name, value in attributes.items()
             if value is not None and name in QUESTIONS]
    mood = expression(attributes)
    if mood is not None:
        items.append(("expression", EXPRESSION_QUESTION, mood))
    return items


def caption_mentions(attributes: dict[str, str | None], text: str) -> tuple[int, int]:
    """(mentioned, counted): the visible, non-absent attribute values of a face, and how many `text` names."""
    counted = hits = 0
    for name, value in attributes.items():
        if value is None or ABSENT_VALUE.get(name) == value:
            continue
        words = YES_WORDS.get(name, (value,)) if value == "yes" else (value,)
        counted += 1
        hits += any(mentioned(text, word) for word in words)
    return hits, counted


@torch.no_grad()
def answer_questions(model, processor, image, questions: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers of `model` to `questions` about one image (one left-padded batch)."""
    conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
                     for question in questions]
    return answer_conversations(model, processor, image, conversations, max_new_tokens)


def answer_conversations(model, processor, image, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy replies of `model` to `conversations` (messages format, one image each: `image`; one left-padded
    batch)."""
    texts, _ = render_jinja_template(conversations=conversations, chat_template=processor.chat_template,
                                     add_generation_prompt=True, **processor.tokenizer.special_tokens_map)
    inputs = processor(images=[image] * len(texts), text=texts, mode="mmu", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [text.strip() for text in
            processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]


def answer_prior(num: int = 2000, seed: int = 0) -> dict[str, str]:
    """Attribute -> its most frequent (normalised) answer over the first `num` training faces: what a model answers
    when it reads the question but not the image."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for index in range(num):
        for name, _, answer in attribute_questions(example_attributes("train", index, seed)):
            counts[name][normalise_answer(answer)] += 1
    return {name: counter.most_common(1)[0][0] for name, counter in counts.items()}


def _accuracies(correct: dict[str, list[int]]) -> tuple[dict[str, float], float]:
    flat = [value for values in correct.values() for value in values]
    return {name: sum(values) / len(values) for name, values in sorted(correct.items())}, sum(flat) / len(flat)


def evaluate_understanding(model, processor, examples: list[dict[str, Any]], max_new_tokens: int = 48,
                           prior: dict[str, str] | None = None) -> dict[str, Any]:
    """VQA exact-match accuracy per attribute (and overall, micro) and caption attribute recall (micro); with
    `prior` (an [`answer_prior`]), the same accuracies of always giving the prior's answer (`vqa_prior`,
    `vqa_prior_overall`): the baseline that shows whether the model looks at the image. `vqa_overall_ci95`: a 95%
    bootstrap interval of `vqa_overall` over the faces."""
    from .evaluation import bootstrap_interval

    correct: dict[str, list[int]] = {}
    baseline: dict[str, list[int]] = {}
    face_right, face_asked = [], []
    hits = counted = 0
    for example in examples:
        items = attribute_questions(example["attributes"])
        answers = answer_questions(model, processor, example["image"],
                                   [question for _, question, _ in items] + [DESCRIBE_QUESTION], max_new_tokens)
        verdicts = [int(normalise_answer(answer) == normalise_answer(truth))
                    for (_, _, truth), answer in zip(items, answers)]
        face_right.append(sum(verdicts))
        face_asked.append(len(verdicts))
        for (name, _, truth), verdict in zip(items, verdicts):
            correct.setdefault(name, []).append(verdict)
            if prior is not None:
                baseline.setdefault(name, []).append(int(prior.get(name) == normalise_answer(truth)))
        face_hits, face_counted = caption_mentions(example["attributes"], answers[-1])
        hits, counted = hits + face_hits, counted + face_counted
    accuracy, overall = _accuracies(correct)
    report = {"vqa_accuracy": accuracy, "vqa_overall": overall,
              "vqa_overall_ci95": bootstrap_interval(face_right, face_asked),
              "vqa_questions": sum(map(len, correct.values())), "caption_recall": hits / counted if counted else 0.0}
    if prior is not None:
        report["vqa_prior"], report["vqa_prior_overall"] = _accuracies(baseline)
    return report


@torch.no_grad()
def reconstruction_accuracy(model, processor, examples: list[dict[str, Any]], judge, batch_size: int = 32
                            ) -> dict[str, float]:
    """The judge's attribute accuracy on the examples' real faces after the model's image tokenizer (encode, decode),
    per attribute and `overall`: the ceiling of generation accuracy, since every generated face is a decoded token
    grid, and a rough one of what the image tokens tell the understanding path."""
    reconstructed = []
    for start in range(0, len(examples), batch_size):
        images = [example["image"] for example in examples[start:start + batch_size]]
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        codes = model.model.encode_images(pixel_values.to(model.device))
        reconstructed += processor.image_processor.postprocess(model.decode_image_tokens(codes))
    return judged_accuracy(judge, reconstructed, examples)


def judged_accuracy(judge, images: list, examples: list[dict[str, Any]]) -> dict[str, float]:
    """The judge's accuracy on `images` against the examples' attributes: per attribute and `overall`."""
    return _accuracy_table(_judged_scores(judge, images, examples))


def _judged_scores(judge, images: list, examples: list[dict[str, Any]]) -> dict[str, Any]:
    from .evaluation import attribute_accuracy

    return attribute_accuracy(judge.predict(images), [example["attributes"] for example in examples])


def _accuracy_table(scores: dict[str, Any]) -> dict[str, float]:
    return {**scores["per_category"], "overall": scores["accuracy"]}


def evaluate_generation(model, processor, examples: list[dict[str, Any]], judge_dir: str, steps: int | None,
                        seed: int, batch_size: int = 8, reference: list[dict[str, Any]] | None = None
                        ) -> dict[str, Any]:
    """Judged attribute accuracy of faces generated from the examples' captions, and the Fréchet distance between
    the judge's features of generated and real faces; with `reference` (as many other real faces), also the
    real-vs-real floor `frechet_floor` (the distance between the examples' and the reference faces: the Fréchet
    distance is biased upwards at small sample sizes, so compare against this floor at the same size); and the
    `tokenizer_ceiling` (overall; per attribute in `tokenizer_ceiling_per_attribute`, see
    [`reconstruction_accuracy`]); `judged_accuracy_ci95`, a 95% bootstrap interval of the overall judged accuracy
    over the faces. Needs `transformers_f2ace.evaluation`."""
    from .evaluation import FaceJudge, bootstrap_interval, frechet_distance

    judge = FaceJudge.from_pretrained(judge_dir)
    generator = torch.Generator().manual_seed(seed)
    generated = []
    for start in range(0, len(examples), batch_size):
        prompts = [example["caption"] for example in examples[start:start + batch_size]]
        generated += model.generate_images(**processor(text=prompts, return_tensors="pt"), num_inference_steps=steps,
                                           generator=generator, progress=False)
    real = judge.embed([example["image"] for example in examples])
    ceiling = reconstruction_accuracy(model, processor, examples, judge)
    scores = _judged_scores(judge, generated, examples)
    report = {"judged_accuracy": _accuracy_table(scores),
              "judged_accuracy_ci95": bootstrap_interval(scores["image_hits"], scores["image_scored"]),
              "frechet_distance": float(frechet_distance(judge.embed(generated), real)),
              "tokenizer_ceiling": ceiling["overall"], "tokenizer_ceiling_per_attribute": ceiling}
    if reference is not None:
        report["frechet_floor"] = float(frechet_distance(judge.embed([example["image"] for example in reference]),
                                                         real))
    return report


def run_eval(model_dir: str, num: int = 50, split: str = "test", judge_dir: str | None = None,
             steps: int | None = None, seed: int = 0, max_new_tokens: int = 48) -> dict[str, Any]:
    """Evaluate the checkpoint in `model_dir` on the first `num` SynthFace faces of `split`.

    `steps` are the MaskGIT steps of generation (default: the model config's); `max_new_tokens` bounds the answers.
    Returns a dict: `understanding` (see [`evaluate_understanding`]; with the majority-answer baseline of the first
    2,000 training faces) and `generation` (judged accuracy per
    attribute and `overall`, `frechet_distance`, and `frechet_floor` against as many faces of another split) or
    `generation_skipped` (why)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    examples = synthface_examples(num, model.config.vq_config.resolution, seed, split)
    report: dict[str, Any] = {"model": str(model_dir), "split": split, "num_faces": num,
                              "understanding": evaluate_understanding(model, processor, examples, max_new_tokens,
                                                                      prior=answer_prior(seed=seed))}
    if judge_dir is None:
        report["generation_skipped"] = "no --judge folder given"
        return report
    try:
        importlib.import_module(".evaluation", __package__)
    except ImportError as error:
        report["generation_skipped"] = f"transformers_f2ace.evaluation is not importable ({error})"
        return report
    reference_split = "validation" if split != "validation" else "train"
    reference = synthface_examples(num, model.config.vq_config.resolution, seed, reference_split)
    report["generation"] = evaluate_generation(model, processor, examples, judge_dir, steps, seed,
                                               reference=reference)
    return report


def eval_results(report: dict[str, Any]) -> list:
    """The report's headline numbers as `huggingface_hub.EvalResult`s (the model card's `model-index`)."""
    from huggingface_hub import EvalResult

    dataset = {"dataset_type": "synthface", "dataset_name": f"SynthFace ({report['split']}, {report['num_faces']} faces)",
               "dataset_split": report["split"]}
    understanding = report["understanding"]
    results = [
        EvalResult(task_type="visual-question-answering", task_name="Face VQA", metric_type="exact_match",
                   metric_name="VQA exact match", metric_value=round(understanding["vqa_overall"], 4), **dataset),
        EvalResult(task_type="image-to-text", task_name="Face captioning", metric_type="recall",
                   metric_name="caption attribute recall", metric_value=round(understanding["caption_recall"], 4),
                   **dataset),
    ]
    if "generation" in report:
        generation = report["generation"]
        results += [
            EvalResult(task_type="text-to-image", task_name="Face generation", metric_type="accuracy",
                       metric_name="judged attribute accuracy",
                       metric_value=round(generation["judged_accuracy"]["overall"], 4), **dataset),
            EvalResult(task_type="text-to-image", task_name="Face generation", metric_type="frechet_distance",
                       metric_name="Fréchet distance (judge features)",
                       metric_value=round(generation["frechet_distance"], 3), **dataset),
        ]
    return results


def training_summary(recipe: dict[str, Any]) -> str:
    """A markdown paragraph on how a recipe run (its `recipe_args.json` as a dict) trained the model."""
    ablation = []
    if recipe.get("d3diff_alpha") is not None:
        ablation.append(f"`--d3diff-alpha {recipe['d3diff_alpha']}`")
    if not recipe.get("moe", True):
        ablation.append("`--no-moe`")
    semantic = ""
    if recipe.get("semantic_steps") and recipe.get("moe", True):
        semantic = (f"the semantic (CLIP) encoder on the training faces' attributes for {recipe['semantic_steps']:,} "
                    f"steps (batch {recipe['semantic_batch_size']}; then frozen, our stand-in for a pretrained CLIP), ")
    return (
        f"Trained on this package's SynthFace (procedural faces, {recipe['num_train']:,} training faces, seed "
        f"{recipe['seed']}) by `unif2ace train` with the `{recipe['config']}` preset"
        f"{' and ' + ', '.join(ablation) if ablation else ''}: the image tokenizer for {recipe['vq_steps']:,} steps "
        f"(batch {recipe['vq_batch_size']}, AdamW {recipe['vq_lr']:g}, cosine"
        f"{', bf16 autocast' if recipe.get('vq_bf16') else ''}), "
        f"{semantic}then the model for "
        f"{recipe['model_steps']:,} steps (batch {recipe['batch_size']}, AdamW {recipe['lr']:g}, cosine, "
        f"{recipe['t2i_fraction']:.0%} generation / {1 - recipe['t2i_fraction']:.0%} understanding records"
        f"{', one micro-batch of each task per step' if recipe.get('mix_tasks') else ''}), "
        "on a 2-core CPU. The evaluation metrics come from `unif2ace eval` on the held-out test split."
    )


def write_model_card(model_dir: str | Path, report: dict[str, Any], repo_id: str) -> Path:
    """Render the model card of `model_dir` (from `hub_cards/`, usage snippets for `repo_id`) with the report's
    metrics (and, when the folder holds the recipe's `recipe_args.json`, how it was trained); save it as
    `model_dir/README.md` and return that path."""
    from .hub import render_folder_card

    model_dir = Path(model_dir)
    recipe_file = model_dir / RECIPE_ARGS_FILE
    training = training_summary(json.loads(recipe_file.read_text())) if recipe_file.is_file() else None
    path = model_dir / "README.md"
    render_folder_card(model_dir, repo_id, eval_results=eval_results(report), training=training).save(path)
    return path


def _interval(bounds: list[float] | None) -> str:
    return f" [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else ""


def markdown_table(report: dict[str, Any]) -> str:
    """The report as a markdown table: one row per attribute (VQA accuracy, the majority-answer baseline when the
    report has it, judged generation accuracy, the judge on tokenizer reconstructions when the report has it); the
    overall row gives 95% bootstrap intervals over the faces in brackets where the report has them."""
    understanding = report["understanding"]
    generation = report.get("generation", {}).get("judged_accuracy", {})
    ceiling = report.get("generation", {}).get("tokenizer_ceiling_per_attribute", {})
    names = sorted((set(understanding["vqa_accuracy"]) | set(generation)) - {"overall"})

    def cell(table: dict[str, float], name: str) -> str:
        return f"{table[name]:.3f}" if name in table else "-"

    prior = understanding.get("vqa_prior", {})
    lines = ["| attribute | VQA accuracy | VQA majority-answer baseline | generation accuracy (judge) "
             "| judge on tokenizer reconstructions |", "|---|---|---|---|---|"]
    vqa = understanding["vqa_accuracy"]
    lines += [f"| {name} | {cell(vqa, name)} | {cell(prior, name)} | {cell(generation, name)} | {cell(ceiling, name)} |"
              for name in names]
    prior_overall = f"{understanding['vqa_prior_overall']:.3f}" if "vqa_prior_overall" in understanding else "-"
    overall = f"{understanding['vqa_overall']:.3f}{_interval(understanding.get('vqa_overall_ci95'))}"
    judged = f"{cell(generation, 'overall')}{_interval(report.get('generation', {}).get('judged_accuracy_ci95'))}"
    lines.append(f"| **overall** | {overall} | {prior_overall} | {judged} "
                 f"| {cell(ceiling, 'overall')} |")
    lines.append("")
    lines.append(f"Caption attribute recall: {understanding['caption_recall']:.3f} "
                 f"({report['num_faces']} {report['split']} faces, {understanding['vqa_questions']} questions)")
    if "generation" in report:
        generation = report["generation"]
        floor = (f" (real-vs-real floor at this size: {generation['frechet_floor']:.3f})"
                 if "frechet_floor" in generation else "")
        lines.append(f"Fréchet distance (judge features): {generation['frechet_distance']:.3f}{floor}")
        lines.append(f"Judge accuracy on tokenizer reconstructions of the real faces (the ceiling of generation): "
                     f"{generation['tokenizer_ceiling']:.3f}")
    else:
        lines.append(f"Generation metrics skipped: {report['generation_skipped']}")
    return "\n".join(lines)


__all__ = [
    "RecipeArguments",
    "RecipeResult",
    "answer_prior",
    "attribute_questions",
    "build_model",
    "build_processor",
    "caption_mentions",
    "check_records_fit",
    "evaluate_generation",
    "evaluate_understanding",
    "eval_results",
    "markdown_table",
    "mixed_records",
    "normalise_answer",
    "reconstruction_accuracy",
    "run_eval",
    "run_recipe",
    "synthface_examples",
    "tokenizer_corpus",
    "training_summary",
    "write_model_card",
]
