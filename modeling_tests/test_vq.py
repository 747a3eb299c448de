"""Tests of the MAGVIT-v2 style image tokenizer (`UniF2aceVQModel`) and its lookup-free quantizer."""

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_pre_hook

from transformers_f2ace.configuration_unif2ace_vq import UniF2aceVQConfig
from transformers_f2ace.modeling_unif2ace_vq import (
    UniF2aceVQModel,
    UniF2aceVQOutput,
    bits_to_codes,
    codes_to_bits,
    lfq_entropy_loss,
)
from transformers_f2ace.training.vq import lr_factor, train_vq


def vq_config(**overrides) -> UniF2aceVQConfig:
    kwargs = dict(resolution=32, base_channels=8, channel_multipliers=[1, 2, 2, 2], num_res_blocks=1, codebook_bits=4)
    kwargs.update(overrides)
    return UniF2aceVQConfig(**kwargs)


def vq_model(seed: int = 0, **overrides) -> UniF2aceVQModel:
    torch.manual_seed(seed)
    return UniF2aceVQModel(vq_config(**overrides)).eval()


def shape_images(num_images: int, resolution: int, seed: int) -> torch.Tensor:
    """Flat-coloured backgrounds with one square or circle of another colour; float (N, 3, R, R) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:resolution, :resolution]
    images = []
    for i in range(num_images):
        image = np.broadcast_to(rng.uniform(-1, 1, 3), (resolution, resolution, 3)).copy()
        cx, cy = rng.integers(8, resolution - 8, size=2)
        radius = rng.integers(4, 9)
        if i % 2:
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
        else:
            inside = (abs(xx - cx) < radius) & (abs(yy - cy) < radius)
        image[inside] = rng.uniform(-1, 1, 3)
        images.append(torch.from_numpy(image).float().permute(2, 0, 1))
    return torch.stack(images)


# ---------------------------------------------------------------- shapes and API


def test_encode_decode_shapes_and_ranges():
    model = vq_model()
    pixel_values = shape_images(2, 32, seed=0)
    codes = model.encode(pixel_values)
    assert codes.shape == (2, 16) and codes.dtype == torch.long  # 32 / 8 = 4 -> 4 x 4 tokens
    assert codes.min() >= 0 and codes.max() < 16
    images = model.decode(codes)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1


def test_forward_output_and_loss_composition():
    config = vq_config()
    model = vq_model()
    pixel_values = shape_images(2, 32, seed=1)
    output = model(pixel_values)
    assert isinstance(output, UniF2aceVQOutput)
    assert output.reconstruction.shape == (2, 3, 32, 32)
    assert torch.equal(output.codes, model.encode(pixel_values))
    expected = (
        output.reconstruction_loss
        + config.commitment_loss_weight * output.commitment_loss
        + config.entropy_loss_weight * output.entropy_loss
    )
    torch.testing.assert_close(output.loss, expected)
    without = model(pixel_values, return_loss=False)
    assert without.loss is None and without.entropy_loss is None
    torch.testing.assert_close(without.reconstruction, output.reconstruction)


def test_forward_reconstruction_equals_decode_of_encode():
    """The forward pass decodes the same codes (in the same raster order) that `encode`/`decode` use."""
    model = vq_model()
    pixel_values = shape_images(3, 32, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values, return_loss=False).reconstruction, model.decode(model.encode(pixel_values))
        )


def test_commitment_loss_matches_naive_formula():
    model = vq_model()
    pixel_values = shape_images(2, 32, seed=3)
    with torch.no_grad():
        latents = model.encoder(pixel_values)
        output = model(pixel_values)
    naive = ((latents - torch.where(latents > 0, 1.0, -1.0)) ** 2).mean()
    torch.testing.assert_close(output.commitment_loss, naive)


def test_group_norm_works_for_widths_not_divisible_by_32():
    model = vq_model(base_channels=6, channel_multipliers=[1, 3])  # widths 6 and 18 -> 2 groups each
    assert model.encoder.conv_in.out_channels == 6
    assert model.encoder.stages[0].blocks[0].norm1.num_groups == 2
    assert model.decode(model.encode(shape_images(1, 32, seed=0))).shape == (1, 3, 32, 32)


# ---------------------------------------------------------------- determinism


def test_determinism_of_init_encode_and_forward():
    model_a, model_b = vq_model(seed=5), vq_model(seed=5)
    for (name, param_a), param_b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(param_a, param_b), name
    pixel_values = shape_images(2, 32, seed=4)
    assert torch.equal(model_a.encode(pixel_values), model_a.encode(pixel_values))
    assert torch.equal(model_a(pixel_values).loss, model_b(pixel_values).loss)
    assert not torch.equal(vq_model(seed=6).encoder.conv_in.weight, model_a.encoder.conv_in.weight)


# ---------------------------------------------------------------- lookup-free quantizer


def test_codes_bits_round_trip_for_every_code():
    num_bits = 4
    codes = torch.arange(2**num_bits)
    bits = codes_to_bits(codes, num_bits)
    assert bits.shape == (16, 4)
    assert torch.equal(bits_to_codes(bits), codes)
    assert torch.equal(bits_to_codes(bits.bool()), codes)
    # every bit pattern occurs exactly once
    assert len({tuple(row) for row in bits.tolist()}) == 16


def test_bit_order_hand_example():
    # 6 = 0*1 + 1*2 + 1*4 + 0*8: bit k is the coefficient of 2**k (channel 0 is the least significant bit)
    assert codes_to_bits(torch.tensor(6), 4).tolist() == [0, 1, 1, 0]
    assert codes_to_bits(torch.tensor(9), 4).tolist() == [1, 0, 0, 1]
    assert bits_to_codes(torch.tensor([1, 1, 0, 1])).item() == 11
    # the quantizer reads the latent channels as bits: signs (-, +, +, -) -> code 6
    model = vq_model()
    latents = torch.tensor([-0.3, 2.0, 0.1, -5.0]).view(1, 4, 1, 1)
    quantized, codes = model.quantizer(latents)
    assert codes.tolist() == [[[6]]]
    assert quantized.flatten().tolist() == [-1.0, 1.0, 1.0, -1.0]
    assert model.quantizer.codes_to_quantized(codes, torch.float32).flatten().tolist() == [-1.0, 1.0, 1.0, -1.0]


def test_quantizer_grid_is_raster_order():
    model = vq_model()
    grid = torch.tensor([[3, 12], [5, 0]])  # rows of a 2 x 2 latent grid
    corners = 2.0 * codes_to_bits(grid, 4).permute(2, 0, 1).unsqueeze(0) - 1.0  # (1, 4, 2, 2)
    _, codes = model.quantizer(0.5 * corners)
    assert codes.flatten(1).tolist() == [[3, 12, 5, 0]]


def test_straight_through_gradient_is_identity_and_reaches_the_encoder():
    model = vq_model()
    latents = torch.randn(2, 4, 3, 3, requires_grad=True)
    weights = torch.randn(2, 4, 3, 3)
    quantized, _ = model.quantizer(latents)
    (quantized * weights).sum().backward()
    torch.testing.assert_close(latents.grad, weights)

    model.train()
    model(shape_images(2, 32, seed=6)).reconstruction_loss.backward()
    for param in (model.encoder.conv_in.weight, model.encoder.conv_out.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


# ---------------------------------------------------------------- entropy loss


def naive_code_distribution(latents: torch.Tensor, temperature: float) -> torch.Tensor:
    """p(c | z) = softmax_c(-||z - c||^2 / T) over all 2**K corners, one row per latent vector: (B*h*w, 2**K)."""
    num_bits = latents.shape[1]
    corners = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=num_bits)))  # (2**K, K), any order
    vectors = latents.permute(0, 2, 3, 1).reshape(-1, num_bits)
    distances = ((vectors[:, None, :] - corners[None]) ** 2).sum(-1)
    return torch.softmax(-distances / temperature, dim=-1), corners


def entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def test_entropy_terms_match_naive_full_codebook_softmax():
    torch.manual_seed(0)
    latents = 0.5 * torch.randn(3, 4, 2, 2, dtype=torch.float64)
    temperature = 1.0
    loss, per_sample, codebook = lfq_entropy_loss(latents, temperature)

    probs, corners = naive_code_distribution(latents, temperature)
    # the per-sample term is exact: mean entropy of the full 16-way distributions
    torch.testing.assert_close(per_sample, entropy(probs).mean())
    # the codebook term is the factorised approximation: per-bit marginals of the batch-mean distribution
    mean_probs = probs.mean(0)
    p_plus = torch.stack([mean_probs[corners[:, k] > 0].sum() for k in range(4)])
    factorised = entropy(torch.stack([p_plus, 1 - p_plus], dim=-1)).sum()
    torch.testing.assert_close(codebook, factorised)
    assert entropy(mean_probs) <= codebook + 1e-9  # it upper-bounds the exact codebook entropy
    torch.testing.assert_close(loss, per_sample - codebook)


def test_entropy_loss_prefers_spread_confident_codes():
    temperature = 0.01
    all_codes = torch.arange(16).view(1, 4, 4)
    spread = 2.0 * codes_to_bits(all_codes, 4).permute(0, 3, 1, 2).double() - 1.0  # 16 distinct corners
    identical = torch.ones_like(spread)  # every position is code 15
    loss_spread, per_sample_spread, codebook_spread = lfq_entropy_loss(spread, temperature)
    loss_identical, per_sample_identical, codebook_identical = lfq_entropy_loss(identical, temperature)

    # on the corners, sigmoid(4 / 0.01) is 1 to float64 precision: no per-sample uncertainty
    assert per_sample_spread.item() == pytest.approx(0.0, abs=1e-9)
    assert per_sample_identical.item() == pytest.approx(0.0, abs=1e-9)
    # every bit is +1 in exactly half of the 16 codes: 4 fair coins = 4 ln 2 nats; one code only: 0 nats
    assert codebook_spread.item() == pytest.approx(4 * math.log(2), rel=1e-9)
    assert codebook_identical.item() == pytest.approx(0.0, abs=1e-9)
    assert loss_spread.item() == pytest.approx(-4 * math.log(2), rel=1e-9)
    assert loss_spread < loss_identical

    # unconfident latents (all at 0) are penalised by the per-sample term: 4 fair coins per position
    undecided_loss, undecided_per_sample, _ = lfq_entropy_loss(torch.zeros_like(spread), temperature)
    assert undecided_per_sample.item() == pytest.approx(4 * math.log(2), rel=1e-9)
    assert undecided_loss.item() == pytest.approx(0.0, abs=1e-9)
    assert loss_spread < undecided_loss


# ---------------------------------------------------------------- save / load


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    model = vq_model(seed=3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = UniF2aceVQModel.from_pretrained(tmp_path).eval()
    config_fields = {key: value for key, value in model.config.to_dict().items() if key != "_name_or_path"}
    assert {key: value for key, value in loaded.config.to_dict().items() if key != "_name_or_path"} == config_fields
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name in state:
        assert torch.equal(state[name], loaded_state[name]), name
    pixel_values = shape_images(2, 32, seed=7)
    assert torch.equal(loaded.encode(pixel_values), model.encode(pixel_values))
    assert torch.equal(loaded(pixel_values).loss, model(pixel_values).loss)


# ---------------------------------------------------------------- training


def test_short_training_lowers_reconstruction_loss():
    model = vq_model(seed=0)
    images = shape_images(8, 32, seed=0)
    with torch.no_grad():
        initial = model(images).reconstruction_loss.item()
    final_losses = train_vq(model, images, steps=60, lr=3e-3, batch_size=8, seed=0, progress=False)
    assert set(final_losses) == {"loss", "reconstruction_loss", "commitment_loss", "entropy_loss"}
    with torch.no_grad():
        final = model(images).reconstruction_loss.item()
    # measured: final / initial = 0.39, 0.37, 0.29 for seeds 0, 1, 2
    assert final < 0.6 * initial, (initial, final)
    assert not model.training


def test_bf16_autocast_training_runs_the_convolutions_in_bf16_and_keeps_fp32_weights():
    model = vq_model(seed=0)
    images = shape_images(8, 32, seed=0)
    with torch.no_grad():
        initial = model(images).reconstruction_loss.item()
    dtypes = set()
    model.encoder.conv_in.register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    train_vq(model, images, steps=60, lr=3e-3, batch_size=8, seed=0, progress=False, autocast_dtype=torch.bfloat16)
    assert dtypes == {torch.bfloat16}
    assert {param.dtype for param in model.parameters()} == {torch.float32}
    with torch.no_grad():
        final = model(images).reconstruction_loss.item()
    assert final < 0.6 * initial, (initial, final)  # the fp32 test's bound


def test_training_is_deterministic_and_saves(tmp_path):
    images = shape_images(4, 32, seed=1)
    model_a, model_b = vq_model(seed=1), vq_model(seed=1)
    losses_a = train_vq(model_a, images, steps=3, lr=1e-3, batch_size=3, seed=7, progress=False)
    losses_b = train_vq(model_b, images, steps=3, lr=1e-3, batch_size=3, seed=7, progress=False, output_dir=tmp_path)
    assert losses_a == losses_b
    loaded = UniF2aceVQModel.from_pretrained(tmp_path)
    for name, param in model_a.state_dict().items():
        assert torch.equal(param, loaded.state_dict()[name]), name


def test_training_accepts_pil_images():
    images = shape_images(3, 32, seed=2)
    pil_images = [
        Image.fromarray(((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for image in images
    ]
    losses = train_vq(vq_model(), pil_images, steps=2, lr=1e-3, batch_size=2, seed=0, progress=False)
    assert all(math.isfinite(value) for value in losses.values())


def test_training_rejects_bad_arguments():
    model, images = vq_model(), shape_images(2, 32, seed=0)
    with pytest.raises(ValueError, match="steps and batch_size must be >= 1"):
        train_vq(model, images, steps=0, lr=1e-3, batch_size=2, seed=0, progress=False)
    with pytest.raises(ValueError, match="lr must be > 0"):
        train_vq(model, images, steps=1, lr=0.0, batch_size=2, seed=0, progress=False)
    with pytest.raises(ValueError, match="images is empty"):
        train_vq(model, [], steps=1, lr=1e-3, batch_size=2, seed=0, progress=False)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        train_vq(model, images, steps=1, lr=1e-3, batch_size=2, seed=0, progress=False, lr_schedule="step")


def test_lr_schedule_warms_up_then_decays_to_zero():
    # warm-up 2 of 6 steps: 1/3, 2/3, then the cosine over the 4 remaining steps: 1, cos² of 22.5°, 45°, 67.5°
    factors = [lr_factor(step, 6, 2, "cosine") for step in range(6)]
    expected = [1 / 3, 2 / 3, 1.0, math.cos(math.pi / 8) ** 2, 0.5, math.cos(3 * math.pi / 8) ** 2]
    assert factors == pytest.approx(expected)
    assert lr_factor(6, 6, 2, "cosine") == pytest.approx(0.0)
    assert [lr_factor(step, 6, 2, "constant") for step in range(2, 6)] == [1.0] * 4


def test_cosine_training_uses_the_schedule():
    model, images = vq_model(seed=0), shape_images(4, 32, seed=0)
    seen = []  # the learning rate of every optimizer step, observed through torch's global step hook
    handle = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append(optimizer.param_groups[0]["lr"]))
    try:
        train_vq(model, images, steps=4, lr=1e-3, batch_size=2, seed=0, progress=False, lr_schedule="cosine",
                 warmup_steps=1)
    finally:
        handle.remove()
    # warm-up 1 of 4 steps: 1/2; then the cosine over 3 steps: 1, cos² 30°, cos² 60°
    assert seen == pytest.approx([5e-4, 1e-3, 1e-3 * math.cos(math.pi / 6) ** 2, 1e-3 * math.cos(math.pi / 3) ** 2])


# ---------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 1, 32, 32), r"pixel_values must have shape \(batch_size, 3, 32, 32\).*got \(1, 1, 32, 32\)"),
        ((1, 3, 64, 64), r"pixel_values must have shape \(batch_size, 3, 32, 32\).*got \(1, 3, 64, 64\)"),
        ((3, 32, 32), r"pixel_values must have shape \(batch_size, 3, 32, 32\).*got \(3, 32, 32\)"),
    ],
)
def test_bad_pixel_values_raise(shape, message):
    model = vq_model()
    with pytest.raises(ValueError, match=message):
        model.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape))


def test_integer_pixel_values_raise():
    with pytest.raises(ValueError, match=r"pixel_values must be a float tensor in \[-1, 1\]"):
        vq_model().encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize(
    "codes, message",
    [
        (torch.full((1, 16), 16), r"codes must lie in \[0, 16\).*got values in \[16, 16\]"),
        (torch.full((1, 16), -1), r"codes must lie in \[0, 16\).*got values in \[-1, -1\]"),
        (torch.zeros(1, 15, dtype=torch.long), r"codes must have shape \(batch_size, 16\).*got \(1, 15\)"),
        (torch.zeros(16, dtype=torch.long), r"codes must have shape \(batch_size, 16\).*got \(16,\)"),
        (torch.zeros(1, 16), r"codes must be an integer tensor, got dtype torch.float32"),
    ],
)
def test_bad_codes_raise(codes, message):
    with pytest.raises(ValueError, match=message):
        vq_model().decode(codes)


def test_vq_loads_through_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModel

    from transformers_f2ace import UniF2aceVQConfig, UniF2aceVQModel

    config = UniF2aceVQConfig(resolution=32, base_channels=8, channel_multipliers=[1, 2, 2, 2], num_res_blocks=1,
                              codebook_bits=4)
    model = UniF2aceVQModel(config).eval()
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is UniF2aceVQConfig
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is UniF2aceVQModel
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(pixels), model.encode(pixels))


def test_vq_forward_accepts_return_dict_false():
    from transformers_f2ace import UniF2aceVQConfig, UniF2aceVQModel

    config = UniF2aceVQConfig(resolution=32, base_channels=8, channel_multipliers=[1, 2, 2, 2], num_res_blocks=1,
                              codebook_bits=4)
    model = UniF2aceVQModel(config).eval()
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    as_tuple = model(pixels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], model(pixels).reconstruction)
