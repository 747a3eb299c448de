"""MAGVIT-v2 style image tokenizer with a lookup-free quantizer (LFQ).

An image `(B, 3, H, W)` in `[-1, 1]` is encoded to a latent `(B, K, h, w)` with `K = config.codebook_bits` and
`h = w = config.latent_size`; each latent vector is quantized to its sign pattern `q in {-1, +1}^K`, which *is* the
code (no codebook lookup). Codes are integers in `[0, 2**K)`:

    code = sum_k bit_k * 2**k,   bit_k = 1 if q_k > 0 else 0

i.e. channel 0 of the latent is the least significant bit. Image tokens are the codes of the `h x w` grid in raster
(row-major) order.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple

from .configuration_unif2ace_vq import UniF2aceVQConfig


def codes_to_bits(codes: torch.LongTensor, num_bits: int) -> torch.LongTensor:
    """Integer codes `(...)` -> bits `(..., num_bits)` in {0, 1}; bit k is the coefficient of `2**k`."""
    powers = torch.arange(num_bits, device=codes.device)
    return (codes.unsqueeze(-1) >> powers) & 1


def bits_to_codes(bits: torch.Tensor) -> torch.LongTensor:
    """Bits `(..., K)` in {0, 1} (bool or integer) -> integer codes `(...)` = `sum_k bits[..., k] * 2**k`."""
    powers = 2 ** torch.arange(bits.shape[-1], device=bits.device)
    return (bits.long() * powers).sum(dim=-1)


def _binary_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of Bernoulli(sigmoid(logits)), elementwise and stable for large |logits|."""
    return F.softplus(logits) - torch.sigmoid(logits) * logits


def _binary_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of Bernoulli(probs), elementwise; probs are clamped away from 0 and 1."""
    eps = torch.finfo(probs.dtype).eps
    probs = probs.clamp(eps, 1 - eps)
    return -(probs * probs.log() + (1 - probs) * (1 - probs).log())


def lfq_entropy_loss(
    latents: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    MAGVIT-v2 entropy loss `E[H(p(c | z))] - H(E[p(c | z)])` for latents `(B, K, h, w)`, in nats.

    Every latent vector `z` (one per position) gets the soft code distribution `p(c | z) ∝ exp(-||z - c||² / T)`
    over the `2**K` corners `c in {-1, +1}^K`. Since `-||z - c||² = 2 z·c + const`, it factorises over bits with
    `p(c_k = +1 | z) = sigmoid(4 z_k / T)`. Hence the per-sample entropy is *exactly* the sum of the per-bit binary
    entropies. The codebook term uses the *factorised approximation*: the batch-mean distribution (a mixture, which
    does not factorise) is replaced by the product of its per-bit marginals, so its entropy is the sum of the binary
    entropies of the batch-mean per-bit probabilities (an upper bound on the exact mixture entropy).

    Returns:
        `(loss, per_sample_entropy, codebook_entropy)`, three scalars; `loss` is low when every position is confident
        (low per-sample entropy) and the batch uses many codes (high codebook entropy).
    """
    logits = 4 * latents / temperature
    per_sample_entropy = _binary_entropy_from_logits(logits).sum(dim=1).mean()
    mean_probs = torch.sigmoid(logits).mean(dim=(0, 2, 3))
    codebook_entropy = _binary_entropy(mean_probs).sum()
    return per_sample_entropy - codebook_entropy, per_sample_entropy, codebook_entropy


@dataclass
class UniF2aceVQOutput(ModelOutput):
    r"""
    reconstruction (`torch.FloatTensor` of shape `(batch_size, 3, resolution, resolution)`):
        Decoded image, clamped to `[-1, 1]` (the losses use the unclamped decoder output).
    codes (`torch.LongTensor` of shape `(batch_size, latent_size**2)`):
        Image tokens in `[0, codebook_size)`, raster order.
    loss (`torch.FloatTensor`, *optional*):
        `reconstruction_loss + commitment_loss_weight * commitment_loss + entropy_loss_weight * entropy_loss`.
    reconstruction_loss (`torch.FloatTensor`, *optional*):
        Mean squared error between the input and the unclamped reconstruction.
    commitment_loss (`torch.FloatTensor`, *optional*):
        `mean((z - sign(z))²)`, pulling the latents towards the corners of the hypercube.
    entropy_loss (`torch.FloatTensor`, *optional*):
        LFQ entropy loss, see [`lfq_entropy_loss`].
    """

    reconstruction: torch.FloatTensor | None = None
    codes: torch.LongTensor | None = None
    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    entropy_loss: torch.FloatTensor | None = None


