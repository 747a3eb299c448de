"""One optimizer step of the package's plain training loops (tokenizer, semantic encoder, judge)."""

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    bar: tqdm,
    clip_parameters: Iterable[torch.nn.Parameter] | None = None,
    max_grad_norm: float | None = None,
    postfix: dict[str, str] | None = None,
) -> None:
    """Back-propagate `loss`, clip the gradients of `clip_parameters` to `max_grad_norm` (when both are given), step
    the optimizer and the learning-rate scheduler, and advance `bar` showing `postfix` (default: the loss)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_parameters is not None and max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(clip_parameters, max_grad_norm)
    optimizer.step()
    scheduler.step()
    bar.set_postfix(postfix if postfix is not None else {"loss": f"{loss.item():.4f}"})
    bar.update()
