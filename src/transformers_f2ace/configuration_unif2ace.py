"""UniF²ace configuration: the unified decoder, its MoE layers, the image tokenizer and the feature encoders.

Token layout of the unified vocabulary (SPEC §1), all derived from the config:

    [0, text_vocab_size)                          text tokens of the BPE tokenizer
    [text_vocab_size, + len(special_tokens))      <|soi|> <|eoi|> <|sov|> <|eov|> <|t2i|> <|mmu|> ... [PAD]
    [image_token_offset, + codebook_size)         image code c has id image_token_offset + c
    vocab_size - 1                                [MASK]
"""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.modeling_rope_utils import RopeParameters

from .configuration_unif2ace_vq import UniF2aceVQConfig
from .loss_d3diff import MASK_SCHEDULES, SCORE_FORMS


SHOW_O_SPECIAL_TOKENS = (
    "<|soi|>",
    "<|eoi|>",
    "<|sov|>",
    "<|eov|>",
    "<|t2i|>",
    "<|mmu|>",
    "<|t2v|>",
    "<|v2v|>",
    "<|lvg|>",
    "[PAD]",
)
MASK_TOKEN = "[MASK]"
MIN_FRAMING_TOKENS = 8  # task token, BOS / EOS, <|soi|> / <|eoi|> and a few text tokens around one image
PHI_END_OF_TEXT_ID = 50256  # <|endoftext|> in Phi-1.5's tokenizer
REQUIRED_SPECIAL_TOKENS = ("<|soi|>", "<|eoi|>", "<|t2i|>", "<|mmu|>", "[PAD]")
SEQUENCE_EXPERT_KINDS = ("copy", "zero", "noise", "clip", "face")
RESAMPLER_TYPES = ("perceiver", "mlp")


def _check_positive(config: PreTrainedConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}")


