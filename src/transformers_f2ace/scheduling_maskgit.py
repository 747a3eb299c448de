r"""MaskGIT sampler for masked-token image generation (SPEC §5), as a diffusers-style scheduler in pure torch.

State: a code grid `sample` (LongTensor (B, N)) holding image codes in [0, K) and `MASKED` (= -1) at masked
positions; generation starts from `scheduler.initial_sample(B, N)` (everything masked). For `s = 0 .. T-1`:

    logits = model(ids)                                      # (B, N, K) over the image codes; CFG via add_guidance
    sample = scheduler.step(logits, s, sample, generator).prev_sample

where the caller maps the grid to model ids, e.g. `torch.where(sample == MASKED, mask_id, sample + image_offset)`.
Each step (with `u = (s + 1) / T`, the SPEC's 1-based `s / T`):

1. every masked position draws a code from `softmax(logits / sample_temperature)` after top-k / top-p filtering,
   by inverse CDF (`cumsum` + `searchsorted` on generator uniforms; `torch.multinomial` is ~40x slower on CPU);
2. confidence = the model's log-prob of the drawn code (`log_softmax(logits)`, before temperature / filtering, as
   in MaskGIT) + `temperature * (1 - u)` * Gumbel noise; fixed positions get +inf;
3. the `n = floor(N * r(u))` least confident positions are re-masked (r = the mask schedule), clamped to
   `[0, masked_before - 1]` so that each step fixes at least one token; the last step leaves nothing masked.
"""

import math
from typing import NamedTuple

import torch

from .loss_d3diff import MASK_SCHEDULES, mask_ratio


MASKED = -1


class MaskGITStepOutput(NamedTuple):
    """prev_sample (`LongTensor (B, N)`): the grid after the step, `MASKED` where still masked.
    mask (`BoolTensor (B, N)`): `prev_sample == MASKED`.
    pred_original_sample (`LongTensor (B, N)`): the fully sampled grid of this step (a preview of the image).
    """

    prev_sample: torch.LongTensor
    mask: torch.BoolTensor
    pred_original_sample: torch.LongTensor


