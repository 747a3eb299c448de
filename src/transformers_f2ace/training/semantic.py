"""Attribute pretraining of the semantic (CLIP) encoder: our stand-in for the pretrained CLIP the paper freezes.

The paper's semantic sequence expert reads a CLIP tower pretrained on web image-text pairs; offline, the small
models here start from a randomly initialised tower, whose features say little about fine attributes. This trains
the tower on labelled faces before it is frozen: one linear head per attribute category over the mean of the patch
tokens the model reads (`hidden_states[feature_layer][:, 1:]`, as `UniF2aceFeatureEncoders.semantic_features`), so
the tokens the resampler sees carry the attributes. The heads are only for training and probing; the model keeps the
tower.
"""

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import CLIPVisionModel

from .optimizer_step import optimizer_step


def pooled_patch_features(encoder: CLIPVisionModel, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """(B, C, S, S) CLIP-normalised pixels -> (B, D): the mean over the patch tokens (no CLS) of layer
    `feature_layer` of `encoder`'s hidden states."""
    hidden_states = encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    return hidden_states[feature_layer][:, 1:].mean(dim=1)


def attribute_heads(hidden_size: int, num_classes: Mapping[str, int]) -> nn.ModuleDict:
    """One `Linear(hidden_size, n)` per category of `num_classes` (category -> number of classes)."""
    return nn.ModuleDict({name: nn.Linear(hidden_size, count) for name, count in num_classes.items()})


def train_semantic_encoder(
    encoder: CLIPVisionModel,
    pixel_values: torch.Tensor,
    labels: Mapping[str, torch.Tensor],
    num_classes: Mapping[str, int],
    feature_layer: int = -1,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.ModuleDict, float]:
    """Train `encoder` in place to predict every attribute category from its pooled patch tokens.

    Args:
        encoder: the CLIP vision tower (e.g. `model.model.feature_encoders.semantic_encoder`); left with
            `requires_grad=False` and in eval mode afterwards, as the model keeps its frozen encoders.
        pixel_values: (N, C, S, S) CLIP-normalised training faces (the processor's `semantic_pixel_values`).
        labels: category -> (N,) class indices (e.g. `attribute_labels`), below `num_classes[category]`.
        num_classes: category -> number of classes of its head.
        feature_layer: the hidden-state layer the model reads (`moe_config.semantic_feature_layer`).
        steps, batch_size, lr, weight_decay: AdamW with a one-cycle schedule over `steps` batches drawn with
            replacement by a generator seeded with `seed`.
    Returns:
        The trained heads (for `probe_accuracy`) and the mean cross-entropy of the last step.
    """
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must have shape (N, C, S, S), got {tuple(pixel_values.shape)}")
    if set(labels) != set(num_classes):
        raise ValueError(f"labels and num_classes must name the same categories, got {sorted(labels)} and "
                         f"{sorted(num_classes)}")
    for name, indices in labels.items():
        if indices.shape != (len(pixel_values),):
            raise ValueError(f"labels[{name!r}] must have shape ({len(pixel_values)},), got {tuple(indices.shape)}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    torch.manual_seed(seed)
    heads = attribute_heads(encoder.config.hidden_size, num_classes)
    parameters = [*encoder.parameters(), *heads.parameters()]
    encoder.requires_grad_(True)
    encoder.train()
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    try:
        with tqdm(total=steps, desc="semantic encoder", disable=not progress) as bar:
            for _ in range(steps):
                batch = torch.randint(0, len(pixel_values), (batch_size,), generator=generator)
                pooled = pooled_patch_features(encoder, pixel_values[batch], feature_layer)
                loss = sum(F.cross_entropy(head(pooled), labels[name][batch]) for name, head in heads.items())
                loss = loss / len(heads)
                optimizer_step(loss, optimizer, schedule, bar)
    finally:
        encoder.requires_grad_(False)
        encoder.eval()
    return heads.eval(), loss.item()


@torch.no_grad()
def probe_accuracy(
    encoder: CLIPVisionModel,
    heads: nn.ModuleDict,
    pixel_values: torch.Tensor,
    labels: Mapping[str, torch.Tensor],
    feature_layer: int = -1,
    batch_size: int = 256,
) -> dict[str, float]:
    """Per-category accuracy of `heads` over the pooled features of `encoder` on held-out faces, plus `overall`
    (the mean over categories)."""
    pooled = torch.cat([pooled_patch_features(encoder, pixel_values[start:start + batch_size], feature_layer)
                        for start in range(0, len(pixel_values), batch_size)])
    accuracy = {name: (head(pooled).argmax(-1) == labels[name]).float().mean().item() for name, head in heads.items()}
    return {**accuracy, "overall": sum(accuracy.values()) / len(accuracy)}


__all__ = ["attribute_heads", "pooled_patch_features", "probe_accuracy", "train_semantic_encoder"]
