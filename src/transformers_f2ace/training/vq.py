"""Training loop for the image tokenizer (`UniF2aceVQModel`): AdamW on reconstruction + commitment + entropy losses."""

import math
from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..modeling_unif2ace_vq import UniF2aceVQModel
from .optimizer_step import optimizer_step

_LOSS_NAMES = ("loss", "reconstruction_loss", "commitment_loss", "entropy_loss")
LR_SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based) of `steps`: linear warm-up over
    `warmup_steps`, then 1 (`"constant"`) or a cosine decay reaching 0 after the last step (`"cosine"`)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _to_uint8_chw(image: Image.Image | np.ndarray, resolution: int) -> torch.Tensor:
    """One PIL image / HWC uint8 array -> uint8 tensor `(3, resolution, resolution)` (resized if needed)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"images must be PIL images, HWC uint8 arrays or a tensor, got an item of type {type(image)}")
    image = image.convert("RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _as_image_tensor(images: torch.Tensor | Iterable, resolution: int) -> torch.Tensor:
    """Stack the training images into one tensor `(N, 3, resolution, resolution)`: uint8 in [0, 255] or float in
    [-1, 1] (a tensor argument is kept as given)."""
    if isinstance(images, torch.Tensor):
        tensor = images
    else:
        items = [_to_uint8_chw(image, resolution) for image in images]
        if not items:
            raise ValueError("images is empty")
        tensor = torch.stack(items)
    if tensor.ndim != 4 or tensor.shape[0] == 0:
        raise ValueError(f"images must have shape (num_images, 3, height, width), got {tuple(tensor.shape)}")
    if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
        raise ValueError(f"an images tensor must be uint8 in [0, 255] or float in [-1, 1], got dtype {tensor.dtype}")
    return tensor


def _to_pixel_values(batch: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if batch.dtype == torch.uint8:
        return (batch.to(device=device, dtype=dtype) / 127.5) - 1.0
    return batch.to(device=device, dtype=dtype)


def train_vq(
    model: UniF2aceVQModel,
    images: torch.Tensor | Iterable,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool = True,
    output_dir: str | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """
    Train `model` in place with AdamW for `steps` steps.

    Args:
        model: the tokenizer; trained on its own device and dtype.
        images: a tensor `(N, 3, resolution, resolution)` (float in [-1, 1] or uint8 in [0, 255]), or an iterable of
            PIL images / HWC uint8 arrays (materialised once as uint8, resized to `model.config.resolution`).
        steps: number of optimizer steps.
        lr: AdamW learning rate.
        batch_size: images per step; batches are drawn by reshuffling the whole set every epoch.
        seed: seeds the batch order, so a run from the same initial weights is reproducible.
        progress: show a tqdm progress bar with the current losses.
        output_dir: if given, `model.save_pretrained(output_dir)` (safetensors) after training.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient-norm clipping threshold; `None` disables clipping.
        lr_schedule: `"constant"` or `"cosine"` (decay to 0 at the last step), after `warmup_steps` linear warm-up.
        warmup_steps: steps of linear warm-up from 0 to `lr`.
        autocast_dtype: run the forward under `torch.autocast(model.device.type, autocast_dtype)` (mixed precision:
            the weights, their updates and the saved model stay in the model's dtype); `None` (default) disables it.
            On a CPU with native bf16 (`torch.bfloat16`) a step of the embedded model's tokenizer takes 0.5-0.6x the
            fp32 time (`benchmarks/bench_vq_training.py`), with the same reconstruction error after 600 steps (README).

    Returns:
        The losses of the last step: `loss`, `reconstruction_loss`, `commitment_loss`, `entropy_loss` (floats).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    data = _as_image_tensor(images, model.config.resolution)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, warmup_steps, lr_schedule)
    )
    order = torch.empty(0, dtype=torch.long)

    model.train()
    with tqdm(total=steps, desc="train_vq", disable=not progress) as bar:
        for _ in range(steps):
            while len(order) < batch_size:
                order = torch.cat([order, torch.randperm(len(data), generator=generator)])
            indices, order = order[:batch_size], order[batch_size:]
            pixel_values = _to_pixel_values(data[indices], model.dtype, model.device)
            with torch.autocast(model.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                output = model(pixel_values, return_loss=True)
            losses = {name: output[name].item() for name in _LOSS_NAMES}
            optimizer_step(output.loss, optimizer, scheduler, bar, model.parameters(), max_grad_norm,
                           postfix={"loss": f"{losses['loss']:.4f}", "rec": f"{losses['reconstruction_loss']:.4f}"})
    model.eval()
    if output_dir is not None:
        model.save_pretrained(output_dir)
    return losses
