"""UniF²ace: one Phi-style decoder over text tokens and VQ image tokens with omni-attention and grouped MoE.

Shapes: B batch, T sequence length, H hidden size, V unified vocabulary, G task groups (MMU = 0, T2I = 1),
E routed experts per group, I expert width.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import MergeModulelist, WeightConverter
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.phi.modeling_phi import PhiRotaryEmbedding, apply_rotary_pos_emb, eager_attention_forward
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_unif2ace import UniF2aceConfig
from .modeling_unif2ace_encoders import (
    UniF2aceFeatureEncoders,
    UniF2aceSequenceMoeBlock,
    init_encoder_weights,
    place_on_image_span,
)
from .image_processing_unif2ace import UniF2aceImageProcessor
from .loss_d3diff import D3DiffLoss, D3DiffOutput
from .modeling_unif2ace_vq import UniF2aceVQModel
from .moe_dispatch import FUSED_EXPERTS_IMPLEMENTATION  # registers experts_implementation="unif2ace_fused"
from .scheduling_maskgit import MASKED, MaskGITScheduler


MMU_TASK, T2I_TASK = 0, 1
NUM_TASK_GROUPS = 2
# consumed by the prefill of a cached generation; later steps only feed new text tokens
PREFILL_ONLY_INPUTS = ("image_codes", "semantic_pixel_values", "identity_pixel_values", "semantic_embeds",
                       "identity_embeds")
GENERATION_AUTO_CLASS_NAMES = ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForMultimodalLM")


# Per-expert checkpoints (`mlp.experts.{e}.fc1.weight` ..., e.g. a dense Phi MLP upcycled expert by expert) load into the
# fused 3-D layout. Registered here, in the modeling file, so `trust_remote_code` loads get it too.
EXPERT_KEY_CONVERSION = [
    WeightConverter(
        source_patterns=f"mlp.{experts}.*.{source}", target_patterns=f"mlp.{experts}.{target}",
        operations=[MergeModulelist(dim=0)],
    )
    for experts in ("experts", "shared_experts")
    for source, target in (
        ("fc1.weight", "up_proj"), ("fc1.bias", "up_proj_bias"), ("fc2.weight", "down_proj"), ("fc2.bias", "down_proj_bias")
    )
]
register_checkpoint_conversion_mapping("unif2ace", EXPERT_KEY_CONVERSION, overwrite=True)


def activation_function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """`gelu_new` (Phi) as torch's fused tanh-GELU: identical values, ~4x faster on CPU than the Python formula."""
    if name == "gelu_new":
        return lambda x: F.gelu(x, approximate="tanh")
    return ACT2FN[name]


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class UniF2aceModelOutputWithPast(ModelOutput):
    """`last_hidden_state` (B, T, H); `router_logits`: per MoE layer (B*T, G*E) token-router logits (other groups'
    experts at -inf); `sequence_router_logits`: per layer (B, G*E_seq); `task_ids` (B,) the task group each sequence
    used; `image_targets` (B, T): the true code at positions masked by `image_generation_mask`, -100 elsewhere."""

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    sequence_router_logits: tuple[torch.FloatTensor, ...] | None = None
    task_ids: torch.LongTensor | None = None
    image_targets: torch.LongTensor | None = None


@dataclass
class UniF2aceCausalLMOutputWithPast(ModelOutput):
    """`loss` = text next-token CE + D3Diff (image_generation_mask given) + `router_aux_loss_coef` * `aux_loss`
    (+ `moe_config.router_z_loss_coef` * `z_loss`) when router logits are returned; the parts are `text_loss`,
    `mask_loss` / `score_loss` (D3Diff), `aux_loss` and `z_loss`.
    `logits` (B, T, V); None when only the generation loss was asked for, or with `skip_logits` (full logits are
    never built then)."""

    loss: torch.FloatTensor | None = None
    text_loss: torch.FloatTensor | None = None
    mask_loss: torch.FloatTensor | None = None
    score_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