def _check_probability(config: PreTrainedConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{type(config).__name__}.{name} must be in [0, 1], got {value!r}")


@strict
class UniF2aceTextConfig(PreTrainedConfig):
    r"""
    The Phi-1.5 style decoder backbone. `vocab_size` is the *unified* vocabulary (text + special + image codes +
    mask); `UniF2aceConfig` derives it and the token ids below, so set them there.

    Args:
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads: sizes (Phi-1.5:
            2048, 8192, 24, 32, 32). `intermediate_size` is the dense MLP width (used when the token MoE is off).
        hidden_act (`str`): expert / MLP activation. `"gelu_new"` (Phi) runs as the exact-same-valued fused
            `F.gelu(approximate="tanh")`.
        block_style (`"sequential" | "parallel"`): `x + Attn(LN x)` then FFN on a second norm (the paper's figure,
            default) or Phi's parallel `x + Attn(LN x) + FFN(LN x)`.
        partial_rotary_factor (`float`): fraction of each head that gets RoPE (0.5 for Phi).
    """

    model_type = "unif2ace_text"
    base_config_key = "text_config"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 58498
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "gelu_new"
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    resid_pdrop: float | int = 0.0
    embd_pdrop: float | int = 0.0
    attention_dropout: float | int = 0.0
    attention_bias: bool = True
    qk_layernorm: bool = False
    block_style: Literal["sequential", "parallel"] = "sequential"
    rope_parameters: RopeParameters | dict | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        kwargs.setdefault("partial_rotary_factor", 0.5)
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate_architecture(self):
        _check_positive(
            self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings",
        )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"UniF2aceTextConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"UniF2aceTextConfig.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.block_style not in ("sequential", "parallel"):
            raise ValueError(f"UniF2aceTextConfig.block_style must be 'sequential' or 'parallel', got {self.block_style!r}")
        _check_probability(self, "resid_pdrop", "embd_pdrop", "attention_dropout")
        factor = (self.rope_parameters or {}).get("partial_rotary_factor", 0.5)
        if not 0.0 < factor <= 1.0 or int(self.head_dim * factor) % 2:
            raise ValueError(
                f"UniF2aceTextConfig partial_rotary_factor ({factor}) must be in (0, 1] and give an even number of "
                f"rotary dims per head (head_dim={self.head_dim})"
            )


@strict
class UniF2aceMoEConfig(PreTrainedConfig):
    r"""
    The two Mixture-of-Experts levels (SPEC §3). Each task (MMU, T2I) owns one *group* of experts.

    Token level (replaces the dense MLP when `token_moe=True`): per group `num_experts` routed Phi-MLP experts of
    width `expert_intermediate_size`, `num_experts_per_tok` chosen per token by a softmax router (fp32), plus one
    always-on shared expert of width `shared_expert_intermediate_size` (0: none).

    Sequence level (`sequence_moe=True`): per group `len(*_sequence_experts)` experts of the kinds
    copy / zero / noise / clip / face, `num_sequence_experts_per_seq` chosen once per sequence and layer from the
    mean of the normalised hidden states over non-pad positions. Feature experts (clip, face, noise) mix the hidden
    state with resampled encoder features via a per-token 2-way softmax gate.

    Three choices where the paper is silent (defaults = the paper's form):
    - `resampler_type`: "perceiver" (Flamingo Perceiver resampler, `resampler_*` sized) or "mlp" (LLaVA-style
      projector: Linear → GELU → Linear → LayerNorm per encoder token, nearest-upsampled from the encoder's square
      token grid to the square image-token grid, so feature m sits on the image token it was computed from).
    - `mmu_fixed_sequence_route`: None (learned routing) or `num_sequence_experts_per_seq` kinds of
      `mmu_sequence_experts` that every understanding sequence takes, each at weight 1/k, in every layer (e.g.
      ["copy", "clip"]: the semantic features always reach understanding); a repeated kind takes successive experts
      of that kind. The router logits recorded for those sequences are log(1/k) at the fixed experts, -inf elsewhere.
    - `feature_gate_bias`: 0 keeps the clip / face gates bias-free (w starts near 0.5); b > 0 gives them a bias
      initialised to [-b/2, b/2], so the mix starts at w = sigmoid(-b) on the hidden state (3.0: w ≈ 0.05).
    """

    model_type = "unif2ace_moe"
    base_config_key = "moe_config"

    token_moe: bool = True
    num_experts: int = 8
    num_experts_per_tok: int = 4
    expert_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 1024
    norm_topk_prob: bool = False
    router_z_loss_coef: float = 0.0
    router_jitter_noise: float = 0.0

    sequence_moe: bool = True
    num_sequence_experts_per_seq: int = 2
    mmu_sequence_experts: list[str] | tuple[str, ...] = ("copy", "copy", "clip", "face")
    t2i_sequence_experts: list[str] | tuple[str, ...] = ("copy", "copy", "zero", "noise")
    noise_std: float = 1.0
    noise_at_eval: bool = False
    resampler_type: str = "perceiver"
    resampler_num_queries: int | None = None
    resampler_depth: int = 2
    resampler_num_heads: int = 8
    resampler_mlp_ratio: int = 2
    semantic_feature_layer: int = -2
    mmu_fixed_sequence_route: list[str] | tuple[str, ...] | None = None
    feature_gate_bias: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.mmu_sequence_experts = list(self.mmu_sequence_experts)
        self.t2i_sequence_experts = list(self.t2i_sequence_experts)
        if self.mmu_fixed_sequence_route is not None:
            self.mmu_fixed_sequence_route = list(self.mmu_fixed_sequence_route)
        super().__post_init__(**kwargs)

    @property
    def num_sequence_experts(self) -> int:
        return len(self.mmu_sequence_experts)

    def validate_architecture(self):
        _check_positive(self, "num_experts", "num_experts_per_tok", "expert_intermediate_size",
                        "num_sequence_experts_per_seq", "resampler_depth", "resampler_num_heads", "resampler_mlp_ratio")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"UniF2aceMoEConfig.num_experts_per_tok ({self.num_experts_per_tok}) must be <= num_experts "
                f"({self.num_experts})"
            )
        if self.shared_expert_intermediate_size < 0:
            raise ValueError("UniF2aceMoEConfig.shared_expert_intermediate_size must be >= 0 (0 disables it)")
        if len(self.mmu_sequence_experts) != len(self.t2i_sequence_experts):
            raise ValueError(
                "UniF2aceMoEConfig.mmu_sequence_experts and t2i_sequence_experts must have the same length, got "
                f"{len(self.mmu_sequence_experts)} and {len(self.t2i_sequence_experts)}"
            )
        for name in ("mmu_sequence_experts", "t2i_sequence_experts"):
            unknown = [kind for kind in getattr(self, name) if kind not in SEQUENCE_EXPERT_KINDS]
            if unknown:
                raise ValueError(f"UniF2aceMoEConfig.{name} has unknown kinds {unknown}; known: {SEQUENCE_EXPERT_KINDS}")
        if self.num_sequence_experts_per_seq > self.num_sequence_experts:
            raise ValueError(
                f"UniF2aceMoEConfig.num_sequence_experts_per_seq ({self.num_sequence_experts_per_seq}) must be <= the "
                f"number of sequence experts ({self.num_sequence_experts})"
            )
        if self.resampler_num_queries is not None and self.resampler_num_queries < 1:
            raise ValueError("UniF2aceMoEConfig.resampler_num_queries must be None or a positive integer")
        if self.resampler_type not in RESAMPLER_TYPES:
            raise ValueError(f"UniF2aceMoEConfig.resampler_type must be one of {RESAMPLER_TYPES}, got {self.resampler_type!r}")
        if self.feature_gate_bias < 0:
            raise ValueError(f"UniF2aceMoEConfig.feature_gate_bias must be >= 0, got {self.feature_gate_bias}")
        self.mmu_fixed_sequence_indices()  # raises on a route the MMU group cannot take

    def mmu_fixed_sequence_indices(self) -> list[int] | None:
        """`mmu_fixed_sequence_route` as indices into `mmu_sequence_experts` (a repeated kind takes the next expert of
        that kind), or None for learned routing. Raises ValueError on a route the MMU group cannot take."""
        route = self.mmu_fixed_sequence_route
        if route is None:
            return None
        if len(route) != self.num_sequence_experts_per_seq:
            raise ValueError(
                f"UniF2aceMoEConfig.mmu_fixed_sequence_route must name num_sequence_experts_per_seq "
                f"({self.num_sequence_experts_per_seq}) experts, got {route}"
            )
        indices = []
        for position, kind in enumerate(route):
            candidates = [i for i, name in enumerate(self.mmu_sequence_experts) if name == kind]
            taken = route[:position].count(kind)
            if taken >= len(candidates):
                raise ValueError(
                    f"UniF2aceMoEConfig.mmu_fixed_sequence_route {route} takes {taken + 1} {kind!r} expert(s), "
                    f"mmu_sequence_experts {self.mmu_sequence_experts} has {len(candidates)}"
                )
            indices.append(candidates[taken])
        return indices


