"""SynthFace as a `datasets.Dataset`, and a gallery image.

Reproducibility and held-out splits:

- Example `index` of a split draws from `numpy.random.default_rng([seed, SPLIT_SEED_OFFSET[split] + index])`, with
  offsets train 0, validation 10**9, test 2 * 10**9, so the per-example seed ranges of the splits are disjoint
  ([0, 10**9), [10**9, 2 * 10**9), [2 * 10**9, 3 * 10**9)) for any dataset `seed`.
- On top of that every attribute combination belongs to exactly one split (`attributes.split_of`, a hash bucket:
  5% test, 5% validation, 90% train), and each split only keeps its own combinations, so no validation or test face
  (the image is a function of its attributes) ever appears in train, whatever the seeds.
"""

import json
import os
from typing import Any

import numpy as np
from PIL import Image

from .attributes import Attributes, sample_attributes
from .render import render_face
from .text import caption, vqa_pairs


SPLITS = ("train", "validation", "test")
SEEDS_PER_SPLIT = 10**9
SPLIT_SEED_OFFSET = {split: i * SEEDS_PER_SPLIT for i, split in enumerate(SPLITS)}


def example_seed(split: str, index: int) -> int:
    """The per-example seed of example `index` of `split` (disjoint ranges per split)."""
    if split not in SPLIT_SEED_OFFSET:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= index < SEEDS_PER_SPLIT:
        raise ValueError(f"index must be in [0, {SEEDS_PER_SPLIT}), got {index}")
    return SPLIT_SEED_OFFSET[split] + index


def _example_rng(split: str, index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, example_seed(split, index)])


def example_attributes(split: str, index: int, seed: int = 0) -> Attributes:
    """The attribute record of `make_example(split, index, seed=seed)` without rendering the face."""
    return sample_attributes(_example_rng(split, index, seed), split=split)


def make_example(split: str, index: int, size: int = 64, seed: int = 0) -> dict[str, Any]:
    """One SynthFace record: PIL `image`, `attributes` dict, `caption`, one `(question, answer)` as `qa`."""
    rng = _example_rng(split, index, seed)
    attributes = sample_attributes(rng, split=split)
    pairs = vqa_pairs(attributes, rng)
    return {
        "image": render_face(attributes, size),
        "attributes": attributes,
        "caption": caption(attributes, rng),
        "qa": pairs[int(rng.integers(len(pairs)))],
    }


def conversation(question: str, answer: str) -> list[dict[str, Any]]:
    """A single-turn VQA exchange in the Hugging Face messages format (the image comes first in the user turn)."""
    return [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def load_synthface(split: str = "train", num_samples: int = 1000, size: int = 64, seed: int = 0):
    """Generate SynthFace in memory as a `datasets.Dataset`.

    Args:
        split: "train", "validation" or "test" (disjoint seeds and disjoint attribute combinations).
        num_samples: number of examples (> 0).
        size: image side in pixels (64 is the embedded model's resolution).
        seed: dataset seed; the same arguments always give the same dataset.

    Returns:
        Dataset with columns `image` (datasets Image), `attributes` (JSON object string; `null` = not visible),
        `caption` (str), `conversations` (one VQA exchange, messages format) and `seed` (the example's seed).
    """
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(num_samples, (int, np.integer)) or not 0 < num_samples <= SEEDS_PER_SPLIT:
        raise ValueError(f"num_samples must be an int in [1, {SEEDS_PER_SPLIT}], got {num_samples!r}")
    text = Value("string")
    features = Features({
        "image": ImageFeature(),
        "attributes": text,
        "caption": text,
        "conversations": List({"role": text, "content": List({"type": text, "text": text})}),
        "seed": Value("int64"),
    })
    rows = []
    for index in range(num_samples):
        example = make_example(split, index, size=size, seed=seed)
        rows.append({
            "image": example["image"],
            "attributes": json.dumps(example["attributes"]),
            "caption": example["caption"],
            "conversations": conversation(*example["qa"]),
            "seed": example_seed(split, index),
        })
    return Dataset.from_list(rows, features=features)


def save_gallery(path: str, n: int = 32, columns: int = 8, size: int = 64, scale: int = 2, seed: int = 0,
                 split: str = "test") -> str:
    """Save the first `n` faces of `split` as a PNG grid (`columns` wide, each upscaled `scale`x, nearest)."""
    if n < 1 or columns < 1 or scale < 1:
        raise ValueError(f"n, columns and scale must be >= 1, got n={n}, columns={columns}, scale={scale}")
    rows = -(-n // columns)
    cell = size * scale
    grid = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    for i in range(n):
        face = make_example(split, i, size=size, seed=seed)["image"]
        grid.paste(face.resize((cell, cell), Image.NEAREST), ((i % columns) * cell, (i // columns) * cell))
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path)
    return path