class MaskGITScheduler:
    r"""
    Args:
        mask_schedule (`str`): mask ratio as a function of progress, one of `MASK_SCHEDULES` (Show-o: cosine).
        temperature (`float`): scale of the Gumbel noise added to the confidences, annealed linearly to 0 (>= 0).
        sample_temperature (`float`): softmax temperature of the code draws (> 0; use `top_k=1` for greedy).
        top_k (`int`, *optional*): keep only the k most likely codes.
        top_p (`float`, *optional*): keep the smallest set of codes whose probability reaches `top_p`, in (0, 1].
    """

    def __init__(
        self,
        mask_schedule: str = "cosine",
        temperature: float = 1.0,
        sample_temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ):
        if mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"Unknown mask_schedule {mask_schedule!r}; accepted: {', '.join(MASK_SCHEDULES)}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not sample_temperature > 0:
            raise ValueError(f"sample_temperature must be > 0 (top_k=1 draws greedily), got {sample_temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
        self.mask_schedule = mask_schedule
        self.temperature = temperature
        self.sample_temperature = sample_temperature
        self.top_k = top_k
        self.top_p = top_p
        self.num_inference_steps: int | None = None
        self.timesteps: torch.LongTensor | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mask_schedule={self.mask_schedule!r}, temperature={self.temperature}, "
            f"sample_temperature={self.sample_temperature}, top_k={self.top_k}, top_p={self.top_p}, "
            f"num_inference_steps={self.num_inference_steps})"
        )

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Number of unmasking steps T; `timesteps` are the step indices 0 .. T-1 to pass to `step`."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.arange(num_inference_steps)

    @staticmethod
    def initial_sample(batch_size: int, num_tokens: int, device: torch.device | str | None = None) -> torch.LongTensor:
        """A fully masked grid `(batch_size, num_tokens)`."""
        return torch.full((batch_size, num_tokens), MASKED, dtype=torch.long, device=device)

    def num_masked_after_step(self, step_index: int, num_tokens: int) -> int:
        """Schedule target `floor(N * r((s + 1) / T))` masked positions after step `s` (before the per-row clamp)."""
        self._check_step(step_index)
        if step_index == self.num_inference_steps - 1:
            return 0
        progress = torch.tensor((step_index + 1) / self.num_inference_steps, dtype=torch.float64)
        return math.floor(num_tokens * mask_ratio(progress, self.mask_schedule).item())

    @staticmethod
    def add_guidance(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guidance `(1 + w) * cond - w * uncond` (w = `guidance_scale` >= 0; 0 returns `cond`)."""
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if guidance_scale == 0:
            return cond_logits
        return torch.lerp(uncond_logits, cond_logits, 1 + guidance_scale)

    def _check_step(self, step_index: int) -> None:
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        if not 0 <= step_index < self.num_inference_steps:
            raise ValueError(f"step_index must be in [0, {self.num_inference_steps}), got {step_index}")

    def _filter_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature, then top-k, then top-p; removed codes get -inf. `logits` (M, K) float; returned unchanged
        (the same object) when no filter applies."""
        if self.sample_temperature != 1:
            logits = logits / self.sample_temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if self.top_p is not None and self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(dim=-1)
            remove_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p  # mass before reaches top_p
            remove = torch.empty_like(remove_sorted).scatter_(1, order, remove_sorted)
            logits = logits.masked_fill(remove, -math.inf)
        return logits

    @staticmethod
    def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.LongTensor:
        """Inverse-CDF draw: per row the first code whose normalised cumulative probability exceeds the row's
        uniform in [0, 1); zero-probability codes are never drawn. `probs` (M, K) unnormalised >= 0, `uniforms` (M,).

        Raises `ValueError` when a row's total mass is not finite and positive (NaN / +inf logits upstream)."""
        cdf = probs.cumsum(dim=-1)
        total = cdf[:, -1:]
        if not bool(((total > 0) & torch.isfinite(total)).all()):  # an O(M) check on the cumsum we need anyway
            raise ValueError("logits contain NaN or +inf (or a row with no finite entry) at masked positions")
        cdf = cdf / total  # last entry exactly 1 > any uniform (not in place: `total` is a view of `cdf`)
        return torch.searchsorted(cdf, uniforms[:, None].to(cdf.dtype), right=True).squeeze(1)

    def step(
        self,
        logits: torch.Tensor,
        step_index: int,
        sample: torch.LongTensor,
        generator: torch.Generator | None = None,
    ) -> MaskGITStepOutput:
        """One unmasking step.

        Args:
            logits (`Tensor (B, N, K)`): model logits over the K image codes (after guidance).
            step_index (`int`): s in [0, T).
            sample (`LongTensor (B, N)`): current grid, `MASKED` at masked positions.
            generator (`torch.Generator`, *optional*): on the logits' device. Draw order: (B, N) uniforms for the
                codes, then (B, N) uniforms for the Gumbel noise, so seeded runs are bit-reproducible.
        """
        self._check_step(step_index)
        if logits.dim() != 3 or sample.shape != logits.shape[:2]:
            raise ValueError(
                f"expected logits (B, N, K) and sample (B, N); got {tuple(logits.shape)} and {tuple(sample.shape)}"
            )
        batch_size, num_tokens = sample.shape
        device = logits.device
        mask = sample == MASKED
        code_uniforms = torch.rand(batch_size, num_tokens, generator=generator, device=device)
        gumbel_uniforms = torch.rand(batch_size, num_tokens, generator=generator, device=device)

        rows = mask.view(-1).nonzero().squeeze(1)
        masked_logits = logits.reshape(-1, logits.shape[-1]).index_select(0, rows).float()  # (M, K): rows to draw
        filtered = self._filter_logits(masked_logits)
        probs = filtered.softmax(dim=-1)
        drawn = self.inverse_cdf_sample(probs, code_uniforms.view(-1)[rows])
        pred_original_sample = sample.masked_scatter(mask, drawn)
        # confidence uses the model's own (unfiltered, untempered) probability of the drawn code
        model_probs = probs if filtered is masked_logits else masked_logits.softmax(dim=-1)
        log_prob = model_probs.gather(1, drawn[:, None]).squeeze(1).log()

        progress = (step_index + 1) / self.num_inference_steps
        gumbel = -torch.log(-torch.log(gumbel_uniforms.clamp(min=torch.finfo(gumbel_uniforms.dtype).tiny)))
        confidence = torch.full((batch_size, num_tokens), math.inf, device=device)
        confidence[mask] = log_prob + self.temperature * (1 - progress) * gumbel[mask]

        target = self.num_masked_after_step(step_index, num_tokens)
        num_remask = (mask.sum(dim=1) - 1).clamp(min=0, max=target)  # (B,): at least one newly fixed per row
        order = confidence.argsort(dim=1, stable=True)  # least confident first; fixed (+inf) last
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(num_tokens, device=device).expand_as(order))
        remask = ranks < num_remask[:, None]
        prev_sample = pred_original_sample.masked_fill(remask, MASKED)
        return MaskGITStepOutput(prev_sample, remask, pred_original_sample)