# --------------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------------
class UniF2aceAttention(nn.Module):
    """Phi-style multi-head attention with partial rotary embeddings; the kernel comes from the attention interface
    (`config._attn_implementation`: eager / sdpa / flex / flash)."""

    def __init__(self, config: UniF2aceConfig, layer_idx: int):
        super().__init__()
        self.config = config  # the composite config: it carries `_attn_implementation`
        text = config.text_config
        self.layer_idx = layer_idx
        self.attention_dropout = text.attention_dropout
        self.head_dim = text.head_dim
        self.num_key_value_groups = text.num_attention_heads // text.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        bias = text.attention_bias
        self.q_proj = nn.Linear(text.hidden_size, text.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(text.hidden_size, text.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(text.hidden_size, text.num_key_value_heads * self.head_dim, bias=bias)
        self.dense = nn.Linear(text.num_attention_heads * self.head_dim, text.hidden_size, bias=bias)
        self.rotary_ndims = int(self.head_dim * text.rope_parameters["partial_rotary_factor"])
        if text.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=text.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=text.layer_norm_eps)
        else:
            self.q_layernorm = self.k_layernorm = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if self.q_layernorm is not None:
            query, key = self.q_layernorm(query), self.k_layernorm(key)

        cos, sin = position_embeddings
        n = self.rotary_ndims
        query_rot, key_rot = apply_rotary_pos_emb(query[..., :n], key[..., :n], cos, sin)
        query = torch.cat((query_rot, query[..., n:]), dim=-1)
        key = torch.cat((key_rot, key[..., n:]), dim=-1)

        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.dense(attn_output), attn_weights


# --------------------------------------------------------------------------------------------------------------------
# Feed-forward: dense MLP (the paper's "no MoE" row) or the grouped token-level MoE
# --------------------------------------------------------------------------------------------------------------------
class UniF2aceMLP(nn.Module):
    """Phi MLP: fc1 -> act -> fc2. `task_ids` is accepted (and ignored) so the block can swap in the MoE."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.act = activation_function(hidden_act)

    def forward(self, hidden_states: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


@use_experts_implementation(has_gate=False, has_bias=True)
class UniF2aceExperts(nn.Module):
    """`num_experts` Phi-MLP experts as fused 3-D parameters in transformers' layout: `up_proj` (E, I, H),
    `down_proj` (E, H, I) with biases. Both task groups' experts live in one tensor (group g owns rows
    [g*E_g, (g+1)*E_g)), so a mixed MMU + T2I batch is one dispatch. This `forward` is the *eager reference*
    (a loop over the experts that received tokens); `config._experts_implementation` selects faster paths (default
    `unif2ace_fused`, see moe_dispatch.py; also transformers' grouped_mm / batched_mm)."""

    def __init__(self, config: UniF2aceConfig, num_experts: int, intermediate_size: int):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.num_experts = num_experts
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden))
        self.up_proj_bias = nn.Parameter(torch.empty(num_experts, intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate_size))
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden))
        self.act_fn = activation_function(config.text_config.hidden_act)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states (N, H); top_k_index / top_k_weights (N, k) -> (N, H) = Σ_k w_k · expert_{i_k}(x)."""
        output = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == expert)
            x = F.linear(hidden_states[token], self.up_proj[expert], self.up_proj_bias[expert])
            y = F.linear(self.act_fn(x), self.down_proj[expert], self.down_proj_bias[expert])
            output.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(output.dtype))
        return output


class UniF2aceTopKRouter(nn.Module):
    """Grouped top-k router: one linear over all G*E experts, each token only sees its task group's slice.
    Returns `router_logits` (N, G*E) with other groups at -inf, `top_k_weights` (N, k), `top_k_index` (N, k)
    (global expert ids). Softmax in fp32; optional renormalisation of the chosen weights."""

    def __init__(self, config: UniF2aceConfig):
        super().__init__()
        moe = config.moe_config
        self.experts_per_group = moe.num_experts
        self.top_k = moe.num_experts_per_tok
        self.norm_topk_prob = moe.norm_topk_prob
        self.jitter_noise = moe.router_jitter_noise
        self.weight = nn.Parameter(torch.empty(NUM_TASK_GROUPS * moe.num_experts, config.text_config.hidden_size))

    def forward(self, hidden_states: torch.Tensor, token_groups: torch.Tensor):
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
        logits = F.linear(hidden_states, self.weight).float()
        expert_group = torch.arange(logits.shape[-1], device=logits.device) // self.experts_per_group
        logits = logits.masked_fill(expert_group[None, :] != token_groups[:, None], float("-inf"))
        probs = logits.softmax(dim=-1)
        top_k_weights, top_k_index = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return logits, top_k_weights.to(hidden_states.dtype), top_k_index


class UniF2aceSparseMoeBlock(nn.Module):
    """Grouped token-level MoE (SPEC §3.1): per task group one shared expert (always on) + E routed experts, top-k.
    Dropless: every token reaches its k experts."""

    def __init__(self, config: UniF2aceConfig):
        super().__init__()
        moe = config.moe_config
        self.gate = UniF2aceTopKRouter(config)
        self.experts = UniF2aceExperts(config, NUM_TASK_GROUPS * moe.num_experts, moe.expert_intermediate_size)
        self.shared_experts = (
            UniF2aceExperts(config, NUM_TASK_GROUPS, moe.shared_expert_intermediate_size)
            if moe.shared_expert_intermediate_size > 0
            else None
        )

    def forward(self, hidden_states: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """hidden_states (B, T, H), task_ids (B,) -> (B, T, H)."""
        batch, length, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)
        token_groups = task_ids.repeat_interleave(length)
        _, top_k_weights, top_k_index = self.gate(flat, token_groups)
        output = self.experts(flat, top_k_index, top_k_weights)
        if self.shared_experts is not None:
            ones = torch.ones(flat.shape[0], 1, dtype=flat.dtype, device=flat.device)
            output = output + self.shared_experts(flat, token_groups[:, None], ones)
        return output.reshape(batch, length, hidden)


# --------------------------------------------------------------------------------------------------------------------
# Decoder layer
# --------------------------------------------------------------------------------------------------------------------
class UniF2aceDecoderLayer(GradientCheckpointingLayer):
    """`block_style="sequential"`: h = x + Attn(LN x); out = h + FFN(LN' h)   (the paper's figure)
    `block_style="parallel"`:   out = x + Attn(LN x) + FFN(LN x)            (Phi / Show-o)."""

    def __init__(self, config: UniF2aceConfig, layer_idx: int):
        super().__init__()
        text = config.text_config
        self.parallel = text.block_style == "parallel"
        self.input_layernorm = nn.LayerNorm(text.hidden_size, eps=text.layer_norm_eps)
        self.self_attn = UniF2aceAttention(config, layer_idx)
        self.post_attention_layernorm = (
            None if self.parallel else nn.LayerNorm(text.hidden_size, eps=text.layer_norm_eps)
        )
        if config.moe_config.token_moe:
            self.mlp = UniF2aceSparseMoeBlock(config)
        else:
            self.mlp = UniF2aceMLP(text.hidden_size, text.intermediate_size, text.hidden_act)
        self.resid_dropout = nn.Dropout(text.resid_pdrop)
        self.layer_idx = layer_idx
        if config.moe_config.sequence_moe:
            self.sequence_layernorm = nn.LayerNorm(text.hidden_size, eps=text.layer_norm_eps)
            self.sequence_moe = UniF2aceSequenceMoeBlock(config)
        else:
            self.sequence_layernorm = self.sequence_moe = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        task_ids: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        sequence_features: dict[str, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)
        attn_output, _ = self.self_attn(normed, position_embeddings, attention_mask, past_key_values, **kwargs)
        hidden_states = hidden_states + self.resid_dropout(attn_output)
        if not self.parallel:
            normed = self.post_attention_layernorm(hidden_states)
        hidden_states = hidden_states + self.resid_dropout(self.mlp(normed, task_ids))
        if self.sequence_moe is not None:
            hidden_states = hidden_states + self._sequence_moe(hidden_states, task_ids, token_mask, sequence_features,
                                                               past_key_values)
        return hidden_states

    def _sequence_moe(self, hidden_states, task_ids, token_mask, features, past_key_values) -> torch.Tensor:
        """One routing decision per sequence: made on the first call and remembered on the cache, so that decoding
        new tokens keeps the prefill's experts."""
        routes = getattr(past_key_values, "unif2ace_sequence_routes", None) if past_key_values is not None else None
        output, _, route = self.sequence_moe(
            self.sequence_layernorm(hidden_states), task_ids, token_mask, features,
            route=routes.get(self.layer_idx) if routes else None,
        )
        if past_key_values is not None:
            if routes is None:
                routes = past_key_values.unif2ace_sequence_routes = {}
            routes[self.layer_idx] = route
        return self.resid_dropout(output)


