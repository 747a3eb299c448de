"""Configuration of the MAGVIT-v2 style image tokenizer with a lookup-free quantizer (LFQ)."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig


@strict
class UniF2aceVQConfig(PreTrainedConfig):
    r"""
    Image tokenizer: a convolutional encoder downsamples an image by `2 ** (len(channel_multipliers) - 1)`, a
    lookup-free quantizer turns each latent vector of `codebook_bits` channels into one code in `[0, 2**codebook_bits)`
    (the sign pattern of the channels), and a mirrored decoder maps codes back to pixels in `[-1, 1]`.

    Paper size (Show-o's MAGVIT-v2): 256 px, 16x downsampling (5 multipliers), `codebook_bits=13` (8192 codes),
    giving 16 x 16 = 256 image tokens.

    Args:
        resolution (`int`): square input size in pixels.
        in_channels (`int`): image channels (3).
        base_channels (`int`): width of the first convolution stage.
        channel_multipliers (`list[int]`): per-stage width multipliers; one fewer downsamplings than entries.
        num_res_blocks (`int`): residual blocks per stage.
        codebook_bits (`int`): K; the codebook has 2**K entries.
        entropy_loss_weight (`float`): weight of the LFQ entropy term when training the tokenizer.
        commitment_loss_weight (`float`): weight of the commitment term when training the tokenizer.
        entropy_temperature (`float`): softness of the per-bit code distribution in the entropy term.
        norm_num_groups (`int`): upper bound on GroupNorm groups; a layer of C channels uses `gcd(norm_num_groups, C)`.
        norm_eps (`float`): epsilon of the GroupNorm layers.
        initializer_range (`float`): std of the normal init of the decoder's output convolution (the other
            convolutions use He-normal init).
    """

    model_type = "unif2ace_vq"
    base_config_key = "vq_config"

    resolution: int = 256
    in_channels: int = 3
    base_channels: int = 128
    channel_multipliers: list[int] | tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    codebook_bits: int = 13
    entropy_loss_weight: float = 0.1
    commitment_loss_weight: float = 0.25
    entropy_temperature: float = 0.01
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.channel_multipliers = list(self.channel_multipliers)
        super().__post_init__(**kwargs)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def codebook_size(self) -> int:
        return 2**self.codebook_bits

    @property
    def latent_size(self) -> int:
        """Side of the token grid: `resolution // downsample_factor`."""
        return self.resolution // self.downsample_factor

    @property
    def num_image_tokens(self) -> int:
        return self.latent_size**2

    def validate_architecture(self):
        for name in (
            "resolution",
            "in_channels",
            "base_channels",
            "num_res_blocks",
            "codebook_bits",
            "norm_num_groups",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"UniF2aceVQConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_multipliers or any(m < 1 for m in self.channel_multipliers):
            raise ValueError(
                f"UniF2aceVQConfig.channel_multipliers must be a non-empty list of positive ints, "
                f"got {self.channel_multipliers}"
            )
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"UniF2aceVQConfig.resolution ({self.resolution}) must be divisible by the downsample factor "
                f"{self.downsample_factor} (= 2 ** (len(channel_multipliers) - 1))"
            )
        for name in ("entropy_temperature", "norm_eps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"UniF2aceVQConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.codebook_bits > 18:
            raise ValueError(f"UniF2aceVQConfig.codebook_bits must be <= 18 (2**18 codes), got {self.codebook_bits}")


__all__ = ["UniF2aceVQConfig"]
