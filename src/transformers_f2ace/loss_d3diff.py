r"""D3Diff loss of UniF²ace (SPEC §4): masked-token cross-entropy plus the score entropy of the absorbing process.

Notation (per masked image position): `K` image codes, true code `x0`, model probabilities `p = softmax(logits)`,
mask ratio `r = q_t(x_t = [MASK] | x0)` in (0, 1], `rho = (1 - r) / r` and `K(a) = a (log a - 1)` (with `K(0) = 0`).

    L_d3diff = L_mask + alpha * L_score
    L_mask   = -log p(x0)
    L_score  = w(r) * [ sum_v s_v - rho * log s_{x0} + K(rho) ]          (SEDD score entropy, absorbing process)

with the concrete score `s` read off the network in one of two forms:

- `"bayes"` (the paper's literal Bayes rule): `s_v = p(v) / r`. Since `sum_v p(v) = 1`, `sum_v s_v = 1 / r` and

      1/r - rho (log p(x0) - log r) + rho log rho - rho
    = rho (-log p(x0)) + (1/r - rho) + rho log(r rho)
    = rho (-log p(x0)) + 1 + rho log(1 - r)                              (1/r - rho = 1,  r rho = 1 - r)

  i.e. the cross-entropy re-weighted by `rho` plus a constant `1 + rho log(1 - r)` in (0, 1] (-> 1 as r -> 1,
  -> 0 as r -> 0). It is computed in this closed form, so it costs nothing beyond the cross-entropy's log-softmax.
- `"log_score"` (SEDD-style): the logits are the log-scores, `s_v = exp(logits_v)`, so
  `sum_v s_v = exp(logsumexp(logits))` and the term is `exp(lse) - rho * logits_{x0} + K(rho)`; `lse` is recovered
  from the same log-softmax as `logits_{x0} - log p(x0)`.

Both are >= 0 and vanish only at the true ratio (`s_{x0} = rho`, every other `s_v = 0`); the Bayes form never
vanishes (its scores sum to 1/r), it is the calibrated score `s = rho * p` that gives exactly `rho (-log p(x0))`.

Time weight (optional, `time_weighting=True`): the SEDD diffusion weight `w = sigma_bar'(t)` with
`sigma_bar(t) = -log(1 - r(t))`, i.e. `w = |dr/dt| / (1 - r)`, written as a closed-form function of `r` for each
schedule and capped at `time_weight_cap` (it diverges as r -> 1). On the calibrated score the product
`w * rho = |dr/dt| / r` is the continuous-time masked-diffusion ELBO weight. As r -> 0 it is `rho` that grows; the
realised ratios `n / N` returned by `mask_image_tokens` keep it at most `N - 1`. Without time weighting `w = 1`.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class _MaskSchedule:
    ratio: Callable[[torch.Tensor], torch.Tensor]  # r(t)
    speed: Callable[[torch.Tensor], torch.Tensor]  # |dr/dt|(t)
    time_weight: Callable[[torch.Tensor], torch.Tensor]  # |dr/dt| / (1 - r), as a function of r


MASK_SCHEDULES: dict[str, _MaskSchedule] = {
    # r = cos(pi t / 2):  |r'| = pi/2 sin(pi t / 2) = pi/2 sqrt(1 - r^2)  ->  w = pi/2 sqrt((1 + r) / (1 - r))
    "cosine": _MaskSchedule(
        ratio=lambda t: torch.cos(t * (math.pi / 2)),
        speed=lambda t: torch.sin(t * (math.pi / 2)) * (math.pi / 2),
        time_weight=lambda r: torch.sqrt((1 + r) / (1 - r)) * (math.pi / 2),
    ),
    # r = 1 - t:  |r'| = 1  ->  w = 1 / (1 - r)
    "linear": _MaskSchedule(
        ratio=lambda t: 1 - t,
        speed=lambda t: torch.ones_like(t),
        time_weight=lambda r: 1 / (1 - r),
    ),
    # r = 1 - t^2:  |r'| = 2t = 2 sqrt(1 - r)  ->  w = 2 / sqrt(1 - r)
    "square": _MaskSchedule(
        ratio=lambda t: 1 - t**2,
        speed=lambda t: 2 * t,
        time_weight=lambda r: 2 / torch.sqrt(1 - r),
    ),
    # r = 1 - t^3:  |r'| = 3t^2 = 3 (1 - r)^(2/3)  ->  w = 3 (1 - r)^(-1/3)
    "cubic": _MaskSchedule(
        ratio=lambda t: 1 - t**3,
        speed=lambda t: 3 * t**2,
        time_weight=lambda r: 3 * (1 - r) ** (-1 / 3),
    ),
}
SCORE_FORMS = ("bayes", "log_score")
REDUCTIONS = ("mean", "sum", "none")


def _get_schedule(schedule: str) -> _MaskSchedule:
    if schedule not in MASK_SCHEDULES:
        raise ValueError(f"Unknown mask schedule {schedule!r}; accepted: {', '.join(MASK_SCHEDULES)}")
    return MASK_SCHEDULES[schedule]


def mask_ratio(t: torch.Tensor, schedule: str = "cosine") -> torch.Tensor:
    """Mask ratio `r(t)` for times `t` in [0, 1] (r(0) = 1: everything masked, r(1) = 0)."""
    return _get_schedule(schedule).ratio(t)


def mask_ratio_derivative(t: torch.Tensor, schedule: str = "cosine") -> torch.Tensor:
    """`|dr/dt|` of the schedule at times `t` in [0, 1]."""
    return _get_schedule(schedule).speed(t)


def diffusion_time_weight(ratio: torch.Tensor, schedule: str = "cosine", cap: float | None = None) -> torch.Tensor:
    """SEDD time weight `sigma_bar'(t) = |dr/dt| / (1 - r)` as a function of the mask ratio `r` in (0, 1].

    Infinite at r = 1 unless `cap` is given, in which case it is `min(weight, cap)`.
    """
    weight = _get_schedule(schedule).time_weight(ratio)
    return weight if cap is None else weight.clamp(max=cap)


class MaskedTokens(NamedTuple):
    """Output of [`mask_image_tokens`].

    input_ids (`LongTensor (B, N)`): the ids with masked positions replaced by the mask id.
    mask (`BoolTensor (B, N)`): True where masked.
    mask_ratio (`FloatTensor (B,)`): realised masked fraction `n / N` per image, the exact per-position masking
        probability `q_t([MASK] | x0)` of this procedure; pass it to [`D3DiffLoss`].
    """

    input_ids: torch.LongTensor
    mask: torch.BoolTensor
    mask_ratio: torch.FloatTensor


def mask_image_tokens(
    codes: torch.LongTensor,
    mask_token_id: int,
    generator: torch.Generator | None = None,
    schedule: str = "cosine",
    min_masked: int = 1,
    t: torch.Tensor | None = None,
) -> MaskedTokens:
    """Forward (absorbing) process of SPEC §4: per image `t ~ U(0, 1)`, `r = schedule(t)`, and
    `n = max(min_masked, round(N * r))` uniformly random positions replaced by `mask_token_id`.

    Args:
        codes (`LongTensor (B, N)`): image token ids (raw codes or unified-vocab ids; they are only copied).
        mask_token_id (`int`): id written at masked positions.
        generator (`torch.Generator`, *optional*): source of randomness, on `codes.device`. Draw order: `t` (B,)
            (unless given), then one uniform score per position (B, N).
        schedule (`str`): one of `MASK_SCHEDULES`.
        min_masked (`int`): lower bound on masked positions per image, in [0, N].
        t (`Tensor (B,)`, *optional*): times in [0, 1] to use instead of drawing them.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must have shape (batch, num_tokens), got {tuple(codes.shape)}")
    batch_size, num_tokens = codes.shape
    if not 0 <= min_masked <= num_tokens:
        raise ValueError(f"min_masked must be in [0, num_tokens={num_tokens}], got {min_masked}")
    sched = _get_schedule(schedule)
    device = codes.device
    if t is None:
        t = torch.rand(batch_size, generator=generator, device=device)
    elif t.shape != (batch_size,):
        raise ValueError(f"t must have shape ({batch_size},), got {tuple(t.shape)}")
    # Count in float64 so that round(N * r) is exact up to float64 rounding of r itself.
    num_masked = torch.round(sched.ratio(t.to(device, torch.float64)) * num_tokens).long()
    num_masked = num_masked.clamp(min_masked, num_tokens)
    scores = torch.rand(batch_size, num_tokens, generator=generator, device=device)
    order = scores.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(num_tokens, device=device).expand_as(order))
    mask = ranks < num_masked[:, None]
    input_ids = codes.masked_fill(mask, mask_token_id)
    return MaskedTokens(input_ids, mask, num_masked.float() / num_tokens)