@strict
class UniF2aceIdentityConfig(PreTrainedConfig):
    r"""ArcFace-style identity network (an IResNet): aligned face crop of `image_size` px → `embedding_size` vector.
    Paper: AntelopeV2 (IResNet-100, 512-d). `layers` gives the residual blocks per stage (IResNet-100: 3,13,30,3)."""

    model_type = "unif2ace_identity"
    base_config_key = "identity_config"

    image_size: int = 112
    layers: list[int] | tuple[int, ...] = (3, 13, 30, 3)
    base_channels: int = 64
    embedding_size: int = 512
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.layers = list(self.layers)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        _check_positive(self, "image_size", "base_channels", "embedding_size")
        if len(self.layers) != 4 or any(n < 1 for n in self.layers):
            raise ValueError(f"UniF2aceIdentityConfig.layers must be 4 positive ints, got {self.layers}")
        if self.image_size % 16:
            raise ValueError(f"UniF2aceIdentityConfig.image_size must be divisible by 16, got {self.image_size}")


# CLIP ViT-L/14 at 336 px, the semantic encoder Show-o used.
CLIP_VIT_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
    patch_size=14, projection_dim=768,
)


@strict
class UniF2aceConfig(PreTrainedConfig):
    r"""
    Configuration of a [`UniF2aceForConditionalGeneration`]. Defaults give the paper-size model (≈1.8B parameters
    without the frozen encoders); `UniF2aceConfig.tiny()` and `UniF2aceConfig.small()` give test / demo presets.

    Args:
        text_config ([`UniF2aceTextConfig`]): the decoder backbone.
        vq_config ([`UniF2aceVQConfig`]): the image tokenizer; its codebook size sets the image part of the vocabulary.
        moe_config ([`UniF2aceMoEConfig`]): token- and sequence-level MoE.
        semantic_config (`CLIPVisionConfig`): the CLIP vision tower feeding the CLIP sequence expert.
        identity_config ([`UniF2aceIdentityConfig`]): the identity network feeding the Face sequence expert.
        text_vocab_size (`int`): embedding rows reserved for text tokens (Phi-1.5: 50,295).
        special_tokens (`list[str]`): the task / delimiter tokens placed right after the text tokens.
        bos_token_id, eos_token_id: the `<|endoftext|>` id; default 50256 (Phi-1.5's) when the text range holds it,
            else 0 (tokenizers trained by this package put it first); pad_token_id: `[PAD]` by default.
        output_router_logits (`bool`): return router logits and add the balance loss to `loss`.
        router_aux_loss_coef (`float`): λ of the load-balancing loss (0.01).
        freeze_vq (`bool`), freeze_encoders (`bool`): keep the image tokenizer / encoders frozen (default: both).
        d3diff_alpha, d3diff_score_form, d3diff_time_weighting, d3diff_time_weight_cap: the D3Diff loss (α = 0.01,
            the paper's best); `d3diff_chunk_size` rows per chunk of the fused LM-head + loss (0: plain logits).
        mask_schedule (`str`): mask ratio r(t) for training and sampling (cosine, linear, square, cubic).
        condition_dropout_prob (`float`): share of T2I training prompts dropped for classifier-free guidance (0.1).
        image_generation_steps, image_guidance_scale, image_gumbel_temperature, image_sample_temperature: MaskGIT
            sampling defaults (Show-o: 16 steps, guidance 1.75 at 256 px; 50 and 5 at 512 px).
    """

    model_type = "unif2ace"
    sub_configs_defaults = {
        "text_config": UniF2aceTextConfig,
        "vq_config": UniF2aceVQConfig,
        "moe_config": UniF2aceMoEConfig,
        "semantic_config": SubConfigSpec(AutoConfig, model_type="clip_vision_model", init_kwargs=CLIP_VIT_L_336),
        "identity_config": UniF2aceIdentityConfig,
    }

    text_config: dict | PreTrainedConfig | None = None
    vq_config: dict | PreTrainedConfig | None = None
    moe_config: dict | PreTrainedConfig | None = None
    semantic_config: dict | PreTrainedConfig | None = None
    identity_config: dict | PreTrainedConfig | None = None
    text_vocab_size: int = 50295
    special_tokens: list[str] | tuple[str, ...] = SHOW_O_SPECIAL_TOKENS
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.01
    freeze_vq: bool = True
    freeze_encoders: bool = True
    tie_word_embeddings: bool = False
    # D3Diff generation loss and the masking process (SPEC §4)
    d3diff_alpha: float = 0.01
    d3diff_score_form: Literal["bayes", "log_score"] = "bayes"
    d3diff_time_weighting: bool = False
    d3diff_time_weight_cap: float = 10.0
    d3diff_chunk_size: int = 256
    mask_schedule: str = "cosine"
    condition_dropout_prob: float = 0.1
    # MaskGIT sampling defaults (SPEC §5; Show-o: 16 steps, guidance 1.75 at 256 px)
    image_generation_steps: int = 16
    image_guidance_scale: float = 1.75
    image_gumbel_temperature: float = 1.0
    image_sample_temperature: float = 1.0

    def __post_init__(self, **kwargs):
        self.special_tokens = list(self.special_tokens)
        missing = sorted(set(REQUIRED_SPECIAL_TOKENS).difference(self.special_tokens))
        if missing:
            raise ValueError(f"UniF2aceConfig.special_tokens lacks {missing}")
        super().__post_init__(**kwargs)
        default_end_of_text = PHI_END_OF_TEXT_ID if self.text_vocab_size > PHI_END_OF_TEXT_ID else 0
        self.bos_token_id = default_end_of_text if self.bos_token_id is None else self.bos_token_id
        self.eos_token_id = default_end_of_text if self.eos_token_id is None else self.eos_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.special_token_id("[PAD]")
        text = self.text_config
        text.vocab_size = self.vocab_size
        text.bos_token_id, text.eos_token_id, text.pad_token_id = self.bos_token_id, self.eos_token_id, self.pad_token_id

    @property
    def _experts_implementation(self) -> str | None:
        return self._experts_implementation_internal

    @_experts_implementation.setter
    def _experts_implementation(self, value: str | dict | None) -> None:
        """Kept on this config only: the sub-models built from the sub-configs (VQ, CLIP, IResNet) have no experts,
        and transformers refuses an explicit experts implementation for them."""
        if isinstance(value, dict):
            value = value.get("", getattr(self, "_experts_implementation_internal", None))
        self._experts_implementation_internal = value

    # ----- the unified vocabulary (derived, never stored twice) -----
    @property
    def image_token_offset(self) -> int:
        return self.text_vocab_size + len(self.special_tokens)

    @property
    def codebook_size(self) -> int:
        return self.vq_config.codebook_size

    @property
    def vocab_size(self) -> int:
        return self.image_token_offset + self.codebook_size + 1

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1

    @property
    def image_token_id(self) -> int:
        """Placeholder of an image span in MMU prompts: the `[MASK]` id (the span is unknown until the VQ fills it)."""
        return self.mask_token_id

    @property
    def num_image_tokens(self) -> int:
        return self.vq_config.num_image_tokens

    def special_token_id(self, token: str) -> int:
        if token == MASK_TOKEN:
            return self.mask_token_id
        if token not in self.special_tokens:
            raise KeyError(f"{token!r} is not a special token of this config: {self.special_tokens + [MASK_TOKEN]}")
        return self.text_vocab_size + self.special_tokens.index(token)

    @property
    def soi_token_id(self) -> int:
        return self.special_token_id("<|soi|>")

    @property
    def eoi_token_id(self) -> int:
        return self.special_token_id("<|eoi|>")

    @property
    def t2i_token_id(self) -> int:
        return self.special_token_id("<|t2i|>")

    @property
    def mmu_token_id(self) -> int:
        return self.special_token_id("<|mmu|>")

    def validate_token_layout(self):
        _check_positive(self, "text_vocab_size")
        if len(set(self.special_tokens)) != len(self.special_tokens) or MASK_TOKEN in self.special_tokens:
            raise ValueError("UniF2aceConfig.special_tokens must be unique and must not contain [MASK]")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.image_token_offset:
                raise ValueError(
                    f"UniF2aceConfig.{name} ({value}) must be a text or special id in [0, {self.image_token_offset})"
                )
        if self.text_config.vocab_size != self.vocab_size:
            raise ValueError(
                f"text_config.vocab_size ({self.text_config.vocab_size}) disagrees with the unified vocabulary "
                f"({self.vocab_size} = text {self.text_vocab_size} + special {len(self.special_tokens)} + codes "
                f"{self.codebook_size} + mask)"
            )
        if self.num_image_tokens + MIN_FRAMING_TOKENS > self.text_config.max_position_embeddings:
            raise ValueError(
                f"text_config.max_position_embeddings ({self.text_config.max_position_embeddings}) cannot hold the "
                f"{self.num_image_tokens} image tokens of vq_config"
            )

    def validate_router(self):
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"UniF2aceConfig.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")

    def validate_generation_training(self):
        _check_probability(self, "condition_dropout_prob")
        _check_positive(self, "image_generation_steps")
        for name in ("d3diff_alpha", "image_guidance_scale", "image_gumbel_temperature", "d3diff_chunk_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"UniF2aceConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.image_sample_temperature <= 0 or self.d3diff_time_weight_cap <= 0:
            raise ValueError("UniF2aceConfig.image_sample_temperature and d3diff_time_weight_cap must be > 0")
        if self.d3diff_score_form not in SCORE_FORMS:
            raise ValueError(f"UniF2aceConfig.d3diff_score_form must be one of {SCORE_FORMS}, got {self.d3diff_score_form!r}")
        if self.mask_schedule not in MASK_SCHEDULES:
            raise ValueError(
                f"UniF2aceConfig.mask_schedule must be one of {tuple(MASK_SCHEDULES)}, got {self.mask_schedule!r}"
            )

    # ----- presets -----
    @classmethod
    def tiny(cls, **overrides) -> "UniF2aceConfig":
        """A ~1M-parameter model for unit tests: 2 layers, hidden 64, 16-code VQ at 32 px (4x4 = 16 image tokens),
        4 routed experts top-2, tiny CLIP / identity encoders, a 1,000-token text vocabulary."""
        return cls._preset(
            dict(
                text_vocab_size=1000, bos_token_id=0, eos_token_id=0,
                text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=256),
                vq_config=dict(resolution=32, base_channels=8, channel_multipliers=[1, 2, 2, 2], num_res_blocks=1,
                               codebook_bits=4),
                moe_config=dict(num_experts=4, num_experts_per_tok=2, expert_intermediate_size=32,
                                shared_expert_intermediate_size=32, resampler_depth=1, resampler_num_heads=2),
                semantic_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8, projection_dim=32),
                identity_config=dict(image_size=32, layers=[1, 1, 1, 1], base_channels=8, embedding_size=32),
            ),
            overrides,
        )

    @classmethod
    def small(cls, **overrides) -> "UniF2aceConfig":
        """The demo / embedded-model size (~10M parameters): 4 layers, hidden 256, 256 image tokens (64 px, 4x
        downsampling: 8x lost the small attributes, e.g. eye colour), a 1,024-code VQ, 4 routed experts top-2 per
        group. Understanding sequences always take (copy, CLIP) with the CLIP gates opened and an MLP projector (on
        SynthFace the learned route and the Perceiver left the semantic features unused: README, "What limits it")."""
        return cls._preset(
            dict(
                text_vocab_size=4096, bos_token_id=0, eos_token_id=0,
                text_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                                 max_position_embeddings=512),
                vq_config=dict(resolution=64, base_channels=32, channel_multipliers=[1, 2, 4], num_res_blocks=1,
                               codebook_bits=10),
                # the 2-layer semantic tower is pretrained for its last layer (recipe), not the penultimate one
                moe_config=dict(num_experts=4, num_experts_per_tok=2, expert_intermediate_size=256,
                                shared_expert_intermediate_size=256, resampler_depth=1, resampler_num_heads=4,
                                semantic_feature_layer=-1, resampler_type="mlp",
                                mmu_fixed_sequence_route=["copy", "clip"], feature_gate_bias=3.0),
                semantic_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=64, patch_size=8, projection_dim=64),
                identity_config=dict(image_size=64, layers=[1, 1, 1, 1], base_channels=16, embedding_size=64),
            ),
            overrides,
        )

    @classmethod
    def _preset(cls, preset: dict, overrides: dict) -> "UniF2aceConfig":
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(preset.get(key), dict):
                preset[key] = {**preset[key], **value}
            else:
                preset[key] = value
        return cls(**preset)


__all__ = ["UniF2aceConfig", "UniF2aceTextConfig", "UniF2aceMoEConfig", "UniF2aceIdentityConfig"]