# --------------------------------------------------------------------------------------------------------------------
# Pre-trained model plumbing
# --------------------------------------------------------------------------------------------------------------------
def _raise_on_incompatible_checkpoint(class_name: str, info: dict) -> None:
    """Weights of another shape are always an error; missing weights are one too, except a missing LM head (loading a
    base-model checkpoint into the head class, which transformers initialises and reports)."""
    problems = [f"{key}: checkpoint {tuple(old)} vs model {tuple(new)}" for key, old, new in sorted(info["mismatched_keys"])]
    problems += [f"{key}: missing from the checkpoint" for key in sorted(info["missing_keys"])
                 if not key.startswith("lm_head.")]
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ValueError(
            f"The checkpoint does not match the {class_name} built from its config.json ({len(problems)} weights):\n"
            f"  {shown}\nCheck that config.json belongs to these weights (hidden sizes, codebook, experts), or pass "
            "ignore_mismatched_sizes=True to re-initialise them deliberately."
        )


class UniF2acePreTrainedModel(PreTrainedModel):
    config: UniF2aceConfig
    config_class = UniF2aceConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["UniF2aceDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # data-dependent routing and image spans
    _can_record_outputs = {
        "router_logits": OutputRecorder(UniF2aceTopKRouter, index=0),
        "sequence_router_logits": OutputRecorder(UniF2aceSequenceMoeBlock, index=1),
        "hidden_states": UniF2aceDecoderLayer,
        "attentions": UniF2aceAttention,
    }

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, but a checkpoint that does not fit the config (a missing weight, or one of
        another shape) is an error naming the weights, instead of a silent re-initialisation. Pass
        `ignore_mismatched_sizes=True` to accept re-initialised weights on purpose."""
        strict = not kwargs.get("ignore_mismatched_sizes", False)
        return_info = kwargs.pop("output_loading_info", False)
        kwargs["ignore_mismatched_sizes"] = True
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if strict:
            _raise_on_incompatible_checkpoint(cls.__name__, info)
        return (model, info) if return_info else model

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """Unset: the fused dispatch of `moe_dispatch.py` (sort once, grouped GEMMs, scatter once); explicit requests
        (eager, grouped_mm, batched_mm, ...) are honoured."""
        return super().get_correct_experts_implementation(requested_experts or FUSED_EXPERTS_IMPLEMENTATION)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, *args, **kwargs):
        """The unified vocabulary is derived from `text_vocab_size`, `special_tokens` and the VQ codebook (image codes
        and `[MASK]` sit at fixed offsets), so it cannot grow at the end; only a no-op resize is accepted."""
        if new_num_tokens not in (None, self.config.vocab_size):
            raise ValueError(
                f"UniF²ace's vocabulary ({self.config.vocab_size} ids) is laid out by the config: text_vocab_size "
                f"({self.config.text_vocab_size}) + special tokens + {self.config.codebook_size} image codes + [MASK]. "
                "Change those fields and build a new model (or convert the checkpoint) instead of resizing."
            )
        return super().resize_token_embeddings(new_num_tokens, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """Also writes the complete `auto_map` (every Auto class) so the folder loads with `trust_remote_code=True`
        without this package installed; weights are always safetensors, in the fused expert layout (pass
        `save_original_format=True` for per-expert keys)."""
        self.config.auto_map = {
            "AutoConfig": "configuration_unif2ace.UniF2aceConfig",
            "AutoModel": "modeling_unif2ace.UniF2aceModel",
            **{name: "modeling_unif2ace.UniF2aceForConditionalGeneration" for name in GENERATION_AUTO_CLASS_NAMES},
        }
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.text_config.initializer_range
        if isinstance(module, UniF2aceExperts):
            init.normal_(module.up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
            init.zeros_(module.up_proj_bias)
            init.zeros_(module.down_proj_bias)
        elif isinstance(module, UniF2aceTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        init_encoder_weights(module, std)


def image_block_ids(input_ids: torch.LongTensor, soi_token_id: int, eoi_token_id: int) -> torch.LongTensor:
    """(B, T) -> (B, T): for tokens strictly between `<|soi|>` and `<|eoi|>`, the index (1, 2, ...) of their image in
    the row; -1 for every other token. Tokens sharing an id attend to each other bidirectionally (omni-attention)."""
    opened = (input_ids == soi_token_id).cumsum(-1)
    closed = (input_ids == eoi_token_id).cumsum(-1)
    inside = (opened > closed) & (input_ids != soi_token_id)
    return torch.where(inside, opened, torch.full_like(opened, -1))


def sequence_routing_mask(
    input_ids: torch.LongTensor | None, valid: torch.BoolTensor | None, eoi_token_id: int, shape: torch.Size
) -> torch.BoolTensor:
    """(B, T) positions whose mean hidden state routes the sequence-level MoE: the non-pad context up to the end of
    the last image span (`<|eoi|>`); the first non-pad token for a sequence without an image (or given as
    `inputs_embeds`, where image spans cannot be seen). Text after the image therefore never changes earlier outputs,
    and a KV-cache prefill that holds the image routes like the full sequence."""
    valid = torch.ones(shape, dtype=torch.bool, device=valid.device if valid is not None else None) if valid is None else valid
    first = valid & (valid.long().cumsum(-1) == 1)
    if input_ids is None:
        return first
    is_eoi = input_ids == eoi_token_id
    length = input_ids.shape[1]
    last_eoi = length - 1 - is_eoi.flip(-1).long().argmax(-1)
    context = torch.arange(length, device=input_ids.device)[None, :] <= last_eoi[:, None]
    return torch.where(is_eoi.any(-1, keepdim=True), context & valid, first)


class UniF2aceModel(UniF2acePreTrainedModel):
    """The unified decoder: the VQ image tokenizer (frozen), the feature encoders of the sequence-level experts,
    embeddings over the unified vocabulary, decoder layers with omni-attention, final norm."""

    def __init__(self, config: UniF2aceConfig):
        super().__init__(config)
        text = config.text_config
        self.embed_tokens = nn.Embedding(config.vocab_size, text.hidden_size)
        self.embed_dropout = nn.Dropout(text.embd_pdrop)
        self.layers = nn.ModuleList(UniF2aceDecoderLayer(config, i) for i in range(text.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(text.hidden_size, eps=text.layer_norm_eps)
        self.rotary_emb = PhiRotaryEmbedding(config=text)
        self.vq = UniF2aceVQModel(config.vq_config)
        self.feature_encoders = UniF2aceFeatureEncoders(config) if config.moe_config.sequence_moe else None
        self.gradient_checkpointing = False
        if config.freeze_vq:
            self.vq.requires_grad_(False)
        self.post_init()

    def train(self, mode: bool = True) -> "UniF2aceModel":
        super().train(mode)
        if self.config.freeze_vq:
            self.vq.eval()
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    # ----- input checks and derived inputs -----
    def _check_inputs(self, input_ids: torch.LongTensor | None, attention_mask: torch.Tensor | None,
                      past_length: int, query_length: int, batch_size: int) -> None:
        if input_ids is not None and input_ids.numel():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"input_ids contain ids outside the unified vocabulary [0, {self.config.vocab_size}): "
                    f"min {low}, max {high}. Build inputs with the UniF2aceProcessor of this checkpoint."
                )
        if attention_mask is not None and attention_mask.ndim == 2:
            expected = (batch_size, past_length + query_length)
            if tuple(attention_mask.shape) != expected:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {expected} "
                    f"(batch, cached + new tokens)"
                )

    def resolve_task_ids(
        self, input_ids: torch.LongTensor | None, task_ids: torch.LongTensor | None, past_key_values: Cache | None,
        batch_size: int, device: torch.device,
    ) -> torch.LongTensor:
        """(B,) task group per sequence: given, else read from the task token (`<|t2i|>` -> T2I, `<|mmu|>` -> MMU),
        else remembered from the prefill on the cache, else MMU. The result is remembered on the cache."""
        if task_ids is None:
            remembered = getattr(past_key_values, "unif2ace_task_ids", None)
            task_ids = remembered if remembered is not None else torch.full((batch_size,), MMU_TASK, device=device)
            if input_ids is not None:
                is_t2i = (input_ids == self.config.t2i_token_id).any(-1)
                is_mmu = (input_ids == self.config.mmu_token_id).any(-1)
                task_ids = torch.where(is_t2i, T2I_TASK, torch.where(is_mmu, MMU_TASK, task_ids))
        task_ids = task_ids.to(device=device, dtype=torch.long)
        if past_key_values is not None:
            past_key_values.unif2ace_task_ids = task_ids
        return task_ids

    @staticmethod
    def _position_ids(attention_mask: torch.Tensor | None, past_length: int, query_length: int,
                      device: torch.device) -> torch.LongTensor:
        """Positions that skip left padding: cumsum of the 2-D mask, else past_length + arange."""
        if attention_mask is not None and attention_mask.ndim == 2:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            return positions[:, -query_length:]
        return (torch.arange(query_length, device=device) + past_length).unsqueeze(0)

    # ----- images -----
    def encode_images(self, pixel_values: torch.FloatTensor) -> torch.LongTensor:
        """(n, 3, R, R) pixels in [-1, 1] -> (n, N) VQ codes (no gradient while the VQ is frozen)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vq):
            return self.vq.encode(pixel_values.to(self.vq.dtype))

    def fill_image_tokens(
        self,
        input_ids: torch.LongTensor,
        image_positions: torch.BoolTensor,
        task_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor | None,
        image_codes: torch.LongTensor | None,
        image_generation_mask: torch.BoolTensor | None,
    ) -> tuple[torch.LongTensor, torch.LongTensor | None]:
        """Replace the `[MASK]` placeholders of the image spans by the unified ids of the images' codes (row-major:
        image i fills the i-th span), then re-mask `image_generation_mask` (T2I training: those are the positions to
        predict). Returns the new ids and the targets (B, T): the true code where re-masked, -100 elsewhere."""
        config = self.config
        placeholders = image_positions & (input_ids == config.image_token_id)
        if pixel_values is None and image_codes is None:
            if bool((placeholders.any(-1) & (task_ids == MMU_TASK)).any()):
                raise ValueError(
                    "An MMU sequence has image placeholders but neither pixel_values nor image_codes were given"
                )
            if image_generation_mask is not None:
                raise ValueError("image_generation_mask needs the target images (pixel_values or image_codes)")
            return input_ids, None
        if pixel_values is not None and image_codes is not None:
            raise ValueError("Pass either pixel_values or image_codes, not both")
        codes = self.encode_images(pixel_values) if image_codes is None else image_codes
        if codes.ndim != 2 or codes.shape[1] != config.num_image_tokens:
            raise ValueError(f"image_codes must have shape (num_images, {config.num_image_tokens}), got {tuple(codes.shape)}")
        if int(placeholders.sum()) != codes.numel():
            raise ValueError(
                f"{codes.shape[0]} images ({codes.numel()} codes) for {int(placeholders.sum())} image placeholders: "
                f"each image needs one <|soi|> + {config.num_image_tokens} x [MASK] + <|eoi|> span"
            )
        if bool(((codes < 0) | (codes >= config.codebook_size)).any()):
            raise ValueError(f"image_codes must lie in [0, {config.codebook_size})")
        input_ids = input_ids.masked_scatter(placeholders, codes.to(input_ids.dtype) + config.image_token_offset)
        if image_generation_mask is None:
            return input_ids, None
        if image_generation_mask.shape != input_ids.shape or bool((image_generation_mask & ~image_positions).any()):
            raise ValueError("image_generation_mask must have the shape of input_ids and be True only on image spans")
        targets = torch.where(image_generation_mask, input_ids - config.image_token_offset, -100)
        return input_ids.masked_fill(image_generation_mask, config.mask_token_id), targets

    def sequence_features(
        self,
        image_positions: torch.BoolTensor,
        task_ids: torch.LongTensor,
        semantic_pixel_values: torch.FloatTensor | None,
        identity_pixel_values: torch.FloatTensor | None,
        semantic_embeds: torch.FloatTensor | None,
        identity_embeds: torch.FloatTensor | None,
    ) -> dict[str, torch.Tensor]:
        """Encoder features of the MMU images (one per MMU row with an image, in row order), resampled once and placed
        on the image spans: kind -> (B, T, H). T2I rows never get any (their image is the target)."""
        inputs = (semantic_pixel_values, identity_pixel_values, semantic_embeds, identity_embeds)
        if self.feature_encoders is None or all(value is None for value in inputs):
            return {}
        rows = torch.nonzero((task_ids == MMU_TASK) & image_positions.any(-1)).flatten()
        resampled = self.feature_encoders(*inputs)
        for kind, features in resampled.items():
            if features.shape[0] != rows.numel():
                raise ValueError(
                    f"{features.shape[0]} {kind} encoder inputs for {rows.numel()} MMU sequences with an image: pass "
                    "one semantic / identity view (or embedding) per MMU image, in row order"
                )
        return {kind: place_on_image_span(f, image_positions, rows) for kind, f in resampled.items()}

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        task_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_codes: torch.LongTensor | None = None,
        image_generation_mask: torch.BoolTensor | None = None,
        semantic_pixel_values: torch.FloatTensor | None = None,
        identity_pixel_values: torch.FloatTensor | None = None,
        semantic_embeds: torch.FloatTensor | None = None,
        identity_embeds: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> UniF2aceModelOutputWithPast:
        r"""
        input_ids (B, T): unified-vocabulary ids (see `UniF2aceConfig`); image spans hold `[MASK]` placeholders that
            `pixel_values` (n, 3, R, R) or `image_codes` (n, N) fill, image i the i-th span.
        task_ids (B,): 0 = MMU, 1 = T2I; derived from the task token when omitted.
        image_generation_mask (B, T) bool: T2I training, image positions to re-mask and predict (see `image_targets`).
        semantic_pixel_values / semantic_embeds, identity_pixel_values / identity_embeds: one per MMU image, for the
            CLIP / Face sequence experts (precomputed embeddings skip the encoders).
        Returns hidden states (B, T, H).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        batch_size, query_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config.text_config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        self._check_inputs(input_ids, attention_mask, past_length, query_length, batch_size)
        device = (input_ids if input_ids is not None else inputs_embeds).device
        task_ids = self.resolve_task_ids(input_ids, task_ids, past_key_values, batch_size, device)

        image_targets, block_ids, features = None, None, {}
        if input_ids is not None:
            blocks = image_block_ids(input_ids, self.config.soi_token_id, self.config.eoi_token_id)
            image_positions = blocks >= 0
            input_ids, image_targets = self.fill_image_tokens(
                input_ids, image_positions, task_ids, pixel_values, image_codes, image_generation_mask
            )
            features = self.sequence_features(image_positions, task_ids, semantic_pixel_values,
                                              identity_pixel_values, semantic_embeds, identity_embeds)
            if bool(image_positions.any()):  # else: plain causal mask (lets sdpa use its causal fast path)
                block_ids = F.pad(blocks, (past_length, 0), value=-1) if past_length else blocks
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, past_length, query_length, device)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            block_sequence_ids=block_ids,
        )
        token_mask = attention_mask[:, -query_length:].bool() if attention_mask is not None and attention_mask.ndim == 2 else None
        if self.config.moe_config.sequence_moe:
            token_mask = sequence_routing_mask(input_ids, token_mask, self.config.eoi_token_id, inputs_embeds.shape[:2])
        hidden_states = self.embed_dropout(inputs_embeds)
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                task_ids=task_ids,
                token_mask=token_mask,
                sequence_features=features,
                past_key_values=past_key_values,
                **kwargs,
            )
        return UniF2aceModelOutputWithPast(
            last_hidden_state=self.final_layernorm(hidden_states),
            past_key_values=past_key_values,
            task_ids=task_ids,
            image_targets=image_targets,
        )


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], token_groups: torch.Tensor, experts_per_group: int, top_k: int,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_layers Σ_groups  N · Σ_i f_i · P_i  (SPEC §3.1; λ is applied by the caller).

    router_logits: per layer (N_tok, G*E) with other groups' experts at -inf; token_groups (N_tok,) task group of
    each token; token_mask (N_tok,) bool, False for padding. Per group g, over its non-pad tokens: f_i = share of the
    group's top-k assignments sent to expert i, P_i = mean router probability of expert i; N = experts_per_group.
    """
    keep = token_mask.reshape(-1) if token_mask is not None else slice(None)
    token_groups = token_groups[keep]
    group_masks = [token_groups == g for g in range(NUM_TASK_GROUPS)]
    total = router_logits[0].new_zeros((), dtype=torch.float32)
    for logits in router_logits:
        probs = logits[keep].float().softmax(-1).reshape(-1, NUM_TASK_GROUPS, experts_per_group)
        chosen = F.one_hot(logits[keep].topk(top_k, dim=-1).indices, probs.shape[1] * experts_per_group)
        chosen = chosen.sum(1).float().reshape_as(probs)
        for group, in_group in enumerate(group_masks):
            count = in_group.sum()
            if count == 0:
                continue
            fraction = chosen[in_group, group].sum(0) / (count * top_k)
            mean_prob = probs[in_group, group].mean(0)
            total = total + experts_per_group * (fraction * mean_prob).sum()
    return total