class D3DiffOutput(NamedTuple):
    """loss = mask_loss + alpha * score_loss (score_loss includes the time weight when enabled).

    Scalars for reduction "mean"/"sum", per-masked-position `(M,)` tensors for "none".
    """

    loss: torch.Tensor
    mask_loss: torch.Tensor
    score_loss: torch.Tensor


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    return torch.xlogy(x, x)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax / loss arithmetic runs in float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


class D3DiffLoss(nn.Module):
    r"""D3Diff loss (module docstring has the formulas). Operates on logits restricted to the `K` image codes.

    Args:
        alpha (`float`): weight of the score-entropy term (paper: 0.01).
        score_form (`"bayes" | "log_score"`): how the concrete score is read off the logits.
        time_weighting (`bool`): multiply the score entropy by the capped SEDD time weight.
        time_weight_cap (`float`): upper bound of the time weight.
        schedule (`str`): mask schedule the ratios come from (only used by the time weight).
        reduction (`"mean" | "sum" | "none"`): over masked positions. With no masked position "mean" and "sum"
            give a zero that is still connected to the graph (a batch without generation rows is legitimate).
    """

    def __init__(
        self,
        alpha: float = 0.01,
        score_form: Literal["bayes", "log_score"] = "bayes",
        time_weighting: bool = False,
        time_weight_cap: float = 10.0,
        schedule: str = "cosine",
        reduction: Literal["mean", "sum", "none"] = "mean",
    ):
        super().__init__()
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if score_form not in SCORE_FORMS:
            raise ValueError(f"score_form must be one of {SCORE_FORMS}, got {score_form!r}")
        if not time_weight_cap > 0:
            raise ValueError(f"time_weight_cap must be > 0, got {time_weight_cap}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        _get_schedule(schedule)
        self.alpha = alpha
        self.score_form = score_form
        self.time_weighting = time_weighting
        self.time_weight_cap = time_weight_cap
        self.schedule = schedule
        self.reduction = reduction

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, score_form={self.score_form!r}, time_weighting={self.time_weighting}, "
            f"time_weight_cap={self.time_weight_cap}, schedule={self.schedule!r}, reduction={self.reduction!r}"
        )

    # ----------------------------------------------------------------------------------------------- helpers
    def _row_ratio(self, mask_ratio: torch.Tensor | float, num_rows: int, dtype: torch.dtype, device) -> torch.Tensor:
        ratio = torch.as_tensor(mask_ratio, dtype=dtype, device=device).detach()
        if ratio.dim() == 0:
            ratio = ratio.expand(num_rows)
        if ratio.shape != (num_rows,):
            raise ValueError(f"mask_ratio must be a scalar or have shape ({num_rows},), got {tuple(ratio.shape)}")
        return ratio

    @staticmethod
    def _check_values(targets: torch.Tensor, ratio: torch.Tensor, num_codes: int) -> None:
        bad_targets = ((targets < 0) | (targets >= num_codes)).any()
        bad_ratio = ((ratio <= 0) | (ratio > 1)).any()
        if bool(bad_targets | bad_ratio):  # one host sync for both checks
            if bool(bad_targets):
                raise ValueError(
                    f"targets must be image-code indices in [0, {num_codes}) (not unified-vocab ids), got range "
                    f"[{int(targets.min())}, {int(targets.max())}]"
                )
            raise ValueError(
                f"mask_ratio must be in (0, 1] at masked positions, got range [{ratio.min()}, {ratio.max()}]"
            )

    def _row_constants(self, ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row `rho`, the form's logit-free score constant, and the score weight `w` (all (M,))."""
        rho = (1 - ratio) / ratio
        if self.score_form == "bayes":
            constant = 1 + _xlogx(1 - ratio) / ratio  # 1 + rho log(1 - r), 0 * log 0 = 0 at r = 1
        else:
            constant = _xlogx(rho) - rho  # K(rho)
        if self.time_weighting:
            weight = diffusion_time_weight(ratio, self.schedule, self.time_weight_cap)
        else:
            weight = torch.ones_like(ratio)
        return rho, constant, weight

    def _score_entropy(self, nll, target_logit, rho, constant):
        """Per-row score entropy from `nll = -log p(x0)` (and the target logit for the log-score form)."""
        if self.score_form == "bayes":
            return rho * nll + constant
        log_partition = target_logit + nll  # lse = logit_{x0} - log p(x0)
        return torch.exp(log_partition) - rho * target_logit + constant

    def _reduce(self, mask_terms, score_terms, num_rows: int) -> D3DiffOutput:
        if self.reduction == "none":
            return D3DiffOutput(mask_terms + self.alpha * score_terms, mask_terms, score_terms)
        mask_loss, score_loss = mask_terms.sum(), score_terms.sum()
        if self.reduction == "mean":
            mask_loss, score_loss = mask_loss / max(num_rows, 1), score_loss / max(num_rows, 1)
        return D3DiffOutput(mask_loss + self.alpha * score_loss, mask_loss, score_loss)

    # ----------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.LongTensor,
        mask_ratio: torch.Tensor | float,
        mask: torch.BoolTensor | None = None,
    ) -> D3DiffOutput:
        """
        Args:
            logits (`Tensor (M, K)` or `(B, N, K)`): logits over the K image codes only. Prefer `(M, K)` computed on
                the masked rows only; `(B, N, K)` is indexed with `mask` (a copy of the masked rows).
            targets (`LongTensor (M,)` or `(B, N)`): true code indices in [0, K).
            mask_ratio (`Tensor` or `float`): `r` per row `(M,)` (or a scalar); with 3-D logits per image `(B,)` or
                per position `(B, N)`.
            mask (`BoolTensor (B, N)`): masked positions; required with 3-D logits, forbidden otherwise.
        """
        if logits.dim() == 3:
            if mask is None or mask.shape != logits.shape[:2] or targets.shape != logits.shape[:2]:
                mask_shape = None if mask is None else tuple(mask.shape)
                raise ValueError(
                    "3-D logits (B, N, K) need targets and mask of shape (B, N); got logits "
                    f"{tuple(logits.shape)}, targets {tuple(targets.shape)}, mask {mask_shape}"
                )
            ratio = torch.as_tensor(mask_ratio, device=logits.device)
            if ratio.dim() == 1:
                ratio = ratio[:, None]
            ratio = ratio.expand(mask.shape)[mask]
            logits, targets = logits[mask], targets[mask]
        elif logits.dim() != 2 or mask is not None or targets.shape != logits.shape[:1]:
            raise ValueError(
                f"logits must be (M, K) with targets (M,) and no mask, or (B, N, K) with a mask; got logits "
                f"{tuple(logits.shape)}, targets {tuple(targets.shape)}, mask {'given' if mask is not None else None}"
            )
        else:
            ratio = mask_ratio
        num_rows, num_codes = logits.shape
        # the one (M, K) intermediate both terms share
        log_probs = torch.log_softmax(logits.to(_compute_dtype(logits.dtype)), dim=-1)
        ratio = self._row_ratio(ratio, num_rows, log_probs.dtype, logits.device)
        self._check_values(targets, ratio, num_codes)
        nll = -log_probs.gather(1, targets[:, None]).squeeze(1)
        target_logit = None
        if self.score_form == "log_score":
            target_logit = logits.gather(1, targets[:, None]).squeeze(1).to(nll.dtype)
        rho, constant, weight = self._row_constants(ratio)
        score_terms = weight * self._score_entropy(nll, target_logit, rho, constant)
        return self._reduce(nll, score_terms, num_rows)

    def forward_from_hidden(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.LongTensor,
        mask_ratio: torch.Tensor | float,
        chunk_size: int = 256,
    ) -> D3DiffOutput:
        """Fused LM head + loss, `chunk_size` rows at a time, never building the `(M, K)` logits.

        Equals `forward(F.linear(hidden, weight, bias), targets, mask_ratio)` in value and gradient. The gradients
        w.r.t. `hidden`, `weight` and `bias` are computed during the forward pass (chunk by chunk, so each chunk's
        logits are freed at once) and scaled by the incoming gradient in backward; only `loss` is differentiable,
        `mask_loss` / `score_loss` are for logging. Reductions "mean" and "sum" only.

        Args:
            hidden (`Tensor (M, H)`): final hidden states at the masked positions.
            weight (`Tensor (K, H)`), bias (`Tensor (K,)`, *optional*): the image-code rows of the LM head.
            targets (`LongTensor (M,)`): true code indices in [0, K).
            mask_ratio (`Tensor (M,)` or scalar): `r` per row.
            chunk_size (`int`): rows per chunk.
        """
        if self.reduction == "none":
            raise ValueError('forward_from_hidden supports reduction "mean" or "sum", not "none"')
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if (
            hidden.dim() != 2
            or weight.dim() != 2
            or hidden.shape[1] != weight.shape[1]
            or targets.shape != hidden.shape[:1]
        ):
            raise ValueError(
                f"expected hidden (M, H), weight (K, H), targets (M,); got {tuple(hidden.shape)}, "
                f"{tuple(weight.shape)}, {tuple(targets.shape)}"
            )
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        num_rows = hidden.shape[0]
        ratio = self._row_ratio(mask_ratio, num_rows, _compute_dtype(hidden.dtype), hidden.device)
        self._check_values(targets, ratio, weight.shape[0])
        return D3DiffOutput(*_ChunkedD3DiffFunction.apply(hidden, weight, bias, targets, ratio, self, chunk_size))