def _group_norm(config: UniF2aceVQConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(config.norm_num_groups, channels), channels, eps=config.norm_eps)


class UniF2aceVQResBlock(nn.Module):
    """Pre-activation residual block: `x + conv(SiLU(GN(conv(SiLU(GN(x))))))`, with a 1x1 shortcut if widths differ."""

    def __init__(self, config: UniF2aceVQConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(config, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(config, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut(hidden_states)
        hidden_states = self.conv1(F.silu(self.norm1(hidden_states)))
        hidden_states = self.conv2(F.silu(self.norm2(hidden_states)))
        return residual + hidden_states


class UniF2aceVQDownsample(nn.Module):
    """Halves the spatial size with a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(hidden_states)


class UniF2aceVQUpsample(nn.Module):
    """Doubles the spatial size: nearest-neighbour upsampling then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(hidden_states, scale_factor=2.0, mode="nearest"))


class UniF2aceVQStage(nn.Module):
    """`num_res_blocks` residual blocks at one resolution, optionally followed by a resampling layer."""

    def __init__(self, config: UniF2aceVQConfig, in_channels: int, out_channels: int, resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(
            UniF2aceVQResBlock(config, in_channels if i == 0 else out_channels, out_channels)
            for i in range(config.num_res_blocks)
        )
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return self.resample(hidden_states)


def _stage_widths(config: UniF2aceVQConfig) -> list[int]:
    return [config.base_channels * multiplier for multiplier in config.channel_multipliers]


class UniF2aceVQEncoder(nn.Module):
    """Pixels `(B, in_channels, H, W)` -> latents `(B, codebook_bits, H / f, W / f)`, f = downsample_factor."""

    def __init__(self, config: UniF2aceVQConfig):
        super().__init__()
        widths = _stage_widths(config)
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], kernel_size=3, padding=1)
        in_widths = [widths[0]] + widths[:-1]
        self.stages = nn.ModuleList(
            UniF2aceVQStage(config, c_in, c_out, UniF2aceVQDownsample(c_out) if i < len(widths) - 1 else None)
            for i, (c_in, c_out) in enumerate(zip(in_widths, widths))
        )
        self.norm_out = _group_norm(config, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], config.codebook_bits, kernel_size=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_in(pixel_values)
        for stage in self.stages:
            hidden_states = stage(hidden_states)
        return self.conv_out(F.silu(self.norm_out(hidden_states)))


class UniF2aceVQPixelConv(nn.Conv2d):
    """The decoder's last convolution (to pixels). Initialised small so that the first reconstructions are ~0
    (mid-grey) rather than large noise, which speeds up early training."""


class UniF2aceVQDecoder(nn.Module):
    """Quantized latents `(B, codebook_bits, h, w)` -> pixels `(B, in_channels, h * f, w * f)` (unclamped)."""

    def __init__(self, config: UniF2aceVQConfig):
        super().__init__()
        widths = _stage_widths(config)[::-1]
        self.conv_in = nn.Conv2d(config.codebook_bits, widths[0], kernel_size=3, padding=1)
        in_widths = [widths[0]] + widths[:-1]
        self.stages = nn.ModuleList(
            UniF2aceVQStage(config, c_in, c_out, UniF2aceVQUpsample(c_out) if i < len(widths) - 1 else None)
            for i, (c_in, c_out) in enumerate(zip(in_widths, widths))
        )
        self.norm_out = _group_norm(config, widths[-1])
        self.conv_out = UniF2aceVQPixelConv(widths[-1], config.in_channels, kernel_size=3, padding=1)

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_in(quantized)
        for stage in self.stages:
            hidden_states = stage(hidden_states)
        return self.conv_out(F.silu(self.norm_out(hidden_states)))


class UniF2aceVQLookupFreeQuantizer(nn.Module):
    """Sign quantizer: latents `(B, K, h, w)` -> `q = sign(z)` in {-1, +1} (straight-through) and codes `(B, h, w)`."""

    def __init__(self, config: UniF2aceVQConfig):
        super().__init__()
        self.codebook_bits = config.codebook_bits

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor]:
        positive = latents > 0
        hard = torch.where(positive, 1.0, -1.0).to(latents.dtype)
        quantized = latents + (hard - latents).detach()  # forward: hard; backward: identity
        codes = bits_to_codes(positive.permute(0, 2, 3, 1))
        return quantized, codes

    def codes_to_quantized(self, codes: torch.LongTensor, dtype: torch.dtype) -> torch.Tensor:
        """Codes `(B, h, w)` -> corners `(B, K, h, w)` in {-1, +1}."""
        bits = codes_to_bits(codes, self.codebook_bits).permute(0, 3, 1, 2)
        return (2 * bits - 1).to(dtype)


