"""MaskGIT scheduler (SPEC §5): schedule, invariants, determinism and the inverse-CDF sampler's distribution."""

import math

import pytest
import torch

from transformers_f2ace.scheduling_maskgit import MASKED, MaskGITScheduler


def _run(scheduler, logits_fn, batch, num_tokens, seed, steps):
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    sample = scheduler.initial_sample(batch, num_tokens)
    history = [sample]
    for step_index in scheduler.timesteps.tolist():
        sample = scheduler.step(logits_fn(sample), step_index, sample, generator).prev_sample
        history.append(sample)
    return history


def _random_logits(num_codes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return lambda sample: torch.randn(*sample.shape, num_codes, generator=generator) * 3


@pytest.mark.parametrize("steps", [1, 5, 12])
def test_masked_counts_follow_cosine_schedule_and_fixed_tokens_stay(steps):
    batch, num_tokens = 3, 64
    history = _run(MaskGITScheduler(), _random_logits(16), batch, num_tokens, seed=0, steps=steps)
    previous_masked = num_tokens
    for step_index, (before, after) in enumerate(zip(history, history[1:])):
        target = math.floor(num_tokens * math.cos(math.pi / 2 * (step_index + 1) / steps))
        expected = 0 if step_index == steps - 1 else max(0, min(target, previous_masked - 1))
        assert ((after == MASKED).sum(1) == expected).all(), (step_index, expected)
        fixed = before != MASKED
        assert torch.equal(after[fixed], before[fixed])  # fixed tokens never change nor get re-masked
        assert ((after[after != MASKED] >= 0) & (after[after != MASKED] < 16)).all()
        previous_masked = expected
    assert (history[-1] != MASKED).all()


def test_num_masked_after_step_and_at_least_one_unmasked():
    scheduler = MaskGITScheduler()
    scheduler.set_timesteps(16)
    counts = [scheduler.num_masked_after_step(s, 256) for s in range(16)]
    assert counts[0] == math.floor(256 * math.cos(math.pi / 32)) == 254
    assert counts[-1] == 0 and counts == sorted(counts, reverse=True)
    # with 100 steps over 8 tokens the schedule stalls; the clamp still fixes >= 1 token per step until done
    scheduler.set_timesteps(100)
    history = _run(scheduler, _random_logits(4), 2, 8, seed=1, steps=100)
    masked = [int((h == MASKED).sum(1).max()) for h in history]
    assert all(b == 0 or b < a for a, b in zip(masked, masked[1:]))


def test_seeded_determinism_and_seed_dependence():
    scheduler = MaskGITScheduler(temperature=4.5, top_k=10)
    first = _run(scheduler, _random_logits(32, seed=5), 2, 40, seed=11, steps=6)
    again = _run(scheduler, _random_logits(32, seed=5), 2, 40, seed=11, steps=6)
    other = _run(scheduler, _random_logits(32, seed=5), 2, 40, seed=12, steps=6)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[-1], other[-1])


def test_top_k_one_is_argmax_and_no_multinomial(monkeypatch):
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: pytest.fail("torch.multinomial must not be used"))
    scheduler = MaskGITScheduler(top_k=1, temperature=3.0)
    scheduler.set_timesteps(4)
    logits = torch.randn(4, 30, 50, generator=torch.Generator().manual_seed(2))
    sample = scheduler.initial_sample(4, 30)
    out = scheduler.step(logits, 0, sample, torch.Generator().manual_seed(3))
    assert torch.equal(out.pred_original_sample, logits.argmax(-1))
    fixed = out.prev_sample != MASKED
    assert torch.equal(out.prev_sample[fixed], logits.argmax(-1)[fixed])
    assert torch.equal(out.mask, out.prev_sample == MASKED)


def test_least_confident_are_remasked_without_gumbel_noise():
    """temperature=0: confidence = the model's log-prob of the (argmax) draw, log p_max = a - log(7 + e^a) rising
    with the peak a, so the positions with the flattest distributions are re-masked (top_k=1 must not flatten the
    confidences to log 1 = 0)."""
    num_tokens, num_codes = 20, 8
    peak = torch.randperm(num_tokens, generator=torch.Generator().manual_seed(4)).double()  # distinct sharpness
    logits = torch.zeros(1, num_tokens, num_codes)
    logits[0, :, 3] = peak.float() * 0.3
    scheduler = MaskGITScheduler(temperature=0.0, top_k=1)
    scheduler.set_timesteps(3)
    out = scheduler.step(logits, 0, scheduler.initial_sample(1, num_tokens))
    n = math.floor(num_tokens * math.cos(math.pi / 6))
    expected_remasked = torch.zeros(num_tokens, dtype=torch.bool)
    expected_remasked[peak.argsort()[:n]] = True  # the n flattest distributions
    assert torch.equal(out.mask[0], expected_remasked)


