"""`unif2ace demo`: understanding and generation end to end on the default model, offline.

The default model is the embedded one shipped with the package (`transformers_f2ace/pretrained/`), loaded through the
transformers Auto classes. The faces and prompts come from SynthFace's held-out test split. Where it is absent, the demo builds a small *untrained* UniF²ace (same code, the
`UniF2aceConfig.small()` preset), saves it and loads it back the same way, and says so: its answers and faces are
noise, but every stage of the pipeline runs.
"""

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .configuration_unif2ace import UniF2aceConfig
from .data import make_example
from .image_processing_unif2ace import UniF2aceImageProcessor
from .modeling_unif2ace import UniF2aceForConditionalGeneration
from .processing_unif2ace import UniF2aceProcessor
from .tokenization_unif2ace import train_unif2ace_tokenizer


EMBEDDED_MODEL_DIR = Path(__file__).parent / "pretrained" / "unif2ace-synthface"
NUM_QUESTIONS = 3
NUM_PROMPTS = 4


@dataclass
class DemoResult:
    answers: list[tuple[str, str, str]]  # question, the model's answer, the ground truth
    prompts: list[str]
    grid_path: Path
    trained: bool
    seconds: float


def demo_examples(size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Held-out SynthFace test faces: some to ask about (with one question each), others whose captions are prompts."""
    examples = [make_example("test", index, size=size, seed=seed) for index in range(NUM_QUESTIONS + NUM_PROMPTS)]
    return examples[:NUM_QUESTIONS], examples[NUM_QUESTIONS:]


def build_untrained_checkpoint(folder: Path, seed: int = 0) -> None:
    """Save a small, randomly initialised UniF²ace with its processor (tokenizer trained on a tiny corpus)."""
    config = UniF2aceConfig.small()
    torch.manual_seed(seed)
    UniF2aceForConditionalGeneration(config).save_pretrained(folder)
    corpus = [example["caption"] + " " + " ".join(example["qa"]) for example in
              (make_example("train", index, seed=seed) for index in range(200))]
    tokenizer = train_unif2ace_tokenizer(corpus, config)
    processor = UniF2aceProcessor(
        UniF2aceImageProcessor.from_model_config(config), tokenizer, num_image_tokens=config.num_image_tokens
    )
    processor.save_pretrained(folder)


def image_grid(rows: list[list[Image.Image]], cell: int = 128) -> Image.Image:
    """Rows of images, each resized (nearest) to `cell` px, on a white canvas with 4 px gaps."""
    width = max(len(row) for row in rows)
    grid = Image.new("RGB", (width * (cell + 4) + 4, len(rows) * (cell + 4) + 4), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (4 + c * (cell + 4), 4 + r * (cell + 4)))
    return grid


def run_demo(output_dir: Path, model_dir: Path | None = None, steps: int | None = None, seed: int = 0,
             progress: bool = True) -> DemoResult:
    """Answer questions about faces and draw faces from prompts; write the PNG grid under `output_dir`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    start = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    model_dir = model_dir or (EMBEDDED_MODEL_DIR if (EMBEDDED_MODEL_DIR / "config.json").exists() else None)
    trained = model_dir is not None
    with tempfile.TemporaryDirectory() as scratch:
        if model_dir is None:
            model_dir = Path(scratch)
            build_untrained_checkpoint(model_dir, seed)
        model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
        processor = AutoProcessor.from_pretrained(model_dir)

    asked, described = demo_examples(model.config.vq_config.resolution, seed)
    answers = []
    for example in asked:
        question, truth = example["qa"]
        messages = [{"role": "user", "content": [{"type": "image", "image": example["image"]},
                                                 {"type": "text", "text": question}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        answers.append((question, answer.strip(), truth))

    prompts = [example["caption"] for example in described]
    images = model.generate_images(**processor(text=prompts, return_tensors="pt"), num_inference_steps=steps,
                                   progress=progress, generator=torch.Generator().manual_seed(seed))
    grid_path = output_dir / "unif2ace_demo.png"
    image_grid([[example["image"] for example in asked], [example["image"] for example in described], images]).save(
        grid_path
    )
    return DemoResult(answers, prompts, grid_path, trained, time.perf_counter() - start)
