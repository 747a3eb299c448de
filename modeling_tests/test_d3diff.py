"""D3Diff loss and the masking process: the mathematics of SPEC §4 checked against naive implementations."""

import math

import pytest
import torch
import torch.nn.functional as F

from transformers_f2ace.loss_d3diff import (
    MASK_SCHEDULES,
    D3DiffLoss,
    diffusion_time_weight,
    mask_image_tokens,
    mask_ratio,
    mask_ratio_derivative,
)


DTYPE = torch.float64


def _naive_schedule(t: float, schedule: str) -> float:
    return {
        "cosine": math.cos(math.pi * t / 2),
        "linear": 1 - t,
        "square": 1 - t**2,
        "cubic": 1 - t**3,
    }[schedule]


def _naive_inverse(r: torch.Tensor, schedule: str) -> torch.Tensor:
    return {
        "cosine": lambda: torch.arccos(r) * 2 / math.pi,
        "linear": lambda: 1 - r,
        "square": lambda: torch.sqrt(1 - r),
        "cubic": lambda: (1 - r) ** (1 / 3),
    }[schedule]()


def _naive_schedule_tensor(t: torch.Tensor, schedule: str) -> torch.Tensor:
    return {
        "cosine": lambda: torch.cos(math.pi * t / 2),
        "linear": lambda: 1 - t,
        "square": lambda: 1 - t**2,
        "cubic": lambda: 1 - t**3,
    }[schedule]()


def _naive_time_weight(r: torch.Tensor, schedule: str) -> torch.Tensor:
    """|d sigma_bar / dt| with sigma_bar(t) = -log(1 - r(t)), by autograd at t = r^{-1}(r)."""
    t = _naive_inverse(r.detach(), schedule).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((-torch.log(1 - _naive_schedule_tensor(t, schedule))).sum(), t)
    return grad.abs()


def _naive_d3diff(logits, targets, ratio, alpha, score_form, time_weighting=False, schedule="cosine", cap=10.0):
    """Materialises the concrete score s (M, K) explicitly and applies the SEDD formula term by term."""
    probs = torch.softmax(logits, dim=-1)
    ce = -torch.log(probs[torch.arange(len(targets)), targets])
    s = probs / ratio[:, None] if score_form == "bayes" else torch.exp(logits)
    rho = (1 - ratio) / ratio
    k_rho = torch.where(rho > 0, rho * (torch.log(rho) - 1), torch.zeros_like(rho))
    score = s.sum(-1) - rho * torch.log(s[torch.arange(len(targets)), targets]) + k_rho
    if time_weighting:
        score = score * _naive_time_weight(ratio, schedule).clamp(max=cap)
    return ce.mean() + alpha * score.mean(), ce, score


# ------------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("schedule", ["cosine", "linear", "square", "cubic"])
def test_schedule_values_and_derivative(schedule):
    t = torch.tensor([0.0, 0.2, 1 / 3, 0.5, 0.9, 1.0], dtype=DTYPE)
    expected = torch.tensor([_naive_schedule(float(v), schedule) for v in t], dtype=DTYPE)
    torch.testing.assert_close(mask_ratio(t, schedule), expected)
    assert mask_ratio(torch.tensor(0.0), schedule) == 1  # fully masked at t = 0
    # |dr/dt| against finite differences
    t_inner = torch.tensor([0.1, 0.4, 0.7], dtype=DTYPE)
    h = 1e-6
    finite_diff = (mask_ratio(t_inner + h, schedule) - mask_ratio(t_inner - h, schedule)).abs() / (2 * h)
    torch.testing.assert_close(mask_ratio_derivative(t_inner, schedule), finite_diff, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "square", "cubic"])
def test_time_weight_is_derivative_of_sigma_bar(schedule):
    r = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.97], dtype=DTYPE)
    torch.testing.assert_close(diffusion_time_weight(r, schedule), _naive_time_weight(r, schedule))
    capped = diffusion_time_weight(torch.tensor([0.5, 0.999999, 1.0], dtype=DTYPE), schedule, cap=3.0)
    assert capped[1] == capped[2] == 3.0 and capped[0] <= 3.0


