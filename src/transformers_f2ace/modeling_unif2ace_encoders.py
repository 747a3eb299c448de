"""Feature encoders, Perceiver resampler and the grouped sequence-level MoE of UniF²ace (SPEC §3.2).

Shapes: B batch, T sequence length, H decoder hidden size, M resampled feature vectors (= image tokens for span
placement), S encoder tokens, G task groups (MMU = 0, T2I = 1), E sequence experts per group, k chosen per sequence.

Data flow (once per forward, not per layer):
    pixels / precomputed embeds --UniF2aceFeatureEncoders--> {"clip": (B, M, H), "face": (B, M, H)}
        --place_on_image_span--> {"clip": (B, T, H), "face": (B, T, H)}  (zeros off the image span)
    then in every layer: UniF2aceSequenceMoeBlock(normed hidden states, task ids, token mask, placed features).

Initialisation: everything is nn.Linear / nn.LayerNorm / nn.Conv2d / nn.BatchNorm (covered by transformers' generic
`_init_weights`) or the CLIP tower (a `PreTrainedModel`, initialised by its own `_init_weights`), except what
`init_encoder_weights` handles: the resampler queries and the IResNet's PReLU slopes. Call it from `_init_weights`.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel
from transformers import initialization as init

from .configuration_unif2ace import UniF2aceConfig, UniF2aceIdentityConfig


FEATURE_KINDS = ("clip", "face")  # sequence-expert kinds fed by an encoder, in `UniF2aceFeatureEncoders` output order
MIXING_KINDS = ("noise", *FEATURE_KINDS)  # kinds computing w·x + (1 − w)·f with a per-token gate
PRELU_INIT = 0.25  # torch's and insightface's default PReLU slope


# --------------------------------------------------------------------------------------------------------------------
# Identity encoder: insightface IResNet
# --------------------------------------------------------------------------------------------------------------------
def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """insightface residual block: BN → conv3x3 → BN → PReLU → conv3x3(stride) → BN, plus the (downsampled) input."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=1e-5),
            )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states if self.downsample is None else self.downsample(hidden_states)
        out = self.prelu(self.bn2(self.conv1(self.bn1(hidden_states))))
        return self.bn3(self.conv2(out)) + residual


