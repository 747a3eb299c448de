"""UniF²ace: one Phi-style decoder over text tokens and VQ image tokens with omni-attention and grouped MoE.

Shapes: B batch, T sequence length, H hidden size, V unified vocabulary, G task groups (MMU = 0, T2I = 1),
E routed experts per group, I expert width.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
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


MMU_TASK, T2I_TASK = 0, 1
NUM_TASK_GROUPS = 2
GENERATION_AUTO_CLASS_NAMES = ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForMultimodalLM")


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
    experts at -inf); `task_ids` (B,) the task group each sequence used."""

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    task_ids: torch.LongTensor | None = None


@dataclass
class UniF2aceCausalLMOutputWithPast(ModelOutput):
    """`loss` = next-token CE (+ `router_aux_loss_coef` * `aux_loss` when router logits are returned);
    `logits` (B, T, V)."""

    loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
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
    (a loop over the experts that received tokens); `config._experts_implementation` selects faster paths."""

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

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        task_ids: torch.Tensor,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)
        attn_output, _ = self.self_attn(normed, position_embeddings, attention_mask, past_key_values, **kwargs)
        hidden_states = hidden_states + self.resid_dropout(attn_output)
        if not self.parallel:
            normed = self.post_attention_layernorm(hidden_states)
        return hidden_states + self.resid_dropout(self.mlp(normed, task_ids))


# --------------------------------------------------------------------------------------------------------------------
# Pre-trained model plumbing
# --------------------------------------------------------------------------------------------------------------------
def _raise_on_incompatible_checkpoint(class_name: str, info: dict) -> None:
    problems = [f"{key}: checkpoint {tuple(old)} vs model {tuple(new)}" for key, old, new in sorted(info["mismatched_keys"])]
    problems += [f"{key}: missing from the checkpoint" for key in sorted(info["missing_keys"])]
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

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also writes the complete `auto_map` (every Auto class) so the folder loads with `trust_remote_code=True`
        without this package installed; weights are always safetensors."""
        self.config.auto_map = {
            "AutoConfig": "configuration_unif2ace.UniF2aceConfig",
            "AutoModel": "modeling_unif2ace.UniF2aceModel",
            **{name: "modeling_unif2ace.UniF2aceForConditionalGeneration" for name in GENERATION_AUTO_CLASS_NAMES},
        }
        return super().save_pretrained(save_directory, *args, **kwargs)

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


def image_block_ids(input_ids: torch.LongTensor, soi_token_id: int, eoi_token_id: int) -> torch.LongTensor:
    """(B, T) -> (B, T): for tokens strictly between `<|soi|>` and `<|eoi|>`, the index (1, 2, ...) of their image in
    the row; -1 for every other token. Tokens sharing an id attend to each other bidirectionally (omni-attention)."""
    opened = (input_ids == soi_token_id).cumsum(-1)
    closed = (input_ids == eoi_token_id).cumsum(-1)
    inside = (opened > closed) & (input_ids != soi_token_id)
    return torch.where(inside, opened, torch.full_like(opened, -1))


class UniF2aceModel(UniF2acePreTrainedModel):
    """The unified decoder: embeddings over the unified vocabulary, decoder layers with omni-attention, final norm."""

    def __init__(self, config: UniF2aceConfig):
        super().__init__(config)
        text = config.text_config
        self.embed_tokens = nn.Embedding(config.vocab_size, text.hidden_size)
        self.embed_dropout = nn.Dropout(text.embd_pdrop)
        self.layers = nn.ModuleList(UniF2aceDecoderLayer(config, i) for i in range(text.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(text.hidden_size, eps=text.layer_norm_eps)
        self.rotary_emb = PhiRotaryEmbedding(config=text)
        self.gradient_checkpointing = False
        self.post_init()

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

    def _block_sequence_ids(self, input_ids: torch.LongTensor | None, past_length: int) -> torch.LongTensor | None:
        if input_ids is None:
            return None
        blocks = image_block_ids(input_ids, self.config.soi_token_id, self.config.eoi_token_id)
        if not bool((blocks >= 0).any()):
            return None  # pure text: plain causal mask (lets sdpa use its causal fast path)
        return F.pad(blocks, (past_length, 0), value=-1) if past_length else blocks

    @staticmethod
    def _position_ids(attention_mask: torch.Tensor | None, past_length: int, query_length: int,
                      device: torch.device) -> torch.LongTensor:
        """Positions that skip left padding: cumsum of the 2-D mask, else past_length + arange."""
        if attention_mask is not None and attention_mask.ndim == 2:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            return positions[:, -query_length:]
        return (torch.arange(query_length, device=device) + past_length).unsqueeze(0)

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
        **kwargs: Unpack[TransformersKwargs],
    ) -> UniF2aceModelOutputWithPast:
        r"""
        input_ids (B, T): unified-vocabulary ids (see `UniF2aceConfig`); `task_ids` (B,): 0 = MMU, 1 = T2I, derived
        from the task token when omitted. Returns hidden states (B, T, H).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        batch_size, query_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config.text_config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        self._check_inputs(input_ids, attention_mask, past_length, query_length, batch_size)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        device = inputs_embeds.device
        task_ids = self.resolve_task_ids(input_ids, task_ids, past_key_values, batch_size, device)
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, past_length, query_length, device)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            block_sequence_ids=self._block_sequence_ids(input_ids, past_length),
        )
        hidden_states = self.embed_dropout(inputs_embeds)
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                task_ids=task_ids,
                past_key_values=past_key_values,
                **kwargs,
            )
        return UniF2aceModelOutputWithPast(
            last_hidden_state=self.final_layernorm(hidden_states),
            past_key_values=past_key_values,
            task_ids=task_ids,
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


class UniF2aceForConditionalGeneration(UniF2acePreTrainedModel, GenerationMixin):
    """UniF²ace with the LM head over the unified vocabulary: text generation (MMU) through `generate()`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: UniF2aceConfig):
        super().__init__(config)
        self.model = UniF2aceModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

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
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> UniF2aceCausalLMOutputWithPast:
        r"""
        labels (B, T): next-token targets (shifted inside), -100 ignored. With `output_router_logits` (default:
        `config.output_router_logits`) and a token MoE, `router_aux_loss_coef * aux_loss` is added to `loss`.
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
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        aux_loss = None
        if output_router_logits and outputs.router_logits:
            length = outputs.last_hidden_state.shape[1]
            token_mask = attention_mask.bool()[:, -length:] if attention_mask is not None else None
            token_groups = outputs.task_ids.repeat_interleave(length)
            moe = self.config.moe_config
            aux_loss = load_balancing_loss(
                outputs.router_logits, token_groups, moe.num_experts, moe.num_experts_per_tok, token_mask
            )
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return UniF2aceCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )


__all__ = [
    "UniF2acePreTrainedModel",
    "UniF2aceModel",
    "UniF2aceForConditionalGeneration",
    "image_block_ids",
    "load_balancing_loss",
]