def test_unknown_schedule_lists_accepted_names():
    with pytest.raises(ValueError, match="cosine.*linear"):
        mask_ratio(torch.tensor(0.5), "exponential")
    with pytest.raises(ValueError, match="accepted"):
        D3DiffLoss(schedule="nope")
    with pytest.raises(ValueError, match="accepted"):
        mask_image_tokens(torch.zeros(1, 4, dtype=torch.long), 9, schedule="nope")


# ------------------------------------------------------------------------------------------------ score entropy
@pytest.mark.parametrize("score_form", ["bayes", "log_score"])
def test_score_entropy_nonnegative(score_form):
    gen = torch.Generator().manual_seed(0)
    num_rows, num_codes = 400, 17
    logits = torch.randn(num_rows, num_codes, generator=gen, dtype=DTYPE) * torch.logspace(-2, 1, num_rows, dtype=DTYPE)[:, None]
    targets = torch.randint(0, num_codes, (num_rows,), generator=gen)
    ratio = torch.cat([torch.tensor([1.0, 1e-4, 0.5], dtype=DTYPE), torch.rand(num_rows - 3, generator=gen, dtype=DTYPE)])
    out = D3DiffLoss(score_form=score_form, reduction="none")(logits, targets, ratio)
    assert out.score_loss.shape == (num_rows,)
    assert torch.isfinite(out.score_loss).all()
    assert (out.score_loss >= -1e-12).all()


def test_log_score_zero_at_true_ratio_and_positive_elsewhere():
    """The score entropy vanishes exactly at the true concrete score: s_{x0} = rho, s_v = 0 otherwise."""
    num_codes = 6
    ratio = torch.tensor([0.2, 0.5, 0.9], dtype=DTYPE)
    rho = (1 - ratio) / ratio
    targets = torch.tensor([0, 3, 5])
    logits = torch.full((3, num_codes), -1e4, dtype=DTYPE)  # exp(-1e4) == 0: the one-hot limit
    logits[torch.arange(3), targets] = torch.log(rho)
    loss = D3DiffLoss(score_form="log_score", reduction="none")
    torch.testing.assert_close(loss(logits, targets, ratio).score_loss, torch.zeros(3, dtype=DTYPE), rtol=0, atol=1e-15)
    for delta in (-0.1, 0.1):  # moving s_{x0} off rho costs rho * (e^d - 1 - d) > 0
        moved = logits.clone()
        moved[torch.arange(3), targets] += delta
        expected = rho * (math.exp(delta) - 1 - delta)
        torch.testing.assert_close(loss(moved, targets, ratio).score_loss, expected)


def test_calibrated_score_is_reweighted_cross_entropy():
    """SPEC §4: with s = rho * p_theta the term is exactly rho * (-log p_theta(x0)); 0 when p_theta is one-hot."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(50, 9, generator=gen, dtype=DTYPE)
    targets = torch.randint(0, 9, (50,), generator=gen)
    ratio = torch.rand(50, generator=gen, dtype=DTYPE) * 0.98 + 0.01
    rho = (1 - ratio) / ratio
    log_p = torch.log_softmax(z, -1)
    calibrated_logits = torch.log(rho)[:, None] + log_p  # log s = log(rho * p)
    out = D3DiffLoss(score_form="log_score", reduction="none")(calibrated_logits, targets, ratio)
    torch.testing.assert_close(out.score_loss, rho * -log_p[torch.arange(50), targets])


def test_bayes_form_closed_form_identity():
    """Literal s = p / r:  1/r - rho log(p/r) + rho log rho - rho = rho (-log p) + 1 + rho log(1 - r)."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(300, 11, generator=gen, dtype=DTYPE) * 3
    targets = torch.randint(0, 11, (300,), generator=gen)
    ratio = torch.rand(300, generator=gen, dtype=DTYPE).clamp(min=1e-3, max=1 - 1e-3)
    _, _, literal = _naive_d3diff(logits, targets, ratio, 0.01, "bayes")
    rho = (1 - ratio) / ratio
    nll = -torch.log_softmax(logits, -1)[torch.arange(300), targets]
    constant = 1 + rho * torch.log(1 - ratio)
    torch.testing.assert_close(literal, rho * nll + constant)
    assert (constant > 0).all() and (constant <= 1).all()
    out = D3DiffLoss(score_form="bayes", reduction="none")(logits, targets, ratio)
    torch.testing.assert_close(out.score_loss, literal)
    torch.testing.assert_close(out.mask_loss, nll)
    # r = 1 (everything masked): rho = 0, the term is the constant 1 (0 * log 0 = 0)
    full = D3DiffLoss(reduction="none")(logits[:2], targets[:2], torch.ones(2, dtype=DTYPE))
    torch.testing.assert_close(full.score_loss, torch.ones(2, dtype=DTYPE))