def router_z_loss(router_logits: tuple[torch.Tensor, ...], token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_layers mean over non-pad tokens of logsumexp(router logits)² (ST-MoE's z-loss): keeps the router logits small.
    Other groups' experts sit at -inf, so the logsumexp runs over the token's own group."""
    keep = token_mask.reshape(-1) if token_mask is not None else slice(None)
    return sum(logits[keep].float().logsumexp(-1).square().mean() for logits in router_logits)


class UniF2aceForConditionalGeneration(UniF2acePreTrainedModel, GenerationMixin):
    """UniF²ace with the LM head over the unified vocabulary: text generation (MMU) through `generate()`, image
    generation (T2I) through `generate(..., generation_mode="image")` / `generate_images()`, and the total training
    loss of SPEC §4 for mixed MMU + T2I batches."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: UniF2aceConfig):
        super().__init__(config)
        self.model = UniF2aceModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.vocab_size, bias=True)
        self.d3diff_loss = D3DiffLoss(
            alpha=config.d3diff_alpha,
            score_form=config.d3diff_score_form,
            time_weighting=config.d3diff_time_weighting,
            time_weight_cap=config.d3diff_time_weight_cap,
            schedule=config.mask_schedule,
        )
        self.post_init()

    # Set when the package is imported (to its model-card renderer): `push_to_hub` then uploads this model's card
    # instead of transformers' generic README. Loaded through trust_remote_code, it stays None.
    model_card_renderer = None

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        """The upload step of `push_to_hub` and `save_pretrained(push_to_hub=True)`: writes this model's card first."""
        if self.model_card_renderer is not None:
            self.model_card_renderer(self, repo_id=repo_id).save(os.path.join(working_dir, "README.md"))
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def image_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM head's rows of the K image codes: weight (K, H), bias (K,)."""
        codes = slice(self.config.image_token_offset, self.config.image_token_offset + self.config.codebook_size)
        return self.lm_head.weight[codes], self.lm_head.bias[codes]

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        task_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_codes: torch.LongTensor | None = None,
        image_generation_mask: torch.BoolTensor | None = None,
        mask_ratio: torch.FloatTensor | None = None,
        semantic_pixel_values: torch.FloatTensor | None = None,
        identity_pixel_values: torch.FloatTensor | None = None,
        semantic_embeds: torch.FloatTensor | None = None,
        identity_embeds: torch.FloatTensor | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> UniF2aceCausalLMOutputWithPast:
        r"""
        labels (B, T): next-token targets for understanding (shifted inside), -100 ignored (T2I rows: all -100).
        image_generation_mask (B, T) bool + mask_ratio (B,): T2I training — the masked image positions to predict and
            each image's mask ratio r (default: the realised share of masked image tokens); adds the D3Diff loss.
        With `output_router_logits` (default `config.output_router_logits`) and a token MoE,
        `router_aux_loss_coef * aux_loss` is added.
        skip_logits: build no (B, T, V) logits (`logits` is None): the LM head runs only at the labelled positions
            (text loss) and, chunked, at the masked image positions (D3Diff) — the same losses with far less work
            when only they are needed (training; [`UniF2aceTrainer`] sets it).
        Other arguments: see [`UniF2aceModel.forward`].
        """
        output_router_logits = (
            self.config.output_router_logits if output_router_logits is None else output_router_logits
        ) and self.config.moe_config.token_moe
        outputs: UniF2aceModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            task_ids=task_ids,
            pixel_values=pixel_values,
            image_codes=image_codes,
            image_generation_mask=image_generation_mask,
            semantic_pixel_values=semantic_pixel_values,
            identity_pixel_values=identity_pixel_values,
            semantic_embeds=semantic_embeds,
            identity_embeds=identity_embeds,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        skip_logits = skip_logits or (labels is None and image_generation_mask is not None)
        logits = None if skip_logits else self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))

        losses = {}
        if labels is not None:
            losses["text_loss"] = self._text_loss(hidden_states, logits, labels, **kwargs)
        if image_generation_mask is not None:
            generation = self._generation_loss(hidden_states, logits, outputs.image_targets, mask_ratio)
            losses.update(mask_loss=generation.mask_loss, score_loss=generation.score_loss, d3diff=generation.loss)
        if output_router_logits and outputs.router_logits:
            length = hidden_states.shape[1]
            token_mask = attention_mask.bool()[:, -length:] if attention_mask is not None else None
            moe = self.config.moe_config
            losses["aux_loss"] = load_balancing_loss(
                outputs.router_logits, outputs.task_ids.repeat_interleave(length), moe.num_experts,
                moe.num_experts_per_tok, token_mask,
            )
            if moe.router_z_loss_coef > 0:
                losses["z_loss"] = router_z_loss(outputs.router_logits, token_mask)
        loss = None
        if "text_loss" in losses or "d3diff" in losses:
            loss = sum(losses[name] for name in ("text_loss", "d3diff") if name in losses)
            if "aux_loss" in losses:
                loss = loss + self.config.router_aux_loss_coef * losses["aux_loss"].to(loss.device)
            if "z_loss" in losses:
                loss = loss + self.config.moe_config.router_z_loss_coef * losses["z_loss"].to(loss.device)
        return UniF2aceCausalLMOutputWithPast(
            loss=loss,
            text_loss=losses.get("text_loss"),
            mask_loss=losses.get("mask_loss"),
            score_loss=losses.get("score_loss"),
            aux_loss=losses.get("aux_loss"),
            z_loss=losses.get("z_loss"),
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    def _text_loss(self, hidden_states, logits, labels, **kwargs) -> torch.Tensor:
        """Next-token CE of `labels` (B, T): on the given logits, or — when none were built — on the LM head applied
        to the hidden states of the labelled positions only (those whose next token is a label)."""
        if logits is not None:
            return self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:].to(hidden_states.device)
        labelled = shift_labels != -100
        return self.loss_function(
            logits=self.lm_head(hidden_states[labelled]), labels=None, vocab_size=self.config.vocab_size,
            shift_labels=shift_labels[labelled], **kwargs,
        )

    def _generation_loss(self, hidden_states, logits, image_targets, mask_ratio) -> D3DiffOutput:
        """D3Diff over the masked image positions (SPEC §4): on the given logits' image-code columns, or through the
        chunked fused LM head when no full logits were built."""
        masked = image_targets >= 0
        rows = masked.nonzero()[:, 0]
        if mask_ratio is None:
            image_tokens = self.config.num_image_tokens
            mask_ratio = masked.sum(-1).to(hidden_states.dtype) / image_tokens
        ratio = mask_ratio.to(hidden_states.device, torch.float32)[rows]
        targets = image_targets[masked]
        weight, bias = self.image_head()
        if logits is not None and logits.shape[1] == hidden_states.shape[1]:
            codes = slice(self.config.image_token_offset, self.config.image_token_offset + self.config.codebook_size)
            return self.d3diff_loss(logits[masked][:, codes], targets, ratio)
        if self.config.d3diff_chunk_size == 0:
            return self.d3diff_loss(F.linear(hidden_states[masked], weight, bias), targets, ratio)
        return self.d3diff_loss.forward_from_hidden(
            hidden_states[masked], weight, bias, targets, ratio, chunk_size=self.config.d3diff_chunk_size
        )

    # ----- text generation -----
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        """Encoder inputs are consumed by the prefill only (the image is then in the cache)."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, past_key_values=past_key_values,
            attention_mask=attention_mask, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        if not is_first_iteration and model_inputs.get("use_cache", True):
            for name in PREFILL_ONLY_INPUTS:
                model_inputs.pop(name, None)
        return model_inputs

    def generate(self, *args, generation_mode: str = "text", **kwargs):
        """`generation_mode="text"` (default): transformers' `generate` (MMU answers, with the KV cache).
        `generation_mode="image"`: MaskGIT sampling of T2I prompts, returns image codes (B, N); see
        [`generate_image_tokens`]."""
        if generation_mode == "image":
            return self.generate_image_tokens(*args, **kwargs)
        if generation_mode != "text":
            raise ValueError(f"generation_mode must be 'text' or 'image', got {generation_mode!r}")
        return super().generate(*args, **kwargs)

    # ----- image generation -----
    def _image_prompt_layout(self, input_ids: torch.LongTensor) -> tuple[torch.BoolTensor, torch.BoolTensor]:
        """(image positions, prompt text positions), each (B, T), for a batch of T2I prompts."""
        config = self.config
        is_t2i = (input_ids == config.t2i_token_id).any(-1)
        if not bool(is_t2i.all()) or bool((input_ids == config.mmu_token_id).any()):
            raise ValueError(
                "Image generation needs T2I prompts only (built by the processor with mode='t2i'); this batch mixes "
                "in MMU sequences or lacks the <|t2i|> token"
            )
        blocks = image_block_ids(input_ids, config.soi_token_id, config.eoi_token_id)
        image = (blocks >= 0) & (input_ids == config.mask_token_id)
        counts = image.sum(-1)
        if bool((counts != config.num_image_tokens).any()):
            raise ValueError(
                f"Each T2I prompt must end in one image span of {config.num_image_tokens} [MASK] tokens (this model's "
                f"vq_config), got {counts.tolist()}"
            )
        position = torch.arange(input_ids.shape[1], device=input_ids.device)
        t2i_at = (input_ids == config.t2i_token_id).long().argmax(-1, keepdim=True)
        soi_at = (input_ids == config.soi_token_id).long().argmax(-1, keepdim=True)
        framing = (input_ids == config.bos_token_id) | (input_ids == config.eos_token_id)
        prompt = (position > t2i_at) & (position < soi_at) & ~framing
        return image, prompt

    @torch.no_grad()
    def generate_image_tokens(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        temperature: float | None = None,
        sample_temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        progress: bool = True,
        **kwargs,
    ) -> torch.LongTensor:
        """MaskGIT sampling (SPEC §5) of T2I prompts (B, T) -> image codes (B, N).

        Classifier-free guidance `(1 + w) * cond - w * uncond` runs the conditional and the unconditional (prompt
        masked out, as in training's condition dropout) halves in ONE batched forward. Defaults come from the config
        (`image_generation_steps`, `image_guidance_scale`, `image_gumbel_temperature`, `image_sample_temperature`).
        Seeded runs (`generator`) are bit-identical on CPU.
        """
        config = self.config
        steps = config.image_generation_steps if num_inference_steps is None else num_inference_steps
        scale = config.image_guidance_scale if guidance_scale is None else guidance_scale
        if not isinstance(steps, int) or steps <= 0:
            raise ValueError(f"num_inference_steps must be a positive integer, got {steps!r}")
        if scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {scale}")
        if kwargs:
            raise TypeError(f"generate_image_tokens got unexpected arguments: {sorted(kwargs)}")
        scheduler = MaskGITScheduler(
            mask_schedule=config.mask_schedule,
            temperature=config.image_gumbel_temperature if temperature is None else temperature,
            sample_temperature=config.image_sample_temperature if sample_temperature is None else sample_temperature,
            top_k=top_k,
            top_p=top_p,
        )
        scheduler.set_timesteps(steps)
        input_ids = input_ids.to(self.device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        image, prompt = self._image_prompt_layout(input_ids)
        batch = input_ids.shape[0]
        if scale > 0:
            input_ids = torch.cat([input_ids, input_ids])
            attention_mask = torch.cat([attention_mask, attention_mask.masked_fill(prompt, 0)])
            image = torch.cat([image, image])
        weight, bias = self.image_head()
        sample = scheduler.initial_sample(batch, config.num_image_tokens, device=self.device)
        for step in tqdm(range(steps), desc="MaskGIT", disable=not progress):
            grid = sample.repeat(2, 1) if scale > 0 else sample
            ids = input_ids.masked_scatter(
                image, torch.where(grid == MASKED, config.mask_token_id, grid + config.image_token_offset)
            )
            hidden = self.model(ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            logits = F.linear(hidden[image].view(grid.shape[0], -1, hidden.shape[-1]), weight, bias).float()
            if scale > 0:
                logits = scheduler.add_guidance(logits[:batch], logits[batch:], scale)
            sample = scheduler.step(logits, step, sample, generator=generator).prev_sample
        return sample

    def decode_image_tokens(self, image_codes: torch.LongTensor) -> torch.FloatTensor:
        """Image codes (B, N) -> pixels (B, 3, R, R) in [-1, 1] through the VQ decoder."""
        with torch.no_grad():
            return self.model.vq.decode(image_codes.to(self.device))

    def generate_images(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                        **kwargs) -> list[Image.Image]:
        """T2I prompts -> PIL images: `generate_image_tokens` then `decode_image_tokens` (same keyword arguments)."""
        codes = self.generate_image_tokens(input_ids, attention_mask, **kwargs)
        return UniF2aceImageProcessor().postprocess(self.decode_image_tokens(codes))

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by part: `decoder` (embeddings, attention, token MoE / MLP, norms, LM head), `sequence_moe`
        (routers, gates, norms), `resamplers`, `frozen_encoders` (CLIP + identity), `vq`, `total`, and
        `total_without_frozen` (what trains: total minus the frozen VQ and encoders)."""
        def count(module: nn.Module | None) -> int:
            return sum(p.numel() for p in module.parameters()) if module is not None else 0

        model = self.model
        encoders = model.feature_encoders
        parts = {
            "vq": count(model.vq),
            "frozen_encoders": count(encoders.semantic_encoder) + count(encoders.identity_encoder) if encoders else 0,
            "resamplers": count(encoders.resamplers) if encoders else 0,
            "sequence_moe": sum(count(l.sequence_moe) + count(l.sequence_layernorm) for l in model.layers),
            "total": count(self),
        }
        parts["decoder"] = parts["total"] - sum(parts[k] for k in ("vq", "frozen_encoders", "resamplers", "sequence_moe"))
        frozen = parts["vq"] * self.config.freeze_vq + parts["frozen_encoders"] * self.config.freeze_encoders
        parts["total_without_frozen"] = parts["total"] - frozen
        return parts


__all__ = [
    "UniF2acePreTrainedModel",
    "UniF2aceModel",
    "UniF2aceForConditionalGeneration",
    "image_block_ids",
    "load_balancing_loss",
    "router_z_loss",
]
