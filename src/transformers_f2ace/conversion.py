"""Show-o (Phi-1.5 + MAGVIT-v2) checkpoints to UniF²ace and back (SPEC §3.3).

Show-o wraps a Hugging Face Phi-1.5 as `self.showo = PhiForCausalLM(config)` (showlab/Show-o,
`models/modeling_showo.py`; its `models/phi.py` forces `qk_layernorm=True`), so its weights are

    showo.model.embed_tokens.weight                                  (V, H)
    showo.model.layers.{i}.input_layernorm.{weight,bias}              (H,)
    showo.model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}       (H, H), (H,)
    showo.model.layers.{i}.self_attn.dense.{weight,bias}              (H, H), (H,)
    showo.model.layers.{i}.self_attn.{q,k}_layernorm.{weight,bias}    (H / heads,)   [qk_layernorm]
    showo.model.layers.{i}.mlp.fc1.{weight,bias}                      (D, H), (D,)
    showo.model.layers.{i}.mlp.fc2.{weight,bias}                      (H, D), (H,)
    showo.model.final_layernorm.{weight,bias}, showo.lm_head.{weight,bias}

(a bare `PhiForCausalLM` state dict, without the `showo.` prefix, is accepted too). Attention, embeddings, norms and
head are copied; each dense MLP becomes the token-level experts of BOTH task groups:

* `"slice"`: the D hidden units are split column-wise: units [e·I, (e+1)·I) become routed expert e (e < E), the last
  S units the shared expert; `E·I + S == D` is required. fc1 rows / bias and fc2 columns are sliced; the fc2 bias
  goes to the shared expert (routed experts get zero), or, without a shared expert (S = 0), `fc2.bias / E` to every
  routed expert. Hence Σ_e expert_e(x) + shared(x) == MLP(x): the MoE with ALL routed experts at weight 1 *is* the
  dense MLP (a trained top-k router then picks a subset of the slices, as in MoEfication).
* `"copy"` (sparse upcycling): every routed expert and the shared expert hold the whole MLP (I = D, S ∈ {0, D}); with
  a shared expert, routed and shared experts carry fc2 / 2 (weight and bias), so whenever a token's routing weights
  sum to 1 (`moe_config.norm_topk_prob=True`) the MoE output equals MLP(x) exactly, for any router.

Show-o's blocks are parallel (`x + Attn(LN x) + MLP(LN x)`), so the target uses `block_style="parallel"` to be
equivalent. Routers, the sequence-level MoE, resamplers and encoders are freshly initialised.

The image tokenizer cannot be converted: Show-o's MAGVIT-v2 (`models/modeling_magvitv2.py`: a VQGAN encoder/decoder
with per-level residual-block counts, mid blocks with self-attention, `quant_conv` / `post_quant_conv`, and an LFQ whose
bit 0 is the MOST significant) is another architecture than this package's compact VQ (uniform stages, no attention,
bit 0 least significant). The UniF²ace VQ is kept from a UniF²ace VQ checkpoint (`vq_state_dict`) or freshly
initialised; Show-o's image-code embedding and head rows are copied as they are but belong to MAGVIT-v2's code book.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers.utils import logging

from .configuration_unif2ace import SHOW_O_SPECIAL_TOKENS, UniF2aceConfig, UniF2aceMoEConfig
from .configuration_unif2ace_vq import UniF2aceVQConfig
from .modeling_unif2ace import NUM_TASK_GROUPS, UniF2aceForConditionalGeneration, activation_function
from .modeling_unif2ace_vq import UniF2aceVQModel


logger = logging.get_logger(__name__)

UPCYCLE_MODES = ("slice", "copy")
SHOW_O_PREFIX = "showo."
SHOW_O_CODEBOOK_SIZE = 8192  # MAGVIT-v2 (13-bit LFQ), the codebook of every released Show-o
SHOW_O_NUM_VQ_TOKENS = 256  # 256 px at 16x downsampling
PHI_15_NUM_ATTENTION_HEADS = 32  # not recoverable from the weights (q_proj is H x H)
GLOBAL_WEIGHTS = ("model.embed_tokens.weight", "model.final_layernorm.weight", "model.final_layernorm.bias",
                  "lm_head.weight", "lm_head.bias")
ATTENTION_MODULES = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense")
MLP_MODULES = ("mlp.fc1", "mlp.fc2")
QK_NORM_MODULES = ("self_attn.q_layernorm", "self_attn.k_layernorm")
EXPERT_PARAMETERS = ("up_proj", "up_proj_bias", "down_proj", "down_proj_bias")  # fc1 weight, bias; fc2 weight, bias
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
# Show-o keys without a UniF²ace counterpart: the MMU projector of its CLIP-ViT variant (`w_clip_vit`; UniF²ace feeds
# CLIP through the sequence-level CLIP expert) is dropped with a warning; rotary caches of old checkpoints are derived.
DROPPED_KEY = re.compile(r"^mm_projector\.")
DERIVED_KEY = re.compile(r"\.rotary_emb\.(inv_freq|cos_cached|sin_cached)$")
MAGVIT_KEY = re.compile(r"^(encoder|decoder|quantize)\.")
SAFETENSORS_NAMES = ("model.safetensors", "pytorch_model.safetensors")  # HF's name; Show-o's ModelMixin's name
PICKLE_NAMES = ("pytorch_model.bin",)  # how Show-o releases its weights
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _listing(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    shown = "\n  ".join(keys[:limit])
    return shown + (f"\n  ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_upcycle(upcycle: str) -> None:
    if upcycle not in UPCYCLE_MODES:
        raise ValueError(f"upcycle must be one of {UPCYCLE_MODES}, got {upcycle!r}")


# --------------------------------------------------------------------------------------------------------------------
# The Show-o key layout
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShowoLayout:
    """A validated Show-o state dict: the key `prefix` ("showo." or "" for a bare Phi), the number of decoder layers,
    whether attention has q/k LayerNorms, and the `dropped` keys (no UniF²ace counterpart)."""

    prefix: str
    num_layers: int
    qk_layernorm: bool
    dropped: tuple[str, ...]

    def key(self, name: str) -> str:
        return self.prefix + name

    def layer_key(self, layer: int, module: str, kind: str = "weight") -> str:
        return f"{self.prefix}model.layers.{layer}.{module}.{kind}"

    def mlp(self, state_dict: dict[str, torch.Tensor], layer: int) -> tuple[torch.Tensor, ...]:
        """(fc1 weight (D, H), fc1 bias (D,), fc2 weight (H, D), fc2 bias (H,)) of one layer."""
        return tuple(state_dict[self.layer_key(layer, m, k)] for m in MLP_MODULES for k in ("weight", "bias"))


def showo_layout(state_dict: dict[str, torch.Tensor]) -> ShowoLayout:
    """Check that `state_dict` is a complete Show-o LLM (or bare Phi) state dict and describe it.

    Raises a ValueError naming the missing and the unexpected keys, or explaining that a MAGVIT-v2 (image tokenizer)
    state dict was given."""
    if any(MAGVIT_KEY.match(key) for key in state_dict) and not any(k.endswith("lm_head.weight") for k in state_dict):
        raise ValueError(
            "This looks like Show-o's MAGVIT-v2 image tokenizer (keys encoder.* / decoder.* / quantize.*), not the "
            "Show-o LLM. Its architecture (VQGAN blocks with mid-level attention, quant_conv / post_quant_conv, "
            "most-significant-bit-first LFQ) differs from UniF²ace's compact VQ, so it cannot be converted weight-"
            "exactly: convert the Show-o LLM checkpoint (keys showo.*) and keep or train a UniF²ace VQ "
            "(vq_state_dict / --vq)."
        )
    prefix = SHOW_O_PREFIX if any(key.startswith(SHOW_O_PREFIX) for key in state_dict) else ""
    layers, unexpected, dropped = {}, [], []
    for key in state_dict:
        if DERIVED_KEY.search(key):
            continue
        name = key[len(prefix):] if key.startswith(prefix) else None
        match = LAYER_KEY.match(name) if name is not None else None
        if DROPPED_KEY.match(key):
            dropped.append(key)
        elif match and match[2] in ATTENTION_MODULES + MLP_MODULES + QK_NORM_MODULES:
            layers.setdefault(int(match[1]), set()).add(match[2])
        elif name not in GLOBAL_WEIGHTS:
            unexpected.append(key)
    num_layers = max(layers, default=-1) + 1
    qk_layernorm = any(QK_NORM_MODULES[0] in modules for modules in layers.values())
    modules = ATTENTION_MODULES + MLP_MODULES + (QK_NORM_MODULES if qk_layernorm else ())
    expected = [prefix + name for name in GLOBAL_WEIGHTS] + [
        f"{prefix}model.layers.{i}.{module}.{kind}"
        for i in range(num_layers) for module in modules for kind in ("weight", "bias")
    ]
    missing = [key for key in expected if key not in state_dict]
    problems = []
    if num_layers == 0:
        problems.append("no decoder layers (model.layers.{i}.*)")
    if missing:
        problems.append(f"missing keys ({len(missing)}):\n  {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}):\n  {_listing(unexpected)}")
    if problems:
        raise ValueError(
            "Not a complete Show-o (Phi-1.5) LLM state dict:\n" + "\n".join(problems)
            + f"\nExpected keys like {prefix}model.layers.0.mlp.fc1.weight (see transformers_f2ace.conversion)."
        )
    return ShowoLayout(prefix, num_layers, qk_layernorm, tuple(sorted(dropped)))


# --------------------------------------------------------------------------------------------------------------------
# Loading Show-o checkpoints
# --------------------------------------------------------------------------------------------------------------------
def _load_pickle(file: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise ValueError(
            f"Refusing to load the pickle checkpoint {file}: unpickling can run arbitrary code. Convert it to "
            "safetensors, or pass allow_pickle=True (CLI: --allow-pickle) for a file you trust; it is then read with "
            "torch.load(weights_only=True), which only accepts tensors and plain containers."
        )
    try:
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError / RuntimeError for globals that weights_only forbids
        raise ValueError(
            f"{file} is not a plain tensor state dict (torch.load(weights_only=True) refused it): {error}"
        ) from error
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise ValueError(f"{file} does not hold a flat {{name: tensor}} state dict")
    return state_dict


def _load_file(file: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        return load_file(file)
    if file.suffix in PICKLE_SUFFIXES:
        return _load_pickle(file, allow_pickle)
    raise ValueError(f"Unknown checkpoint format {file.name!r}: expected .safetensors (or a pickle {PICKLE_SUFFIXES})")


def _load_sharded(index_file: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    weight_map = json.loads(index_file.read_text())["weight_map"]
    state_dict = {}
    for shard in sorted(set(weight_map.values())):
        state_dict.update(_load_file(index_file.parent / shard, allow_pickle))
    missing, unexpected = set(weight_map) - set(state_dict), set(state_dict) - set(weight_map)
    if missing or unexpected:
        raise ValueError(
            f"The shards of {index_file} disagree with its weight_map: missing keys ({len(missing)}):\n  "
            f"{_listing(missing)}\nunexpected keys ({len(unexpected)}):\n  {_listing(unexpected)}"
        )
    return state_dict


def _checkpoint_file(folder: Path) -> Path:
    candidates = [f"{name}.index.json" for name in SAFETENSORS_NAMES] + list(SAFETENSORS_NAMES)
    candidates += [f"{name}.index.json" for name in PICKLE_NAMES] + list(PICKLE_NAMES)
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"No checkpoint in {folder}: expected one of {candidates}")


def load_showo_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a Show-o LLM checkpoint (a folder, a `.safetensors` file or a sharded `*.index.json`) -> its state dict.

    Pickle files (`pytorch_model.bin`, `.pt`, ...: how Show-o releases its weights) are refused unless
    `allow_pickle=True`, and then read with `torch.load(..., weights_only=True)`. The keys are validated with
    [`showo_layout`]: missing or unexpected keys raise a ValueError that lists them."""
    path = Path(path)
    file = _checkpoint_file(path) if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"Checkpoint {file} does not exist")
    sharded = file.name.endswith(".index.json")
    state_dict = _load_sharded(file, allow_pickle) if sharded else _load_file(file, allow_pickle)
    showo_layout(state_dict)
    return state_dict