class _ChunkedD3DiffFunction(torch.autograd.Function):
    """Loss and its gradients in one chunked pass. Per row, with `p = softmax(z)` and `y = x0`:

        d(-log p_y)/dz                = p - onehot(y)
        d(bayes score)/dz             = rho (p - onehot(y))
        d(log-score score)/dz         = exp(z) - rho onehot(y) = exp(lse) p - rho onehot(y)

    so `dL/dz = a p - b onehot(y)` with per-row scalars `a = c_m + c_s (rho | exp(lse))`, `b = c_m + c_s rho`, where
    `c_m = 1 / M` (or 1 for "sum") and `c_s = alpha * w / M`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ratio, loss_fn: D3DiffLoss, chunk_size: int):
        num_rows = hidden.shape[0]
        rho, constant, score_weight = loss_fn._row_constants(ratio)
        scale = 1.0 / max(num_rows, 1) if loss_fn.reduction == "mean" else 1.0
        dtype = ratio.dtype  # float32, or float64 for float64 inputs
        needs_grad = any(ctx.needs_input_grad[:3])
        if needs_grad:  # weight / bias gradients accumulated in `dtype`, cast to the parameters' dtype at the end
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros_like(weight, dtype=dtype)
            grad_bias = torch.zeros_like(bias, dtype=dtype) if bias is not None else None
        mask_sum = hidden.new_zeros((), dtype=dtype)
        score_sum = hidden.new_zeros((), dtype=dtype)
        for start in range(0, num_rows, chunk_size):
            rows = slice(start, start + chunk_size)
            chunk_grads = (grad_hidden[rows], grad_weight, grad_bias) if needs_grad else None
            chunk_mask, chunk_score = _chunk_loss(
                loss_fn, hidden[rows], targets[rows], weight, bias,
                rho[rows], constant[rows], score_weight[rows], scale, chunk_grads,
            )
            mask_sum += chunk_mask
            score_sum += chunk_score
        mask_loss, score_loss = mask_sum * scale, score_sum * scale
        loss = mask_loss + loss_fn.alpha * score_loss
        ctx.mark_non_differentiable(mask_loss, score_loss)
        if needs_grad:
            ctx.save_for_backward(
                grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype) if grad_bias is not None else None
            )
        return loss, mask_loss, score_loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_mask_loss, grad_score_loss):
        # The saved gradients are scaled in place (no second (K, H) buffer), so a second backward through the same
        # graph (retain_graph=True) would be wrong: refuse it.
        if getattr(ctx, "consumed", False):
            raise RuntimeError("backward through D3DiffLoss.forward_from_hidden can only run once per forward")
        ctx.consumed = True
        grads = [
            g.mul_(grad_loss.to(g.dtype)) if g is not None and needed else None
            for g, needed in zip(ctx.saved_tensors, ctx.needs_input_grad[:3])
        ]
        return (*grads, None, None, None, None)


def _chunk_loss(loss_fn, hidden, targets, weight, bias, rho, constant, score_weight, scale, grads):
    """Sums of the mask and (weighted) score terms over one chunk; with `grads = (grad_hidden_rows, grad_weight,
    grad_bias)` also writes the chunk's hidden gradient and accumulates the weight / bias gradients. A function of
    its own so that the chunk's logits are freed on return, before the next chunk allocates its own."""
    dtype = rho.dtype
    y = targets[:, None]
    z = F.linear(hidden, weight, bias).to(dtype)
    target_logit = z.gather(1, y).squeeze(1)
    # logsumexp and softmax in place in the chunk's logits (torch.logsumexp would allocate a second chunk)
    row_max = z.amax(dim=-1, keepdim=True)
    probs = z.sub_(row_max).exp_()
    sum_exp = probs.sum(dim=-1, keepdim=True)
    lse = (row_max + sum_exp.log()).squeeze(1)
    nll = lse - target_logit
    scores = score_weight * loss_fn._score_entropy(nll, target_logit, rho, constant)
    if grads is not None:
        grad_hidden, grad_weight, grad_bias = grads
        c_score = loss_fn.alpha * score_weight * scale
        b = scale + c_score * rho
        a = b if loss_fn.score_form == "bayes" else scale + c_score * torch.exp(lse)
        grad_z = probs.mul_(a[:, None] / sum_exp)  # a * softmax(z), in place of the logits
        grad_z.scatter_add_(1, y, -b[:, None])
        torch.mm(grad_z.to(hidden.dtype), weight, out=grad_hidden)
        grad_weight.addmm_(grad_z.t(), hidden.to(dtype))
        if grad_bias is not None:
            grad_bias += grad_z.sum(0)
    return nll.sum(), scores.sum()