class IResNet(nn.Module):
    """ArcFace-style identity network (insightface `iresnet.py`): aligned face crop (B, 3, S, S) in [-1, 1] →
    identity embedding (B, embedding_size), not L2-normalised.

    Stem conv3x3 + BN + PReLU at full resolution, four stages of `IBasicBlock`s (widths base × 1, 2, 4, 8, each
    halving the resolution), BN → flatten → FC → BatchNorm1d (`features`). Parameter and buffer names equal
    insightface's, so a PyTorch `backbone.pth` of `iresnet{18,34,50,100}` loads with `load_state_dict` (insightface's
    dropout has no weights and p = 0 at inference; it is omitted). The paper's AntelopeV2 (`glintr100`) ships as ONNX
    only: convert it to a PyTorch state dict first, or compute embeddings with insightface and pass `identity_embeds`.
    """

    def __init__(self, config: UniF2aceIdentityConfig):
        super().__init__()
        base = config.base_channels
        self.conv1 = _conv3x3(3, base)
        self.bn1 = nn.BatchNorm2d(base, eps=1e-5)
        self.prelu = nn.PReLU(base)
        channels = base
        for stage, num_blocks in enumerate(config.layers):
            width = base * 2**stage
            blocks = [IBasicBlock(channels if i == 0 else width, width, 2 if i == 0 else 1) for i in range(num_blocks)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
            channels = width
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        spatial = config.image_size // 2 ** len(config.layers)
        self.fc = nn.Linear(channels * spatial * spatial, config.embedding_size)
        self.features = nn.BatchNorm1d(config.embedding_size, eps=1e-5)
        self.features.weight.requires_grad_(False)  # insightface keeps the embedding BN scale fixed at 1

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.prelu(self.bn1(self.conv1(pixel_values)))
        hidden_states = self.layer4(self.layer3(self.layer2(self.layer1(hidden_states))))
        return self.features(self.fc(torch.flatten(self.bn2(hidden_states), 1)))


# --------------------------------------------------------------------------------------------------------------------
# Perceiver resampler
# --------------------------------------------------------------------------------------------------------------------
class PerceiverAttention(nn.Module):
    """Flamingo cross-attention: the queries attend to the concatenation [inputs; queries] (both layer-normed)."""

    def __init__(self, hidden_size: int, num_heads: int, layer_norm_eps: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(
                f"PerceiverResampler hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})"
            )
        self.num_heads = num_heads
        self.norm_inputs = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.norm_queries = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = states.shape
        return states.view(batch, length, self.num_heads, hidden // self.num_heads).transpose(1, 2)

    def forward(self, inputs: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """inputs (B, S, H), queries (B, M, H) -> (B, M, H)."""
        queries = self.norm_queries(queries)
        context = torch.cat([self.norm_inputs(inputs), queries], dim=1)
        attended = F.scaled_dot_product_attention(
            self._heads(self.q_proj(queries)), self._heads(self.k_proj(context)), self._heads(self.v_proj(context))
        )
        return self.o_proj(attended.transpose(1, 2).flatten(2))


class PerceiverResamplerLayer(nn.Module):
    """queries += Attn([inputs; queries]); queries += MLP(LN queries)  (MLP: Linear → GELU → Linear, no biases)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: int, layer_norm_eps: float):
        super().__init__()
        self.attn = PerceiverAttention(hidden_size, num_heads, layer_norm_eps)
        self.mlp_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.fc1 = nn.Linear(hidden_size, mlp_ratio * hidden_size, bias=False)
        self.fc2 = nn.Linear(mlp_ratio * hidden_size, hidden_size, bias=False)

    def forward(self, inputs: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        queries = queries + self.attn(inputs, queries)
        return queries + self.fc2(F.gelu(self.fc1(self.mlp_norm(queries))))


class PerceiverResampler(nn.Module):
    """Perceiver resampler (Flamingo): encoder tokens (B, S, input_dim) — or one embedding (B, input_dim), treated as
    S = 1 — are projected to `hidden_size`; `num_queries` learned queries then run `depth` layers of cross-attention
    over [inputs; queries] + MLP; a final LayerNorm gives (B, num_queries, hidden_size).
    `queries` is a raw parameter (N(0, 1/hidden_size) at construction): `init_encoder_weights` re-initialises it."""

    def __init__(
        self,
        input_dim: int,
        hidden_size: int,
        num_queries: int,
        depth: int,
        num_heads: int,
        mlp_ratio: int = 4,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.input_dim = input_dim
        self.proj_in = nn.Linear(input_dim, hidden_size)
        self.queries = nn.Parameter(torch.randn(num_queries, hidden_size) / hidden_size**0.5)
        self.layers = nn.ModuleList(
            PerceiverResamplerLayer(hidden_size, num_heads, mlp_ratio, layer_norm_eps) for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs (B, S, input_dim) or (B, input_dim) -> (B, num_queries, hidden_size)."""
        inputs = _as_token_sequence(inputs, self.input_dim, type(self).__name__)
        inputs = self.proj_in(inputs.to(self.proj_in.weight.dtype))
        queries = self.queries.expand(inputs.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(inputs, queries)
        return self.norm_out(queries)


# --------------------------------------------------------------------------------------------------------------------
# MLP projector (LLaVA-style), the alternative to the Perceiver
# --------------------------------------------------------------------------------------------------------------------
class MlpProjector(nn.Module):
    """Encoder tokens on a square grid (B, P, input_dim) — or one embedding (B, input_dim), a 1×1 grid — →
    Linear → GELU → Linear → LayerNorm per token → nearest-upsampled to the square output grid (B, num_outputs,
    hidden_size). Unlike the Perceiver every output keeps the spatial position it was computed from: placed on the
    image span, feature m sits on the image token over the same part of the face."""

    def __init__(self, input_dim: int, hidden_size: int, num_outputs: int, layer_norm_eps: float = 1e-5):
        super().__init__()
        self.output_side = _square_side(num_outputs, "MlpProjector num_outputs (resampler_num_queries or "
                                                      "num_image_tokens)")
        self.input_dim = input_dim
        self.fc1 = nn.Linear(input_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs (B, P, input_dim) with P a square, or (B, input_dim) -> (B, num_outputs, hidden_size)."""
        inputs = _as_token_sequence(inputs, self.input_dim, type(self).__name__)
        side = _square_side(inputs.shape[1], "MlpProjector input tokens")
        projected = self.norm(self.fc2(F.gelu(self.fc1(inputs.to(self.fc1.weight.dtype)))))
        grid = projected.transpose(1, 2).reshape(projected.shape[0], projected.shape[2], side, side)
        upsampled = F.interpolate(grid, size=(self.output_side, self.output_side), mode="nearest")
        return upsampled.flatten(2).transpose(1, 2)


def _square_side(count: int, what: str) -> int:
    side = round(count**0.5)
    if side * side != count:
        raise ValueError(f"{what} must be a square number of tokens (a square grid), got {count}")
    return side


def _as_token_sequence(inputs: torch.Tensor, input_dim: int, name: str) -> torch.Tensor:
    """(B, S, input_dim) or (B, input_dim) -> (B, S, input_dim) (S = 1); other shapes raise ValueError."""
    if inputs.dim() == 2:
        inputs = inputs[:, None]
    if inputs.dim() != 3 or inputs.shape[-1] != input_dim:
        raise ValueError(
            f"{name} expects inputs of shape (B, S, {input_dim}) or (B, {input_dim}), got {tuple(inputs.shape)}"
        )
    return inputs


def build_resampler(config: UniF2aceConfig, input_dim: int) -> nn.Module:
    """The resampler `moe_config.resampler_type` names, mapping `input_dim` encoder tokens to
    `moe_config.resampler_num_queries or num_image_tokens` vectors of the decoder hidden size."""
    moe, text = config.moe_config, config.text_config
    num_outputs = moe.resampler_num_queries or config.num_image_tokens
    if moe.resampler_type == "mlp":
        return MlpProjector(input_dim, text.hidden_size, num_outputs, layer_norm_eps=text.layer_norm_eps)
    return PerceiverResampler(input_dim, text.hidden_size, num_outputs, moe.resampler_depth, moe.resampler_num_heads,
                              mlp_ratio=moe.resampler_mlp_ratio, layer_norm_eps=text.layer_norm_eps)


@torch.no_grad()
def init_encoder_weights(module: nn.Module, std: float) -> None:
    """Initialise what transformers' generic `_init_weights` leaves untouched in this file: `PerceiverResampler.queries`
    ~ N(0, std), PReLU slopes = 0.25 and the opened `FeatureGate` biases. Call it for every module from the model's
    `_init_weights`, after transformers' generic init (which zeroes Linear biases)."""
    if isinstance(module, PerceiverResampler):
        init.normal_(module.queries, mean=0.0, std=std)
    elif isinstance(module, nn.PReLU):
        init.constant_(module.weight, PRELU_INIT)
    elif isinstance(module, FeatureGate) and module.bias is not None:
        init.copy_(module.bias, torch.tensor([-module.open_bias / 2, module.open_bias / 2]))


# --------------------------------------------------------------------------------------------------------------------
# The two encoders + resamplers, run once per forward
# --------------------------------------------------------------------------------------------------------------------
def used_sequence_expert_kinds(config: UniF2aceConfig) -> set[str]:
    """The sequence-expert kinds that appear in either task group of `config.moe_config`."""
    moe = config.moe_config
    return set(moe.mmu_sequence_experts) | set(moe.t2i_sequence_experts)


class UniF2aceFeatureEncoders(nn.Module):
    """The semantic encoder (`semantic_encoder`, a `CLIPVisionModel`; only if some group has a "clip" expert), the
    identity encoder (`identity_encoder`, an `IResNet`; only with a "face" expert) and one resampler per used feature
    kind (`resamplers["clip"]`, `resamplers["face"]`; a `PerceiverResampler` or an `MlpProjector` by
    `moe_config.resampler_type`) mapping to `moe_config.resampler_num_queries or num_image_tokens` vectors of the
    decoder hidden size.

    With `config.freeze_encoders` (default) the two encoders have `requires_grad=False`, stay in eval mode through
    `.train()` and run under `torch.no_grad()`; the resamplers always train.
    """

    def __init__(self, config: UniF2aceConfig):
        super().__init__()
        moe = config.moe_config
        used = used_sequence_expert_kinds(config)
        self.freeze_encoders = config.freeze_encoders
        self.semantic_image_size = config.semantic_config.image_size
        self.semantic_num_channels = config.semantic_config.num_channels
        self.semantic_dim = config.semantic_config.hidden_size
        self.semantic_feature_layer = moe.semantic_feature_layer
        self.identity_image_size = config.identity_config.image_size
        self.identity_dim = config.identity_config.embedding_size
        self.semantic_encoder = CLIPVisionModel(config.semantic_config) if "clip" in used else None
        self.identity_encoder = IResNet(config.identity_config) if "face" in used else None
        input_dims = {"clip": self.semantic_dim, "face": self.identity_dim}
        self.resamplers = nn.ModuleDict(
            {kind: build_resampler(config, input_dims[kind]) for kind in FEATURE_KINDS if kind in used}
        )
        if self.freeze_encoders:
            for encoder in self._encoders():
                encoder.requires_grad_(False)
                encoder.eval()

    def _encoders(self) -> list[nn.Module]:
        return [encoder for encoder in (self.semantic_encoder, self.identity_encoder) if encoder is not None]

    def train(self, mode: bool = True) -> "UniF2aceFeatureEncoders":
        super().train(mode)
        if self.freeze_encoders:
            for encoder in self._encoders():
                encoder.eval()
        return self

    def _encoder_context(self):
        return torch.no_grad() if self.freeze_encoders else contextlib.nullcontext()

    @staticmethod
    def _either(kind: str, pixel_name: str, pixel_values, embeds_name: str, embeds, resamplers) -> bool:
        """Whether `kind` has an input to encode: rejects both inputs at once; an input for a kind that no expert uses
        is skipped (processors always produce every view; a config may use only some)."""
        if pixel_values is not None and embeds is not None:
            raise ValueError(f"Pass either `{pixel_name}` or `{embeds_name}`, not both")
        return kind in resamplers and (pixel_values is not None or embeds is not None)

    @staticmethod
    def _check_pixels(name: str, pixel_values: torch.Tensor, channels: int, size: int) -> None:
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (channels, size, size):
            raise ValueError(
                f"`{name}` must have shape (B, {channels}, {size}, {size}), got {tuple(pixel_values.shape)}"
            )

    def semantic_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) CLIP-normalised pixels -> (B, P, D_clip): the hidden state of CLIP layer
        `moe_config.semantic_feature_layer` (-1 last, -2 penultimate as in LLaVA) *without* the CLS token, i.e. the
        P = (S / patch_size)² patch tokens (pre `post_layernorm`)."""
        self._check_pixels("semantic_pixel_values", pixel_values, self.semantic_num_channels, self.semantic_image_size)
        with self._encoder_context():
            outputs = self.semantic_encoder(
                pixel_values=pixel_values.to(self.semantic_encoder.dtype), output_hidden_states=True
            )
        return outputs.hidden_states[self.semantic_feature_layer][:, 1:]

    def identity_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) aligned face crops in [-1, 1] -> (B, D_id) identity embeddings."""
        self._check_pixels("identity_pixel_values", pixel_values, 3, self.identity_image_size)
        with self._encoder_context():
            return self.identity_encoder(pixel_values.to(self.identity_encoder.conv1.weight.dtype))

    def forward(
        self,
        semantic_pixel_values: torch.Tensor | None = None,
        identity_pixel_values: torch.Tensor | None = None,
        semantic_embeds: torch.Tensor | None = None,
        identity_embeds: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Resampled features per kind, `{"clip": (B, M, H), "face": (B, M, H)}`; a kind without input is absent.

        Args:
            semantic_pixel_values: (B, C, S, S) pixels for the CLIP tower.
            identity_pixel_values: (B, 3, S_id, S_id) aligned face crops in [-1, 1] for the IResNet.
            semantic_embeds: (B, P, D_clip) precomputed CLIP tokens; replace `semantic_pixel_values`.
            identity_embeds: (B, D_id) or (B, S, D_id) precomputed identity embeddings (e.g. from insightface);
                replace `identity_pixel_values`.
        """
        features = {}
        if self._either("clip", "semantic_pixel_values", semantic_pixel_values, "semantic_embeds", semantic_embeds,
                        self.resamplers):
            if semantic_embeds is None:
                semantic_embeds = self.semantic_features(semantic_pixel_values)
            elif semantic_embeds.dim() != 3 or semantic_embeds.shape[-1] != self.semantic_dim:
                raise ValueError(
                    f"`semantic_embeds` must have shape (B, P, {self.semantic_dim}) (semantic_config.hidden_size), "
                    f"got {tuple(semantic_embeds.shape)}"
                )
            features["clip"] = self.resamplers["clip"](semantic_embeds)
        if self._either("face", "identity_pixel_values", identity_pixel_values, "identity_embeds", identity_embeds,
                        self.resamplers):
            if identity_embeds is None:
                identity_embeds = self.identity_features(identity_pixel_values)
            elif identity_embeds.dim() not in (2, 3) or identity_embeds.shape[-1] != self.identity_dim:
                raise ValueError(
                    f"`identity_embeds` must have shape (B, {self.identity_dim}) or (B, S, {self.identity_dim}) "
                    f"(identity_config.embedding_size), got {tuple(identity_embeds.shape)}"
                )
            features["face"] = self.resamplers["face"](identity_embeds)
        return features


def place_on_image_span(
    features: torch.Tensor, image_mask: torch.Tensor, batch_index: torch.LongTensor | None = None
) -> torch.Tensor:
    """Scatter resampled features onto the image-token span: feature m goes to the m-th image position of its row.

    Args:
        features: (B_f, M, H) resampled features.
        image_mask: (B, T) bool, True at image-token positions.
        batch_index: (B_f,) rows of `image_mask` the features belong to (default: all rows, B_f == B); other rows
            get zeros.
    Returns:
        (B, T, H), zeros off the image span and on rows without image positions. A feature row whose row has image
        positions must have exactly M of them (one image of `num_image_tokens` tokens).
    """
    if features.dim() != 3 or image_mask.dim() != 2:
        raise ValueError(
            f"place_on_image_span expects features (B, M, H) and image_mask (B, T), got {tuple(features.shape)} and "
            f"{tuple(image_mask.shape)}"
        )
    if batch_index is None:
        batch_index = torch.arange(image_mask.shape[0], device=image_mask.device)
    if batch_index.shape != (features.shape[0],):
        raise ValueError(
            f"place_on_image_span got {features.shape[0]} feature rows for {batch_index.numel()} batch rows "
            f"(image_mask has {image_mask.shape[0]}); pass `batch_index` of shape (B_f,) when they differ"
        )
    if batch_index.unique().numel() != batch_index.numel():
        raise ValueError(f"`batch_index` must not repeat a row, got {batch_index.tolist()}")
    span = image_mask.bool()[batch_index]
    counts = span.sum(-1)
    num_features = features.shape[1]
    if ((counts != 0) & (counts != num_features)).any():
        raise ValueError(
            f"Each row with an image must have exactly {num_features} image positions to carry the {num_features} "
            f"resampled features, got {sorted(set(counts.tolist()) - {0})}: set moe_config.resampler_num_queries "
            "equal to num_image_tokens (or None) for span placement, and put one image per sequence"
        )
    # masked_scatter fills the True positions row by row, in order, from the features of the rows that have an image
    local = features.new_zeros(*span.shape, features.shape[-1]).masked_scatter(span[..., None], features[counts > 0])
    placed = features.new_zeros(*image_mask.shape, features.shape[-1])
    return placed.index_add(0, batch_index, local)


# --------------------------------------------------------------------------------------------------------------------
# Grouped sequence-level MoE
# --------------------------------------------------------------------------------------------------------------------
class FeatureGate(nn.Linear):
    """The 2-way gate `Linear(H, 2)` of a mixing expert: logits of [hidden state, feature] per token. Bias-free (the
    paper's form) unless `open_bias` b > 0: then its bias starts at [-b/2, b/2] (`init_encoder_weights`), so the
    mix starts at w = sigmoid(-b) on the hidden state."""

    def __init__(self, hidden_size: int, open_bias: float = 0.0):
        super().__init__(hidden_size, 2, bias=open_bias > 0)
        self.open_bias = open_bias


class UniF2aceSequenceMoeBlock(nn.Module):
    """Grouped sequence-level MoE (SPEC §3.2). Global expert i = g * E + e: expert e of group g, kinds from
    `moe_config.mmu_sequence_experts` (g = 0) and `t2i_sequence_experts` (g = 1).

    One router `Linear(H, G*E)` reads the mean hidden state over non-pad positions; each sequence sees only its
    group's slice (others -inf), softmax in fp32, top-k per sequence (renormalised if `norm_topk_prob`). Output
    Σ_k g_k · E_k(x) with copy E(x) = x, zero E(x) = 0 and, for noise / clip / face, E(x) = w·x + (1 − w)·f where
    [w, 1 − w] = softmax(W_c x) per token (`feature_gates[str(i)]`, a `Linear(H, 2)`) and f = the placed encoder
    features (missing kind: zeros) or Gaussian noise × `noise_std` (training, or eval with `noise_at_eval`; else 0).
    Only the chosen mixing experts are evaluated, each on the rows that chose it. With
    `moe_config.mmu_fixed_sequence_route` every MMU sequence takes those experts at weight 1/k instead of the
    router's choice; with `feature_gate_bias` b > 0 the clip / face gates carry a bias initialised to [-b/2, b/2].
    """

    def __init__(self, config: UniF2aceConfig):
        super().__init__()
        moe, hidden = config.moe_config, config.text_config.hidden_size
        groups = (moe.mmu_sequence_experts, moe.t2i_sequence_experts)
        self.expert_kinds = [kind for group in groups for kind in group]
        self.num_groups = len(groups)
        self.experts_per_group = moe.num_sequence_experts
        self.top_k = moe.num_sequence_experts_per_seq
        self.norm_topk_prob = moe.norm_topk_prob
        self.noise_std = moe.noise_std
        self.noise_at_eval = moe.noise_at_eval
        self.mmu_fixed_route = moe.mmu_fixed_sequence_indices()  # a list, not a buffer: loading fills no buffers
        self.router = nn.Linear(hidden, len(self.expert_kinds), bias=False)
        self.feature_gates = nn.ModuleDict(
            {
                str(i): FeatureGate(hidden, moe.feature_gate_bias if kind in FEATURE_KINDS else 0.0)
                for i, kind in enumerate(self.expert_kinds)
                if kind in MIXING_KINDS
            }
        )

    def route(
        self, hidden_states: torch.Tensor, task_ids: torch.LongTensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.LongTensor]]:
        """-> router_logits (B, G*E) fp32 with other groups at -inf, and the route (top_weights (B, k) fp32,
        top_index (B, k) global expert ids)."""
        if task_ids.shape != hidden_states.shape[:1]:
            raise ValueError(f"`task_ids` must have shape ({hidden_states.shape[0]},), got {tuple(task_ids.shape)}")
        if ((task_ids < 0) | (task_ids >= self.num_groups)).any():
            raise ValueError(f"`task_ids` must be 0 (MMU) or 1 (T2I), got {task_ids.tolist()}")
        hidden_states = hidden_states.float()
        if token_mask is None:
            pooled = hidden_states.mean(dim=1)
        else:
            weights = token_mask.to(hidden_states.dtype)[..., None]
            pooled = (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        logits = F.linear(pooled, self.router.weight.float())
        expert_group = torch.arange(logits.shape[-1], device=logits.device) // self.experts_per_group
        logits = logits.masked_fill(expert_group[None, :] != task_ids[:, None], float("-inf"))
        if self.mmu_fixed_route is not None:
            logits = torch.where((task_ids == 0)[:, None], self._fixed_route_logits(logits), logits)
        top_weights, top_index = logits.softmax(dim=-1).topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        return logits, (top_weights, top_index)

    def _fixed_route_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, G*E) logits of the MMU fixed route: log(1/k) at its experts (MMU group = global ids 0..E-1), else -inf,
        so softmax + top-k give exactly those experts at 1/k each."""
        chosen = torch.tensor(self.mmu_fixed_route, device=logits.device)
        fixed = torch.full_like(logits[0], float("-inf")).index_fill(0, chosen, -math.log(self.top_k))
        return fixed.expand_as(logits)

    def _check_inputs(self, hidden_states, token_mask, features, route) -> None:
        if hidden_states.dim() != 3:
            raise ValueError(f"`hidden_states` must have shape (B, T, H), got {tuple(hidden_states.shape)}")
        if token_mask is not None and token_mask.shape != hidden_states.shape[:2]:
            raise ValueError(
                f"`token_mask` must have shape {tuple(hidden_states.shape[:2])}, got {tuple(token_mask.shape)}"
            )
        for kind, value in features.items():
            if kind not in FEATURE_KINDS:
                raise ValueError(f"`features` keys must be among {FEATURE_KINDS}, got {kind!r}")
            if value.shape != hidden_states.shape:
                raise ValueError(
                    f"`features[{kind!r}]` must be placed on the sequence, shape {tuple(hidden_states.shape)}, got "
                    f"{tuple(value.shape)} (see place_on_image_span)"
                )
        if route is not None:
            expected = (hidden_states.shape[0], self.top_k)
            if len(route) != 2 or route[0].shape != expected or route[1].shape != expected:
                raise ValueError(f"`route` must be (top_weights, top_index), each of shape {expected}")

    def _expert_feature(self, kind: str, features: dict[str, torch.Tensor], rows: torch.Tensor, x: torch.Tensor):
        """f for a mixing expert on the chosen rows (R, T, H), or None when it is zero."""
        if kind == "noise":
            return torch.randn_like(x) * self.noise_std if self.training or self.noise_at_eval else None
        feature = features.get(kind)
        return None if feature is None else feature[rows].to(x.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        task_ids: torch.LongTensor,
        token_mask: torch.Tensor | None = None,
        features: dict[str, torch.Tensor] | None = None,
        route: tuple[torch.Tensor, torch.LongTensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.LongTensor]]:
        """
        Args:
            hidden_states: (B, T, H) normalised hidden states.
            task_ids: (B,) task group per sequence (0 MMU, 1 T2I).
            token_mask: (B, T) bool, True at non-pad positions (default: all); only these enter the routing mean.
            features: kind -> (B, T, H) features already placed on the image span (`place_on_image_span`).
            route: a previous call's route to reuse (e.g. when decoding new tokens with a KV cache).
        Returns:
            output (B, T, H); router_logits (B, G*E) fp32 (None when `route` was given); route (top_weights (B, k),
            top_index (B, k)).
        """
        features = features or {}
        self._check_inputs(hidden_states, token_mask, features, route)
        router_logits = None
        if route is None:
            router_logits, route = self.route(hidden_states, task_ids, token_mask)
        top_weights, top_index = route
        weights = top_weights.to(hidden_states.dtype)
        device = hidden_states.device
        is_copy = torch.tensor([kind == "copy" for kind in self.expert_kinds], device=device)[top_index]
        is_mixing = torch.tensor([kind in MIXING_KINDS for kind in self.expert_kinds], device=device)[top_index]
        output = hidden_states * (weights * is_copy).sum(dim=-1)[:, None, None]
        for expert in top_index[is_mixing].unique().tolist():
            rows, slot = torch.where(top_index == expert)
            x = hidden_states[rows]
            w = self.feature_gates[str(expert)](x).float().softmax(dim=-1)[..., :1].to(x.dtype)
            feature = self._expert_feature(self.expert_kinds[expert], features, rows, x)
            mixed = w * x if feature is None else w * x + (1 - w) * feature
            output = output.index_add(0, rows, mixed * weights[rows, slot][:, None, None])
        return output, router_logits, route


__all__ = [
    "IResNet",
    "PerceiverResampler",
    "UniF2aceFeatureEncoders",
    "UniF2aceSequenceMoeBlock",
    "init_encoder_weights",
    "place_on_image_span",
]
