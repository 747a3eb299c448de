"""The SynthFace attribute judge: a small CNN trained on SynthFace ground truth, used to score generated faces.

One softmax head per attribute category over its values, plus a "not visible" class (the last index) for the
categories that occlusion can hide (`NULLABLE`). The penultimate layer (`feature_dim` floats) is the feature space of
the Fréchet distance. Saved as `model.safetensors` + `config.json` (no pickle).
"""

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ..data import ATTRIBUTES, NULLABLE, attribute_class_counts, attribute_labels


CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

ImageLike = Union[Image.Image, np.ndarray]


@dataclass
class FaceJudgeConfig:
    """Architecture and label space of the judge.

    Args:
        image_size: input side in pixels (images are resized to it, RGB).
        channels: output channels of the conv blocks (each block: 3x3 conv, batch norm, ReLU, 2x2 max pool).
        feature_dim: width of the penultimate layer (the feature vector).
        categories: category -> its values (default: SynthFace `ATTRIBUTES`).
        nullable: categories with an extra trailing "not visible" class.
    """

    image_size: int = 64
    channels: tuple[int, ...] = (16, 32, 64, 64)
    feature_dim: int = 128
    categories: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in ATTRIBUTES.items()})
    nullable: list[str] = field(default_factory=lambda: list(NULLABLE))

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if self.image_size % 2 ** len(self.channels):
            raise ValueError(f"image_size ({self.image_size}) must be divisible by 2 ** len(channels)")
        unknown = [name for name in self.nullable if name not in self.categories]
        if unknown:
            raise ValueError(f"nullable has categories {unknown} missing from categories")

    def num_classes(self, category: str) -> int:
        """Number of classes of a category's head (values, plus one if it can be hidden)."""
        return attribute_class_counts({category: self.categories[category]}, self.nullable)[category]

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": list(self.channels)}


class FaceJudge(nn.Module):
    """CNN attribute classifier over RGB faces in [0, 1], shape (batch, 3, image_size, image_size)."""

    def __init__(self, config: FaceJudgeConfig):
        super().__init__()
        self.config = config
        blocks, previous = [], 3
        for width in config.channels:
            blocks += [nn.Conv2d(previous, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            previous = width
        self.backbone = nn.Sequential(*blocks, nn.Flatten())
        side = config.image_size // 2 ** len(config.channels)
        self.feature = nn.Sequential(nn.Linear(previous * side * side, config.feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({
            name: nn.Linear(config.feature_dim, config.num_classes(name)) for name in config.categories
        })

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(batch, 3, H, W) floats in [0, 1] -> (batch, feature_dim) penultimate activations."""
        return self.feature(self.backbone(pixels * 2 - 1))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(batch, 3, H, W) floats in [0, 1] -> category -> logits (batch, num_classes(category))."""
        hidden = self.features(pixels)
        return {name: head(hidden) for name, head in self.heads.items()}

    def preprocess(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """PIL images or uint8 HxWx3 arrays -> (batch, 3, image_size, image_size) floats in [0, 1]."""
        size = self.config.image_size
        arrays = []
        for image in images:
            if isinstance(image, np.ndarray):
                image = Image.fromarray(np.asarray(image, dtype=np.uint8))
            if not isinstance(image, Image.Image):
                raise ValueError(f"images must be PIL images or uint8 HxWx3 arrays, got {type(image).__name__}")
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def encode_labels(self, attributes: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Attribute dicts -> category -> class indices (batch,); `None` -> the "not visible" class."""
        labels = attribute_labels(attributes, self.config.categories, self.config.nullable)
        return {name: torch.from_numpy(indices) for name, indices in labels.items()}

    def decode(self, logits: dict[str, torch.Tensor]) -> list[dict[str, Optional[str]]]:
        """Logits -> one attribute dict per image (`None` where the judge sees the category as not visible)."""
        choices = {name: value.argmax(-1).tolist() for name, value in logits.items()}
        batch = len(next(iter(choices.values())))
        return [
            {
                name: (values[choices[name][i]] if choices[name][i] < len(values) else None)
                for name, values in self.config.categories.items()
            }
            for i in range(batch)
        ]

    @torch.no_grad()
    def predict(self, images: Sequence[ImageLike], batch_size: int = 256) -> list[dict[str, Optional[str]]]:
        """Predicted attribute dict of every image (eval mode; `None` = not visible)."""
        self.eval()
        out = []
        for start in range(0, len(images), batch_size):
            out += self.decode(self(self.preprocess(images[start:start + batch_size])))
        return out

    @torch.no_grad()
    def embed(self, images: Sequence[ImageLike], batch_size: int = 256) -> np.ndarray:
        """Penultimate features of the images, float64 array (num_images, feature_dim)."""
        self.eval()
        chunks = [
            self.features(self.preprocess(images[start:start + batch_size])).double().numpy()
            for start in range(0, len(images), batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.config.feature_dim))

    def save_pretrained(self, folder: str) -> None:
        """Write `config.json` and `model.safetensors` into `folder`."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, os.path.join(folder, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, folder: Optional[str] = None) -> "FaceJudge":
        """Load a judge saved by `save_pretrained` (default: the committed `pretrained/synthface-judge`)."""
        folder = folder or DEFAULT_JUDGE_PATH
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not os.path.isfile(os.path.join(folder, name)):
                raise ValueError(f"folder {folder!r} has no {name}; expected a folder written by save_pretrained")
        with open(os.path.join(folder, CONFIG_NAME)) as f:
            model = cls(FaceJudgeConfig(**json.load(f)))
        model.load_state_dict(load_file(os.path.join(folder, WEIGHTS_NAME)))
        return model.eval()


DEFAULT_JUDGE_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "pretrained", "synthface-judge")