class UniF2aceVQPreTrainedModel(PreTrainedModel):
    config_class = UniF2aceVQConfig
    config: UniF2aceVQConfig
    base_model_prefix = "vq"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["UniF2aceVQResBlock"]
    # no attention inside: every attention implementation chosen for the unified model is trivially fine here
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        if isinstance(module, nn.Conv2d):
            if isinstance(module, UniF2aceVQPixelConv):
                init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            else:
                init.kaiming_normal_(module.weight, nonlinearity="linear")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class UniF2aceVQModel(UniF2aceVQPreTrainedModel):
    """Image tokenizer: `encode` pixels to codes, `decode` codes to pixels, `forward` for training losses."""

    def __init__(self, config: UniF2aceVQConfig):
        super().__init__(config)
        self.encoder = UniF2aceVQEncoder(config)
        self.quantizer = UniF2aceVQLookupFreeQuantizer(config)
        self.decoder = UniF2aceVQDecoder(config)
        self.post_init()

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        expected = (self.config.in_channels, self.config.resolution, self.config.resolution)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (batch_size, {', '.join(map(str, expected))}) "
                f"(channels, height, width from the config), got {tuple(pixel_values.shape)}"
            )
        if pixel_values.is_complex() or not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a float tensor in [-1, 1], got dtype {pixel_values.dtype}")

    def _check_codes(self, codes: torch.Tensor) -> None:
        num_tokens = self.config.num_image_tokens
        if codes.ndim != 2 or codes.shape[1] != num_tokens:
            raise ValueError(
                f"codes must have shape (batch_size, {num_tokens}) (latent_size**2 = "
                f"{self.config.latent_size}**2 tokens in raster order), got {tuple(codes.shape)}"
            )
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.config.codebook_size}) (codebook_size = 2**codebook_bits), "
                f"got values in [{codes.min().item()}, {codes.max().item()}]"
            )

    def encode(self, pixel_values: torch.FloatTensor) -> torch.LongTensor:
        """Pixels `(B, 3, resolution, resolution)` in `[-1, 1]` -> codes `(B, latent_size**2)`, raster order."""
        self._check_pixel_values(pixel_values)
        _, codes = self.quantizer(self.encoder(pixel_values.to(self.dtype)))
        return codes.flatten(1)

    def decode(self, codes: torch.LongTensor) -> torch.FloatTensor:
        """Codes `(B, latent_size**2)` in `[0, codebook_size)`, raster order -> pixels `(B, 3, resolution, resolution)`
        in `[-1, 1]`."""
        self._check_codes(codes)
        grid = codes.long().reshape(codes.shape[0], self.config.latent_size, self.config.latent_size)
        quantized = self.quantizer.codes_to_quantized(grid, dtype=self.dtype)
        return self.decoder(quantized).clamp(-1.0, 1.0)

    @can_return_tuple
    def forward(
        self, pixel_values: torch.FloatTensor, return_loss: bool = True, **kwargs: Unpack[TransformersKwargs]
    ) -> UniF2aceVQOutput:
        """Encode, quantize and decode `pixel_values` `(B, 3, resolution, resolution)` in `[-1, 1]`; with
        `return_loss`, also compute the training losses (see [`UniF2aceVQOutput`]). `return_dict=False` gives a
        tuple, as for any transformers model."""
        self._check_pixel_values(pixel_values)
        pixel_values = pixel_values.to(self.dtype)
        latents = self.encoder(pixel_values)
        quantized, codes = self.quantizer(latents)
        decoded = self.decoder(quantized)
        losses = {}
        if return_loss:
            losses["reconstruction_loss"] = F.mse_loss(decoded, pixel_values)
            losses["commitment_loss"] = F.mse_loss(latents, quantized.detach())
            losses["entropy_loss"], _, _ = lfq_entropy_loss(latents, self.config.entropy_temperature)
            losses["loss"] = (
                losses["reconstruction_loss"]
                + self.config.commitment_loss_weight * losses["commitment_loss"]
                + self.config.entropy_loss_weight * losses["entropy_loss"]
            )
        return UniF2aceVQOutput(reconstruction=decoded.clamp(-1.0, 1.0), codes=codes.flatten(1), **losses)


__all__ = [
    "UniF2aceVQModel",
    "UniF2aceVQOutput",
    "UniF2aceVQPreTrainedModel",
    "bits_to_codes",
    "codes_to_bits",
    "lfq_entropy_loss",
]