def read_showo_config(path: str | Path) -> dict:
    """Show-o's model `config.json` next to the weights of a checkpoint folder (vocab_size, llm_vocab_size,
    codebook_size, num_vq_tokens, ...), or {} when there is none."""
    file = Path(path) / "config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


# --------------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------------
def _vocabulary_layout(vocab: int, special: int, showo_config: dict) -> tuple[int, int]:
    """(text vocabulary, codebook size) of a Show-o vocabulary of `vocab` rows = text + special + codebook + mask."""
    text_vocab, codebook = showo_config.get("llm_vocab_size"), showo_config.get("codebook_size")
    if text_vocab is None:
        codebook = SHOW_O_CODEBOOK_SIZE if codebook is None else codebook
        text_vocab = vocab - special - codebook - 1
    elif codebook is None:
        codebook = vocab - text_vocab - special - 1
    if text_vocab + special + codebook + 1 != vocab or codebook < 2 or codebook & (codebook - 1):
        raise ValueError(
            f"The Show-o vocabulary ({vocab} embedding rows) is not text ({text_vocab}) + special ({special}) + a "
            f"power-of-two codebook ({codebook}) + 1 mask: pass showo_config with llm_vocab_size / codebook_size"
        )
    return text_vocab, codebook


def _derived_vq_config(vq_config: UniF2aceVQConfig | None, codebook: int, num_vq_tokens: int) -> UniF2aceVQConfig:
    if vq_config is not None:
        if vq_config.codebook_size != codebook or vq_config.num_image_tokens != num_vq_tokens:
            raise ValueError(
                f"vq_config gives {vq_config.codebook_size} codes and {vq_config.num_image_tokens} image tokens, but "
                f"the Show-o checkpoint has {codebook} codes and {num_vq_tokens} image tokens"
            )
        return vq_config
    side = math.isqrt(num_vq_tokens)
    if side * side != num_vq_tokens:
        raise ValueError(f"num_vq_tokens ({num_vq_tokens}) must be a square number (a square token grid)")
    return UniF2aceVQConfig(resolution=side * UniF2aceVQConfig().downsample_factor,
                            codebook_bits=codebook.bit_length() - 1)