@pytest.mark.parametrize("score_form", ["bayes", "log_score"])
@pytest.mark.parametrize("time_weighting", [False, True])
def test_values_and_gradients_match_naive_autograd(score_form, time_weighting):
    gen = torch.Generator().manual_seed(3)
    num_rows, num_codes = 40, 13
    logits = (torch.randn(num_rows, num_codes, generator=gen, dtype=DTYPE) * 2).requires_grad_(True)
    targets = torch.randint(0, num_codes, (num_rows,), generator=gen)
    ratio = torch.rand(num_rows, generator=gen, dtype=DTYPE).clamp(0.02, 0.995)
    alpha, cap = 0.37, 6.0  # the cap binds for r close to 1
    loss_fn = D3DiffLoss(alpha=alpha, score_form=score_form, time_weighting=time_weighting, time_weight_cap=cap)
    out = loss_fn(logits, targets, ratio)
    naive, naive_ce, naive_score = _naive_d3diff(logits, targets, ratio, alpha, score_form, time_weighting, cap=cap)
    torch.testing.assert_close(out.loss, naive, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.mask_loss, naive_ce.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.score_loss, naive_score.mean(), rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(out.loss, logits)
    (naive_grad,) = torch.autograd.grad(naive, logits)
    torch.testing.assert_close(grad, naive_grad, rtol=1e-10, atol=1e-12)


def test_three_d_input_equals_masked_rows():
    gen = torch.Generator().manual_seed(4)
    batch, num_tokens, num_codes = 3, 10, 7
    logits = torch.randn(batch, num_tokens, num_codes, generator=gen, dtype=DTYPE)
    targets = torch.randint(0, num_codes, (batch, num_tokens), generator=gen)
    mask = torch.rand(batch, num_tokens, generator=gen) < 0.5
    per_image = torch.tensor([0.3, 0.6, 0.9], dtype=DTYPE)
    loss_fn = D3DiffLoss(alpha=0.5, score_form="log_score")
    rows = loss_fn(logits[mask], targets[mask], per_image[:, None].expand(batch, num_tokens)[mask])
    torch.testing.assert_close(loss_fn(logits, targets, per_image, mask=mask).loss, rows.loss)
    per_position = per_image[:, None].expand(batch, num_tokens)
    torch.testing.assert_close(loss_fn(logits, targets, per_position, mask=mask).loss, rows.loss)
    with pytest.raises(ValueError, match="mask"):
        loss_fn(logits, targets, per_image)


def test_reductions_and_scalar_ratio():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(8, 5, generator=gen, dtype=DTYPE)
    targets = torch.randint(0, 5, (8,), generator=gen)
    none = D3DiffLoss(alpha=0.2, reduction="none")(logits, targets, 0.4)
    total = D3DiffLoss(alpha=0.2, reduction="sum")(logits, targets, torch.full((8,), 0.4, dtype=DTYPE))
    mean = D3DiffLoss(alpha=0.2)(logits, targets, 0.4)
    torch.testing.assert_close(total.loss, none.loss.sum())
    torch.testing.assert_close(mean.loss, none.loss.mean())
    torch.testing.assert_close(mean.loss, mean.mask_loss + 0.2 * mean.score_loss)


def test_no_masked_position_gives_graph_connected_zero():
    logits = torch.randn(0, 5, requires_grad=True)
    out = D3DiffLoss()(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert out.loss.item() == 0 and out.loss.requires_grad
    out.loss.backward()
    assert logits.grad.shape == (0, 5)
    hidden, weight, bias = torch.randn(0, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True), torch.randn(5, requires_grad=True)
    fused = D3DiffLoss().forward_from_hidden(hidden, weight, bias, torch.zeros(0, dtype=torch.long), 0.5)
    assert fused.loss.item() == 0
    fused.loss.backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


def test_invalid_inputs():
    logits = torch.randn(4, 5)
    with pytest.raises(ValueError, match="image-code indices"):
        D3DiffLoss()(logits, torch.tensor([0, 1, 5, 2]), 0.5)  # 5 >= K: e.g. a unified-vocab id
    with pytest.raises(ValueError, match="mask_ratio"):
        D3DiffLoss()(logits, torch.tensor([0, 1, 2, 3]), torch.tensor([0.5, 0.0, 0.5, 0.5]))
    with pytest.raises(ValueError, match="mask_ratio"):
        D3DiffLoss()(logits, torch.tensor([0, 1, 2, 3]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="score_form"):
        D3DiffLoss(score_form="calibrated")
    with pytest.raises(ValueError, match="reduction"):
        D3DiffLoss(reduction="max")
    with pytest.raises(ValueError, match="alpha"):
        D3DiffLoss(alpha=-1)


# ------------------------------------------------------------------------------------------------ chunked fused path
@pytest.mark.parametrize("score_form", ["bayes", "log_score"])
@pytest.mark.parametrize("time_weighting", [False, True])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_path_equals_plain(score_form, time_weighting, use_bias, reduction):
    gen = torch.Generator().manual_seed(6)
    num_rows, hidden_size, num_codes = 37, 12, 19
    hidden = (torch.randn(num_rows, hidden_size, generator=gen, dtype=DTYPE) * 0.5).requires_grad_(True)
    weight = (torch.randn(num_codes, hidden_size, generator=gen, dtype=DTYPE) * 0.5).requires_grad_(True)
    bias = torch.randn(num_codes, generator=gen, dtype=DTYPE).requires_grad_(True) if use_bias else None
    targets = torch.randint(0, num_codes, (num_rows,), generator=gen)
    ratio = torch.rand(num_rows, generator=gen, dtype=DTYPE).clamp(0.02, 1.0)
    loss_fn = D3DiffLoss(alpha=0.3, score_form=score_form, time_weighting=time_weighting, reduction=reduction)
    params = [p for p in (hidden, weight, bias) if p is not None]
    plain = loss_fn(F.linear(hidden, weight, bias), targets, ratio)
    plain_grads = torch.autograd.grad(plain.loss * 1.7, params)  # a non-unit incoming gradient
    fused = loss_fn.forward_from_hidden(hidden, weight, bias, targets, ratio, chunk_size=8)  # 37 = 4 * 8 + 5
    fused_grads = torch.autograd.grad(fused.loss * 1.7, params)
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    for a, b in zip(plain_grads, fused_grads):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-12)
    assert not fused.mask_loss.requires_grad and not fused.score_loss.requires_grad


def test_chunked_path_float32_grad_accumulation_and_no_grad():
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(64, 16, generator=gen, requires_grad=True)
    lm_head = torch.nn.Linear(16, 40)
    code_rows = slice(8, 40)  # image codes are a slice of a unified-vocab head
    targets = torch.randint(0, 32, (64,), generator=gen)
    loss_fn = D3DiffLoss()
    plain = loss_fn(F.linear(hidden, lm_head.weight[code_rows], lm_head.bias[code_rows]), targets, 0.5)
    plain.loss.backward()
    expected = (hidden.grad.clone(), lm_head.weight.grad.clone(), lm_head.bias.grad.clone())
    hidden.grad = lm_head.weight.grad = lm_head.bias.grad = None
    fused = loss_fn.forward_from_hidden(hidden, lm_head.weight[code_rows], lm_head.bias[code_rows], targets, 0.5, chunk_size=16)
    fused.loss.backward()
    for got, want in zip((hidden.grad, lm_head.weight.grad, lm_head.bias.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(lm_head.weight.grad[:8], torch.zeros(8, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            loss_fn.forward_from_hidden(hidden, lm_head.weight[code_rows], lm_head.bias[code_rows], targets, 0.5).loss,
            plain.loss.detach(),
        )
    with pytest.raises(RuntimeError, match="only run once"):
        again = loss_fn.forward_from_hidden(hidden, lm_head.weight[code_rows], None, targets, 0.5)
        again.loss.backward(retain_graph=True)
        again.loss.backward()
    with pytest.raises(ValueError, match="reduction"):
        D3DiffLoss(reduction="none").forward_from_hidden(hidden, lm_head.weight, None, targets, 0.5)


# ------------------------------------------------------------------------------------------------ masking
def test_masking_counts_follow_schedule():
    batch, num_tokens, mask_id = 64, 50, 1000
    gen = torch.Generator().manual_seed(8)
    codes = torch.randint(0, 100, (batch, num_tokens), generator=gen)
    t = torch.rand(batch, generator=gen)
    t[:3] = torch.tensor([0.0, 1.0, 0.999])  # all masked; r = 0 and r ~ 0 -> min_masked
    for min_masked in (1, 4):
        out = mask_image_tokens(codes, mask_id, gen, min_masked=min_masked, t=t)
        expected = torch.tensor(
            [max(min_masked, round(num_tokens * math.cos(math.pi * float(ti) / 2))) for ti in t]
        )
        assert torch.equal(out.mask.sum(1), expected)
        assert expected[0] == num_tokens and expected[1] == min_masked == expected[2]
        assert torch.equal(out.mask_ratio, expected.float() / num_tokens)
        assert ((out.mask_ratio > 0) & (out.mask_ratio <= 1)).all()
        assert torch.equal(out.input_ids[out.mask], torch.full((int(expected.sum()),), mask_id))
        assert torch.equal(out.input_ids[~out.mask], codes[~out.mask])


def test_masking_seeded_reproducible_and_seed_dependent():
    codes = torch.randint(0, 100, (8, 64))
    first = mask_image_tokens(codes, 7, torch.Generator().manual_seed(123), schedule="linear")
    again = mask_image_tokens(codes, 7, torch.Generator().manual_seed(123), schedule="linear")
    other = mask_image_tokens(codes, 7, torch.Generator().manual_seed(124), schedule="linear")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first.mask, other.mask)


def test_masked_fraction_mean_and_position_uniformity():
    gen = torch.Generator().manual_seed(9)
    batch, num_tokens = 2000, 400
    out = mask_image_tokens(torch.zeros(batch, num_tokens, dtype=torch.long), 1, gen)
    # E[cos(pi t / 2)] = 2 / pi; std of cos(pi t/2) ~ 0.31, so the mean's std is ~0.007
    assert abs(out.mask_ratio.mean().item() - 2 / math.pi) < 0.025
    # with a fixed t every position is masked with probability n / N = 1/2 (no position preference)
    half = mask_image_tokens(torch.zeros(batch, 20, dtype=torch.long), 1, gen, t=torch.full((batch,), 2 / 3))
    assert (half.mask.sum(1) == 10).all()
    frequency = half.mask.double().mean(0)  # binomial std sqrt(0.25 / 2000) ~ 0.011
    assert (frequency - 0.5).abs().max() < 0.05


def test_masking_invalid_arguments():
    with pytest.raises(ValueError, match="min_masked"):
        mask_image_tokens(torch.zeros(2, 4, dtype=torch.long), 9, min_masked=5)
    with pytest.raises(ValueError, match="codes"):
        mask_image_tokens(torch.zeros(8, dtype=torch.long), 9)
    with pytest.raises(ValueError, match="t must"):
        mask_image_tokens(torch.zeros(2, 4, dtype=torch.long), 9, t=torch.zeros(3))


def test_schedules_registry_is_what_errors_advertise():
    assert set(MASK_SCHEDULES) == {"cosine", "linear", "square", "cubic"}


def test_chunked_path_bfloat16_matches_plain():
    gen = torch.Generator().manual_seed(10)
    hidden = torch.randn(48, 32, generator=gen).bfloat16().requires_grad_(True)
    weight = (torch.randn(64, 32, generator=gen) * 0.2).bfloat16().requires_grad_(True)
    targets = torch.randint(0, 64, (48,), generator=gen)
    loss_fn = D3DiffLoss(alpha=0.5)
    plain = loss_fn(F.linear(hidden, weight), targets, 0.3)
    plain_grads = torch.autograd.grad(plain.loss, (hidden, weight))
    fused = loss_fn.forward_from_hidden(hidden, weight, None, targets, 0.3, chunk_size=16)
    fused_grads = torch.autograd.grad(fused.loss, (hidden, weight))
    assert fused.loss.dtype == torch.float32 and fused_grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(fused.loss, plain.loss)
    for got, want in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-3)