def test_prefilled_tokens_are_kept_and_count_clamped():
    scheduler = MaskGITScheduler()
    scheduler.set_timesteps(4)
    sample = torch.full((2, 10), MASKED)
    sample[0, :7] = torch.arange(7)  # row 0: only 3 masked, fewer than the schedule target
    out = scheduler.step(torch.randn(2, 10, 12), 0, sample, torch.Generator().manual_seed(0))
    assert torch.equal(out.prev_sample[0, :7], torch.arange(7))
    target = math.floor(10 * math.cos(math.pi / 8))
    assert (out.prev_sample[0] == MASKED).sum() == 2  # clamp: 3 masked -> at most 2 stay masked
    assert (out.prev_sample[1] == MASKED).sum() == target


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = probs > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_inverse_cdf_sampler_matches_distribution():
    probs = torch.tensor([0.05, 0.0, 0.4, 0.25, 0.0, 0.3])
    num_draws = 50_000
    uniforms = torch.rand(num_draws, generator=torch.Generator().manual_seed(0))
    draws = MaskGITScheduler.inverse_cdf_sample(probs.expand(num_draws, -1), uniforms)
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[1] == counts[4] == 0  # zero-probability codes are never drawn
    assert _chi_square(counts, probs.double()) < 20.5  # chi2(3 dof): P(> 20.5) ~ 1.3e-4
    # edge uniforms: 0 gives the first code with mass, the largest float below 1 the last
    edges = MaskGITScheduler.inverse_cdf_sample(probs.expand(2, -1) * 3, torch.tensor([0.0, 1 - 2**-24]))  # unnormalised
    assert edges.tolist() == [0, 5]


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, [0.5, 0.3, 0.15, 0.05]),
        ({"sample_temperature": 0.5}, [0.25 / 0.3575, 0.09 / 0.3575, 0.0225 / 0.3575, 0.0025 / 0.3575]),  # p^2
        ({"top_p": 0.7}, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),  # smallest prefix with mass >= 0.7
        ({"top_k": 3}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
    ],
)
def test_step_draw_distribution(kwargs, expected):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    scheduler = MaskGITScheduler(**kwargs)
    scheduler.set_timesteps(1)  # one step unmasks everything: every position is one draw
    batch, num_tokens = 100, 200
    logits = probs.log().expand(batch, num_tokens, 4)
    out = scheduler.step(logits, 0, scheduler.initial_sample(batch, num_tokens), torch.Generator().manual_seed(1))
    counts = torch.bincount(out.prev_sample.flatten(), minlength=4).double()
    expected = torch.tensor(expected, dtype=torch.float64)
    assert (counts[expected == 0] == 0).all()
    assert _chi_square(counts, expected) < 20.5


def test_non_finite_logits_raise():
    scheduler = MaskGITScheduler()
    scheduler.set_timesteps(2)
    sample = scheduler.initial_sample(1, 4)
    for bad in (math.nan, math.inf):
        logits = torch.zeros(1, 4, 6)
        logits[0, 2, 1] = bad
        with pytest.raises(ValueError, match="NaN"):
            scheduler.step(logits, 0, sample)
    banned = torch.zeros(1, 4, 6)
    banned[..., :5] = -math.inf  # -inf is a legitimate ban: only code 5 can be drawn
    assert (scheduler.step(banned, 1, sample).prev_sample == 5).all()


def test_guidance_formula():
    cond, uncond = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    w = 1.75
    expected = torch.tensor([2.75 * 1.0 - 1.75 * 0.0, 2.75 * -2.0 - 1.75 * 1.0, 0.5])
    torch.testing.assert_close(MaskGITScheduler.add_guidance(cond, uncond, w), expected)
    assert torch.equal(MaskGITScheduler.add_guidance(cond, uncond, 0.0), cond)
    with pytest.raises(ValueError, match="guidance_scale"):
        MaskGITScheduler.add_guidance(cond, uncond, -0.5)


def test_argument_validation():
    scheduler = MaskGITScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(1, 2, 3), 0, scheduler.initial_sample(1, 2))
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(bad)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="step_index"):
        scheduler.step(torch.zeros(1, 2, 3), 2, scheduler.initial_sample(1, 2))
    with pytest.raises(ValueError, match="sample"):
        scheduler.step(torch.zeros(1, 2, 3), 0, scheduler.initial_sample(1, 3))
    for kwargs, name in [
        ({"mask_schedule": "exp"}, "mask_schedule"),
        ({"temperature": -1}, "temperature"),
        ({"sample_temperature": 0}, "sample_temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
    ]:
        with pytest.raises(ValueError, match=name):
            MaskGITScheduler(**kwargs)