def _derived_moe_config(moe_config: dict, upcycle: str, dense: int) -> dict:
    defaults = UniF2aceMoEConfig()
    shared = moe_config.get("shared_expert_intermediate_size", defaults.shared_expert_intermediate_size)
    if upcycle == "copy":
        sizes = dict(expert_intermediate_size=dense, shared_expert_intermediate_size=dense if shared else 0)
        return {**sizes, "norm_topk_prob": True, **moe_config}
    if "expert_intermediate_size" in moe_config:
        return moe_config
    experts = moe_config.get("num_experts", defaults.num_experts)
    if dense <= shared or (dense - shared) % experts:
        raise ValueError(
            f"Slice upcycling cannot split the dense width {dense} into {experts} routed experts + a shared expert of "
            f"width {shared}: (D - S) must be a positive multiple of E. Set moe_config num_experts / "
            "shared_expert_intermediate_size / expert_intermediate_size so that E * I + S == D."
        )
    return {**moe_config, "expert_intermediate_size": (dense - shared) // experts}


def unif2ace_config_from_showo(
    showo_state_dict: dict[str, torch.Tensor],
    *,
    upcycle: Literal["slice", "copy"] = "slice",
    showo_config: dict | None = None,
    num_attention_heads: int = PHI_15_NUM_ATTENTION_HEADS,
    vq_config: UniF2aceVQConfig | None = None,
    **overrides,
) -> UniF2aceConfig:
    """The UniF²ace config a Show-o checkpoint converts into.

    From the weights: hidden size, layers, dense width D, q/k LayerNorms, vocabulary size. From `showo_config`
    (Show-o's `config.json`, optional): llm_vocab_size, codebook_size, num_vq_tokens (defaults: Show-o's 8,192 codes,
    256 tokens). Not recoverable, hence an argument: `num_attention_heads` (Phi-1.5: 32). Block style: parallel.
    Token MoE: `"slice"` keeps E routed experts and the shared width S of `UniF2aceMoEConfig` (or `moe_config`
    overrides) and sets the routed width to (D - S) / E (Phi-1.5: (8192 - 1024) / 8 = 896); `"copy"` sets both widths
    to D with renormalised routing. The VQ: `vq_config` (the VQ whose weights you keep) or the default UniF²ace VQ at
    Show-o's token grid. `overrides` are UniF2aceConfig arguments; `text_config` / `moe_config` dicts are merged into
    the derived ones.
    """
    _check_upcycle(upcycle)
    layout = showo_layout(showo_state_dict)
    showo_config = showo_config or {}
    vocab, hidden = showo_state_dict[layout.key("model.embed_tokens.weight")].shape
    dense = showo_state_dict[layout.layer_key(0, "mlp.fc1")].shape[0]
    special = len(overrides.get("special_tokens", SHOW_O_SPECIAL_TOKENS))
    text_vocab, codebook = _vocabulary_layout(vocab, special, showo_config)
    num_vq_tokens = showo_config.get("num_vq_tokens", SHOW_O_NUM_VQ_TOKENS)
    overrides = dict(overrides)
    text_config = dict(hidden_size=hidden, intermediate_size=dense, num_hidden_layers=layout.num_layers,
                       num_attention_heads=num_attention_heads, qk_layernorm=layout.qk_layernorm,
                       block_style="parallel")
    return UniF2aceConfig(
        text_vocab_size=text_vocab,
        text_config={**text_config, **overrides.pop("text_config", {})},
        moe_config=_derived_moe_config(dict(overrides.pop("moe_config", {})), upcycle, dense),
        vq_config=_derived_vq_config(vq_config, codebook, num_vq_tokens),
        **overrides,
    )


# --------------------------------------------------------------------------------------------------------------------
# Show-o -> UniF²ace
# --------------------------------------------------------------------------------------------------------------------
def _check_sizes(config: UniF2aceConfig, upcycle: str, dense: int) -> None:
    """Check that the dense width D can be upcycled into E routed experts of width I and a shared expert of width S."""
    moe = config.moe_config
    experts, width, shared = moe.num_experts, moe.expert_intermediate_size, moe.shared_expert_intermediate_size
    if upcycle == "slice" and experts * width + shared != dense:
        raise ValueError(
            f"Slice upcycling needs num_experts * expert_intermediate_size + shared_expert_intermediate_size == the "
            f"dense MLP width: {experts} * {width} + {shared} = {experts * width + shared} != D = {dense}. With "
            f"E = {experts} and S = {shared}, expert_intermediate_size = (D - S) / E would fit."
        )
    if upcycle == "copy" and (width != dense or shared not in (0, dense)):
        raise ValueError(
            f"Copy upcycling needs expert_intermediate_size == D and shared_expert_intermediate_size in (0, D) "
            f"(D = {dense}), got {width} and {shared}"
        )
    if upcycle == "copy" and not moe.norm_topk_prob:
        logger.warning(
            "Copy upcycling reproduces the dense MLP only when the routing weights sum to 1: with "
            "moe_config.norm_topk_prob=False the initial MoE output is MLP(x) scaled by (Σ top-k weights + 1) / 2."
        )


def _slice_experts(fc1_w, fc1_b, fc2_w, fc2_b, experts: int, width: int, shared: int) -> dict[str, torch.Tensor]:
    """Dense MLP (fc1 (D, H), fc2 (H, D)) -> one group's routed experts (E, ...) and shared expert (1, ...)."""
    routed, hidden = experts * width, fc1_w.shape[1]
    split_bias = (fc2_b / experts).expand(experts, -1)
    out = {
        "experts.up_proj": fc1_w[:routed].reshape(experts, width, hidden),
        "experts.up_proj_bias": fc1_b[:routed].reshape(experts, width),
        "experts.down_proj": fc2_w[:, :routed].reshape(hidden, experts, width).transpose(0, 1),
        "experts.down_proj_bias": torch.zeros_like(split_bias) if shared else split_bias,
    }
    if shared:
        out["shared_experts.up_proj"] = fc1_w[routed:][None]
        out["shared_experts.up_proj_bias"] = fc1_b[routed:][None]
        out["shared_experts.down_proj"] = fc2_w[:, routed:][None]
        out["shared_experts.down_proj_bias"] = fc2_b[None]
    return out


def _copy_experts(fc1_w, fc1_b, fc2_w, fc2_b, experts: int, shared: int) -> dict[str, torch.Tensor]:
    """Dense MLP -> E identical routed experts (+ an identical shared expert; then each carries fc2 / 2)."""
    scale = 0.5 if shared else 1.0
    expert = dict(zip(EXPERT_PARAMETERS, (fc1_w, fc1_b, fc2_w * scale, fc2_b * scale)))
    out = {f"experts.{name}": value.expand(experts, *value.shape) for name, value in expert.items()}
    if shared:
        out.update({f"shared_experts.{name}": value[None] for name, value in expert.items()})
    return out


def _upcycled_mlp(mlp: tuple[torch.Tensor, ...], config: UniF2aceConfig, upcycle: str) -> dict[str, torch.Tensor]:
    """One layer's dense MLP -> the `mlp.*` weights of the target (fused experts of both task groups, or fc1 / fc2)."""
    moe = config.moe_config
    if not moe.token_moe:
        return dict(zip(("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"), mlp))
    if upcycle == "slice":
        group = _slice_experts(*mlp, moe.num_experts, moe.expert_intermediate_size, moe.shared_expert_intermediate_size)
    else:
        group = _copy_experts(*mlp, moe.num_experts, moe.shared_expert_intermediate_size)
    return {name: torch.cat([value] * NUM_TASK_GROUPS) for name, value in group.items()}


def upcycle_showo_state_dict(
    showo_state_dict: dict[str, torch.Tensor],
    config: UniF2aceConfig,
    *,
    upcycle: Literal["slice", "copy"] = "slice",
    allow_sequential: bool = False,
) -> dict[str, torch.Tensor]:
    """The UniF²ace weights that come from Show-o (embeddings, attention, norms, LM head, upcycled experts; see the
    module docstring), keyed like `UniF2aceForConditionalGeneration.state_dict()`. New modules are not included.

    `config` must have Show-o's layer count and q/k-LayerNorm setting and `block_style="parallel"`; a sequential block
    is only accepted with `allow_sequential=True` (its extra `post_attention_layernorm` starts as a copy of
    `input_layernorm`; the model is then NOT equivalent to Show-o)."""
    _check_upcycle(upcycle)
    layout = showo_layout(showo_state_dict)
    text = config.text_config
    if layout.num_layers != text.num_hidden_layers or layout.qk_layernorm != text.qk_layernorm:
        raise ValueError(
            f"The Show-o checkpoint has {layout.num_layers} layers and qk_layernorm={layout.qk_layernorm}; the "
            f"config has num_hidden_layers={text.num_hidden_layers} and qk_layernorm={text.qk_layernorm}"
        )
    sequential = text.block_style == "sequential"
    if sequential and not allow_sequential:
        raise ValueError(
            "Show-o blocks are parallel (x + Attn(LN x) + MLP(LN x)): convert into text_config.block_style='parallel' "
            "to keep the function, or pass allow_sequential=True (CLI: --block-style sequential) to accept a "
            "non-equivalent sequential model."
        )
    if config.moe_config.token_moe:
        _check_sizes(config, upcycle, showo_state_dict[layout.layer_key(0, "mlp.fc1")].shape[0])
    if layout.dropped:
        logger.warning(f"Dropping Show-o weights without a UniF²ace counterpart:\n  {_listing(layout.dropped)}")
    converted = {name: showo_state_dict[layout.key(name)] for name in GLOBAL_WEIGHTS}
    attention = ATTENTION_MODULES + (QK_NORM_MODULES if layout.qk_layernorm else ())
    for layer in range(layout.num_layers):
        target = f"model.layers.{layer}."
        for module in attention:
            for kind in ("weight", "bias"):
                converted[f"{target}{module}.{kind}"] = showo_state_dict[layout.layer_key(layer, module, kind)]
        if sequential:
            for kind in ("weight", "bias"):
                converted[f"{target}post_attention_layernorm.{kind}"] = converted[f"{target}input_layernorm.{kind}"]
        for name, value in _upcycled_mlp(layout.mlp(showo_state_dict, layer), config, upcycle).items():
            converted[f"{target}mlp.{name}"] = value
    return {name: value.clone(memory_format=torch.contiguous_format) for name, value in converted.items()}


def _load_checked(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str, strict: bool) -> None:
    """`module.load_state_dict`, with a ValueError naming unknown, missing (when strict) and mis-shaped keys."""
    target = module.state_dict()
    unexpected = [key for key in state_dict if key not in target]
    missing = [key for key in target if key not in state_dict] if strict else []
    mismatched = [
        f"{key}: {what} {tuple(value.shape)} vs model {tuple(target[key].shape)}"
        for key, value in state_dict.items() if key in target and value.shape != target[key].shape
    ]
    if unexpected or missing or mismatched:
        raise ValueError(
            f"The {what} weights do not fit the model built from the config:\n"
            + (f"size mismatches ({len(mismatched)}):\n  {_listing(mismatched)}\n" if mismatched else "")
            + (f"keys the model lacks ({len(unexpected)}):\n  {_listing(unexpected)}\n" if unexpected else "")
            + (f"keys missing ({len(missing)}):\n  {_listing(missing)}\n" if missing else "")
            + "Check the config (hidden size, vocabulary, experts, VQ) against the checkpoint."
        )
    module.load_state_dict(state_dict, strict=strict)


def unif2ace_from_showo(
    showo_state_dict: dict[str, torch.Tensor],
    config: UniF2aceConfig,
    *,
    upcycle: Literal["slice", "copy"] = "slice",
    seed: int = 0,
    vq_state_dict: dict[str, torch.Tensor] | None = None,
    allow_sequential: bool = False,
) -> UniF2aceForConditionalGeneration:
    """A UniF²ace model (eval mode) with the Show-o weights upcycled in ([`upcycle_showo_state_dict`]) and every new
    module (routers, sequence-level MoE, resamplers, encoders) freshly initialised from `seed` (the global RNG is left
    as it was). `vq_state_dict`: image-tokenizer weights with `UniF2aceVQModel` keys (`encoder.conv_in.weight`, ...)
    from a UniF²ace VQ checkpoint; without it the VQ is freshly initialised (Show-o's MAGVIT-v2 cannot be converted)."""
    converted = upcycle_showo_state_dict(showo_state_dict, config, upcycle=upcycle, allow_sequential=allow_sequential)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UniF2aceForConditionalGeneration(config)
    _load_checked(model, converted, "converted Show-o", strict=False)
    if vq_state_dict is not None:
        _load_checked(model.model.vq, vq_state_dict, "VQ", strict=True)
    else:
        logger.warning(
            "The UniF²ace VQ is freshly initialised: Show-o's MAGVIT-v2 has another architecture and cannot be "
            "converted. Pass vq_state_dict (CLI: --vq) from a trained UniF²ace VQ before using image inputs or outputs."
        )
    return model.eval()


def convert_showo_to_unif2ace(
    showo_state_dict: dict[str, torch.Tensor],
    config: UniF2aceConfig,
    *,
    upcycle: Literal["slice", "copy"] = "slice",
    seed: int = 0,
    vq_state_dict: dict[str, torch.Tensor] | None = None,
    allow_sequential: bool = False,
) -> dict[str, torch.Tensor]:
    """The full UniF²ace state dict (fused expert layout) for `model.load_state_dict(..., strict=True)`: the Show-o
    weights upcycled per `upcycle` plus freshly initialised new modules. See [`unif2ace_from_showo`]."""
    return unif2ace_from_showo(
        showo_state_dict, config, upcycle=upcycle, seed=seed, vq_state_dict=vq_state_dict,
        allow_sequential=allow_sequential,
    ).state_dict()


# --------------------------------------------------------------------------------------------------------------------
# Equivalence check
# --------------------------------------------------------------------------------------------------------------------
def dense_equivalence_error(
    showo_state_dict: dict[str, torch.Tensor],
    state_dict: dict[str, torch.Tensor],
    config: UniF2aceConfig,
    *,
    upcycle: Literal["slice", "copy"] = "slice",
    num_samples: int = 8,
    seed: int = 0,
) -> float:
    """max |MoE_dense(x) - MLP(x)| over all layers, both task groups and `num_samples` Gaussian inputs x (H,), in
    float64, between Show-o's dense MLPs and the converted token MoE with every routed expert of the group switched on:
    at weight 1 each for `"slice"` (Σ_e expert_e(x) + shared(x)), 1/E each for `"copy"` (any weights summing to 1 give
    the same). A correct conversion gives rounding-level errors (~1e-15); a wrong layout gives O(1)."""
    _check_upcycle(upcycle)
    layout = showo_layout(showo_state_dict)
    moe, act = config.moe_config, activation_function(config.text_config.hidden_act)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, config.text_config.hidden_size, generator=generator, dtype=torch.float64)

    def mlp(*weights: torch.Tensor) -> torch.Tensor:
        fc1_w, fc1_b, fc2_w, fc2_b = (w.double() for w in weights)
        return F.linear(act(F.linear(x, fc1_w, fc1_b)), fc2_w, fc2_b)

    error = 0.0
    for layer in range(layout.num_layers):
        reference = mlp(*layout.mlp(showo_state_dict, layer))
        prefix = f"model.layers.{layer}.mlp."
        if not moe.token_moe:
            outputs = [mlp(*(state_dict[prefix + n] for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")))]
        else:
            routed = [state_dict[f"{prefix}experts.{n}"] for n in EXPERT_PARAMETERS]
            shared = [state_dict[f"{prefix}shared_experts.{n}"] for n in EXPERT_PARAMETERS] \
                if moe.shared_expert_intermediate_size else None
            weight = 1.0 if upcycle == "slice" else 1.0 / moe.num_experts
            outputs = []
            for group in range(NUM_TASK_GROUPS):
                experts = range(group * moe.num_experts, (group + 1) * moe.num_experts)
                out = sum(weight * mlp(*(t[e] for t in routed)) for e in experts)
                outputs.append(out + mlp(*(t[group] for t in shared)) if shared is not None else out)
        error = max(error, *((out - reference).abs().max().item() for out in outputs))
    return error


# --------------------------------------------------------------------------------------------------------------------
# UniF²ace -> Show-o
# --------------------------------------------------------------------------------------------------------------------
def _dense_from_slices(layer: str, routed: dict, shared: dict | None, experts: int) -> tuple[torch.Tensor, ...]:
    hidden = routed["up_proj"].shape[2]
    fc1_w, fc1_b = [routed["up_proj"].reshape(-1, hidden)], [routed["up_proj_bias"].reshape(-1)]
    fc2_w = [routed["down_proj"].transpose(0, 1).reshape(hidden, -1)]
    biases = routed["down_proj_bias"]
    if shared is None:  # the fc2 bias was split evenly over the routed experts (exact back for E a power of two)
        if not torch.equal(biases, biases[:1].expand_as(biases)):
            raise ValueError(f"{layer}: the routed experts' fc2 biases differ, so they are not a sliced dense MLP")
        fc2_b = biases[0] * experts
    else:
        if bool(biases.any()):
            raise ValueError(f"{layer}: routed experts have non-zero fc2 biases, so they are not a sliced dense MLP")
        fc1_w.append(shared["up_proj"][0])
        fc1_b.append(shared["up_proj_bias"][0])
        fc2_w.append(shared["down_proj"][0])
        fc2_b = shared["down_proj_bias"][0]
    return torch.cat(fc1_w), torch.cat(fc1_b), torch.cat(fc2_w, dim=1), fc2_b


def _dense_from_copies(layer: str, routed: dict, shared: dict | None) -> tuple[torch.Tensor, ...]:
    first = {name: value[0] for name, value in routed.items()}
    identical = all(torch.equal(value, first[name].expand_as(value)) for name, value in routed.items())
    if shared is not None:
        identical = identical and all(torch.equal(shared[name][0], first[name]) for name in first)
    if not identical:
        raise ValueError(f"{layer}: the experts are not identical copies of one dense MLP (copy upcycling)")
    scale = 2.0 if shared is not None else 1.0
    return first["up_proj"], first["up_proj_bias"], first["down_proj"] * scale, first["down_proj_bias"] * scale


def _dense_mlp_weights(state_dict, prefix: str, config: UniF2aceConfig, upcycle: str) -> tuple[torch.Tensor, ...]:
    """(fc1 weight, fc1 bias, fc2 weight, fc2 bias) that the layer's token MoE was upcycled from."""
    moe = config.moe_config
    if not moe.token_moe:
        return tuple(state_dict[prefix + name] for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
    experts = moe.num_experts
    groups = []
    for g in range(NUM_TASK_GROUPS):
        routed = {n: state_dict[f"{prefix}experts.{n}"][g * experts:(g + 1) * experts] for n in EXPERT_PARAMETERS}
        shared = {n: state_dict[f"{prefix}shared_experts.{n}"][g:g + 1] for n in EXPERT_PARAMETERS} \
            if moe.shared_expert_intermediate_size else None
        groups.append((routed, shared))
    (routed, shared), others = groups[0], groups[1:]
    for other_routed, other_shared in others:
        same = all(torch.equal(routed[n], other_routed[n]) for n in EXPERT_PARAMETERS)
        same = same and (shared is None or all(torch.equal(shared[n], other_shared[n]) for n in EXPERT_PARAMETERS))
        if not same:
            raise ValueError(
                f"{prefix}: the task groups' experts differ (trained apart?), so the MoE is not an upcycled dense MLP "
                "and has no lossless Show-o form"
            )
    if upcycle == "slice":
        return _dense_from_slices(prefix, routed, shared, experts)
    return _dense_from_copies(prefix, routed, shared)


def convert_unif2ace_to_showo(
    state_dict: dict[str, torch.Tensor],
    config: UniF2aceConfig,
    *,
    upcycle: Literal["slice", "copy"] = "slice",
) -> dict[str, torch.Tensor]:
    """UniF²ace weights -> the dense Show-o LLM state dict (`showo.*` keys), losslessly.

    Only possible when the token MoE is exactly an upcycled dense MLP in the `upcycle` layout: both task groups equal
    and the experts reassemble fc1 / fc2 (slice: the concatenation; copy: identical copies); otherwise a ValueError
    names the layer. Routers, the sequence-level MoE, encoders and the VQ have no Show-o counterpart and are left out
    (with a warning when a sequence-level MoE is configured, as it changes the model's outputs)."""
    _check_upcycle(upcycle)
    text = config.text_config
    if text.block_style != "parallel":
        raise ValueError("Only parallel blocks (text_config.block_style='parallel') have a Show-o (Phi) form")
    if config.moe_config.sequence_moe:
        logger.warning("Leaving out the sequence-level MoE (no Show-o counterpart); Show-o computes without it.")
    showo = {SHOW_O_PREFIX + name: state_dict[name] for name in GLOBAL_WEIGHTS}
    attention = ATTENTION_MODULES + (QK_NORM_MODULES if text.qk_layernorm else ())
    for layer in range(text.num_hidden_layers):
        source, target = f"model.layers.{layer}.", f"{SHOW_O_PREFIX}model.layers.{layer}."
        for module in attention:
            for kind in ("weight", "bias"):
                showo[f"{target}{module}.{kind}"] = state_dict[f"{source}{module}.{kind}"]
        mlp = _dense_mlp_weights(state_dict, f"{source}mlp.", config, upcycle)
        names = (f"{target}{m}.{k}" for m in MLP_MODULES for k in ("weight", "bias"))
        showo.update(zip(names, mlp))
    return {name: value.clone(memory_format=torch.contiguous_format) for name, value in showo.items()}


def phi_config_dict(config: UniF2aceConfig, dense_width: int) -> dict:
    """A Phi `config.json` for the Show-o backbone, with current and legacy rope fields (Show-o's `phi.py` reads
    `rope_theta` / `partial_rotary_factor`)."""
    text = config.text_config
    rope = text.rope_parameters
    return {
        "model_type": "phi", "architectures": ["PhiForCausalLM"], "vocab_size": config.vocab_size,
        "hidden_size": text.hidden_size, "intermediate_size": dense_width, "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
        "hidden_act": text.hidden_act, "max_position_embeddings": text.max_position_embeddings,
        "layer_norm_eps": text.layer_norm_eps, "initializer_range": text.initializer_range,
        "resid_pdrop": text.resid_pdrop, "embd_pdrop": text.embd_pdrop, "attention_dropout": text.attention_dropout,
        "qk_layernorm": text.qk_layernorm, "tie_word_embeddings": False, "rope_parameters": dict(rope),
        "rope_theta": rope["rope_theta"], "partial_rotary_factor": rope["partial_rotary_factor"], "rope_scaling": None,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
    }


def save_showo_checkpoint(
    showo_state_dict: dict[str, torch.Tensor], config: UniF2aceConfig, save_directory: str | Path
) -> Path:
    """Write a Show-o folder: `model.safetensors` (Show-o keys), Show-o's `config.json` (the `Showo` model arguments)
    and `phi/config.json` (the Phi backbone; `llm_model_path` points to it). Show-o's own loader reads
    `pytorch_model.bin`: `torch.save(safetensors.torch.load_file(...), ...)` makes one if you need it."""
    folder = Path(save_directory)
    (folder / "phi").mkdir(parents=True, exist_ok=True)
    dense_width = showo_state_dict[f"{SHOW_O_PREFIX}model.layers.0.mlp.fc1.weight"].shape[0]
    save_file(showo_state_dict, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "phi" / "config.json").write_text(json.dumps(phi_config_dict(config, dense_width), indent=2))
    showo_config = {
        "_class_name": "Showo", "w_clip_vit": False, "vocab_size": config.vocab_size,
        "llm_vocab_size": config.text_vocab_size, "llm_model_path": str((folder / "phi").resolve()),
        "codebook_size": config.codebook_size, "num_vq_tokens": config.num_image_tokens,
        "num_new_special_tokens": len(config.special_tokens), "load_from_showo": True,
    }
    (folder / "config.json").write_text(json.dumps(showo_config, indent=2))
    return folder


# --------------------------------------------------------------------------------------------------------------------
# Folder to folder (the `unif2ace convert` command)
# --------------------------------------------------------------------------------------------------------------------
def convert_showo_folder(
    source: str | Path,
    destination: str | Path,
    *,
    upcycle: Literal["slice", "copy"] = "slice",
    allow_pickle: bool = False,
    config: str | Path | None = None,
    num_attention_heads: int = PHI_15_NUM_ATTENTION_HEADS,
    vq: str | Path | None = None,
    block_style: Literal["parallel", "sequential"] | None = None,
    seed: int = 0,
) -> float:
    """Show-o checkpoint (see [`load_showo_checkpoint`]) -> a UniF²ace folder (`save_pretrained`).

    `config`: a UniF²ace `config.json` (or its folder) to convert into; default: derived by
    [`unif2ace_config_from_showo`] (with Show-o's `config.json` next to the weights). `vq`: a saved `UniF2aceVQModel`
    folder whose weights (and, for a derived config, config) the converted model keeps. `block_style` overrides the
    config's; `"sequential"` accepts a non-equivalent sequential model. Returns the [`dense_equivalence_error`]."""
    showo_state_dict = load_showo_checkpoint(source, allow_pickle=allow_pickle)
    vq_model = UniF2aceVQModel.from_pretrained(vq) if vq is not None else None
    if config is None:
        unif2ace_config = unif2ace_config_from_showo(
            showo_state_dict, upcycle=upcycle, showo_config=read_showo_config(source),
            num_attention_heads=num_attention_heads, vq_config=vq_model.config if vq_model else None,
            text_config={"block_style": block_style} if block_style else {},
        )
    else:
        load = UniF2aceConfig.from_json_file if Path(config).is_file() else UniF2aceConfig.from_pretrained
        unif2ace_config = load(config)
        if block_style:
            unif2ace_config.text_config.block_style = block_style
    model = unif2ace_from_showo(
        showo_state_dict, unif2ace_config, upcycle=upcycle, seed=seed,
        vq_state_dict=vq_model.state_dict() if vq_model else None, allow_sequential=block_style == "sequential",
    )
    error = dense_equivalence_error(showo_state_dict, model.state_dict(), unif2ace_config, upcycle=upcycle)
    model.save_pretrained(destination)
    return error


def convert_unif2ace_folder(
    source: str | Path, destination: str | Path, *, upcycle: Literal["slice", "copy"] = "slice"
) -> Path:
    """A UniF²ace folder whose token MoE is an upcycled dense MLP -> a Show-o folder ([`save_showo_checkpoint`])."""
    model = UniF2aceForConditionalGeneration.from_pretrained(source)
    showo_state_dict = convert_unif2ace_to_showo(model.state_dict(), model.config, upcycle=upcycle)
    return save_showo_checkpoint(showo_state_dict, model.config, destination)


__all__ = [
    "ShowoLayout",
    "convert_showo_folder",
    "convert_showo_to_unif2ace",
    "convert_unif2ace_folder",
    "convert_unif2ace_to_showo",
    "dense_equivalence_error",
    "load_showo_checkpoint",
    "read_showo_config",
    "save_showo_checkpoint",
    "showo_layout",
    "unif2ace_config_from_showo",
    "unif2ace_from_showo",
    "upcycle_showo_state_dict",
]
