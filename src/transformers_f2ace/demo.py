"""`unif2ace demo`: understanding and generation end to end on the default model, offline.

The default model is the embedded one shipped with the package (`transformers_f2ace/pretrained/`), loaded through the
transformers Auto classes. Where it is absent, the demo builds a small *untrained* UniF²ace (same code, the
`UniF2aceConfig.small()` preset), saves it and loads it back the same way, and says so: its answers and faces are
noise, but every stage of the pipeline runs.
"""

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .configuration_unif2ace import UniF2aceConfig
from .image_processing_unif2ace import UniF2aceImageProcessor
from .modeling_unif2ace import UniF2aceForConditionalGeneration
from .processing_unif2ace import UniF2aceProcessor
from .tokenization_unif2ace import train_unif2ace_tokenizer


EMBEDDED_MODEL_DIR = Path(__file__).parent / "pretrained" / "unif2ace-synthface"
QUESTIONS = ("Describe the face.", "What colour is the hair?", "Is the person smiling?")
PROMPTS = (
    "a smiling woman with long red hair and round glasses",
    "a man with a black beard and a blue hat",
    "a bald man with sunglasses",
    "a woman with short blond hair and earrings",
)
TOKENIZER_CORPUS = (" ".join(QUESTIONS + PROMPTS) + " yes no the person has a face with hair eyes mouth ") * 4


@dataclass
class DemoResult:
    answers: list[tuple[str, str]]
    grid_path: Path
    trained: bool
    seconds: float


def build_untrained_checkpoint(folder: Path, seed: int = 0) -> None:
    """Save a small, randomly initialised UniF²ace with its processor (tokenizer trained on a tiny corpus)."""
    config = UniF2aceConfig.small()
    torch.manual_seed(seed)
    UniF2aceForConditionalGeneration(config).save_pretrained(folder)
    tokenizer = train_unif2ace_tokenizer([TOKENIZER_CORPUS], config, min_frequency=1)
    processor = UniF2aceProcessor(
        UniF2aceImageProcessor.from_model_config(config), tokenizer, num_image_tokens=config.num_image_tokens
    )
    processor.save_pretrained(folder)


def sample_faces(count: int, size: int, seed: int) -> list[Image.Image]:
    """Simple procedural faces (skin oval, hair cap, eyes, mouth) in seeded colours, for the understanding part."""
    generator = torch.Generator().manual_seed(seed)
    faces = []
    for _ in range(count):
        background, hair, skin = (tuple(torch.randint(40, 230, (3,), generator=generator).tolist()) for _ in range(3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        s = size / 64
        draw.ellipse((14 * s, 6 * s, 50 * s, 40 * s), fill=hair)
        draw.ellipse((16 * s, 12 * s, 48 * s, 58 * s), fill=skin)
        for x in (24, 40):
            draw.ellipse(((x - 3) * s, 28 * s, (x + 3) * s, 33 * s), fill=(30, 30, 30))
        draw.arc((24 * s, 40 * s, 40 * s, 50 * s), 20, 160, fill=(150, 40, 40), width=max(1, int(2 * s)))
        faces.append(image)
    return faces


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

    resolution = model.config.vq_config.resolution
    faces = sample_faces(len(QUESTIONS), resolution, seed)
    answers = []
    for face, question in zip(faces, QUESTIONS):
        messages = [{"role": "user", "content": [{"type": "image", "image": face}, {"type": "text", "text": question}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        answers.append((question, answer.strip()))

    prompts = processor(text=list(PROMPTS), return_tensors="pt")
    images = model.generate_images(**prompts, num_inference_steps=steps, progress=progress,
                                   generator=torch.Generator().manual_seed(seed))
    grid_path = output_dir / "unif2ace_demo.png"
    image_grid([faces, images]).save(grid_path)
    return DemoResult(answers, grid_path, trained, time.perf_counter() - start)
