"""Default LoRA targets for UniF²ace with PEFT (>= 0.21).

Where the decoder's weights live, and how PEFT reaches each part (`parts` of [`default_lora_target_modules`]):

    attention         model.layers.{i}.self_attn.{q_proj,k_proj,v_proj,dense}     nn.Linear -> `target_modules`
    experts           model.layers.{i}.mlp.experts.{up_proj,down_proj}             fused 3-D nn.Parameter (E, out, in)
                                                                                   -> `target_parameters` (PEFT's
                                                                                   ParamWrapper: one rank-r LoRA per
                                                                                   expert, both task groups)
                      model.layers.{i}.mlp.{fc1,fc2}  (token_moe=False: dense MLP) nn.Linear -> `target_modules`
    shared_experts    model.layers.{i}.mlp.shared_experts.{up_proj,down_proj}      fused 3-D -> `target_parameters`
    routers           model.layers.{i}.mlp.gate.weight (G*E, H)                    a raw nn.Parameter of the router
                                                                                   module (not an nn.Linear) ->
                                                                                   `target_parameters`
    sequence_routers  model.layers.{i}.sequence_moe.router                         nn.Linear -> `target_modules`

The LM head is trained in full and saved with the adapter (`modules_to_save=["lm_head"]`, `train_lm_head=True`).
The attention pattern is anchored on the decoder layers: the CLIP encoder and the Perceiver resamplers also own
`q_proj` / `k_proj` / `v_proj` modules, which a plain `["q_proj", ...]` list would wrap too. The frozen VQ tokenizer
and feature encoders are never targeted.

PEFT's ParamWrapper (experts, shared experts, routers) supports neither `lora_dropout`, `lora_bias`, DoRA nor
`fan_in_fan_out`; [`default_lora_config`] refuses those combinations up front.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .configuration_unif2ace import UniF2aceConfig


if TYPE_CHECKING:
    from peft import LoraConfig


LORA_PARTS = ("attention", "experts", "shared_experts", "routers", "sequence_routers")
DEFAULT_LORA_PARTS = ("attention", "experts", "routers")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "dense")
# decoder layers of UniF2aceForConditionalGeneration ("model.layers.i") or of a bare UniF2aceModel ("layers.i")
_DECODER_LAYER = r"(?:model\.)?layers\.\d+\."
# LoraConfig options that PEFT's ParamWrapper (the `target_parameters` path) rejects
_PARAM_WRAPPER_UNSUPPORTED = {"lora_dropout": 0.0, "lora_bias": False, "use_dora": False, "fan_in_fan_out": False}


def default_lora_target_modules(
    config: UniF2aceConfig, parts: Sequence[str] = DEFAULT_LORA_PARTS, train_lm_head: bool = True
) -> dict[str, Any]:
    """
    The `LoraConfig` targeting arguments for `parts` of a UniF²ace decoder (see the module docstring).

    Args:
        config: the model's config (decides between fused experts and a dense MLP, and whether there are shared
            experts, routers and sequence-level routers).
        parts: any of `LORA_PARTS`; default `("attention", "experts", "routers")`.
        train_lm_head: add `modules_to_save=["lm_head"]`.

    Returns:
        `{"target_modules": regex str or [] (no module), "target_parameters": list[str] or None, "modules_to_save":
        list[str] or None}`, to pass to `peft.LoraConfig(**...)`. `target_modules` is a regex (PEFT full-matches it
        against module names); `target_parameters` are name suffixes of the parameters.
    """
    parts = tuple(parts)
    unknown = sorted(set(parts) - set(LORA_PARTS))
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty selection of {LORA_PARTS}, got {parts!r}")
    moe = config.moe_config
    modules, parameters = [], []
    if "attention" in parts:
        modules.append(rf"self_attn\.(?:{'|'.join(ATTENTION_PROJECTIONS)})")
    if "experts" in parts:
        if moe.token_moe:
            parameters += ["mlp.experts.up_proj", "mlp.experts.down_proj"]
        else:
            modules.append(r"mlp\.(?:fc1|fc2)")
    if "shared_experts" in parts:
        if not moe.token_moe or moe.shared_expert_intermediate_size == 0:
            raise ValueError(
                "parts includes 'shared_experts' but this model has none (moe_config.token_moe="
                f"{moe.token_moe}, shared_expert_intermediate_size={moe.shared_expert_intermediate_size})"
            )
        parameters += ["mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"]
    if "routers" in parts:
        if not moe.token_moe:
            raise ValueError(
                "parts includes 'routers' but this model has no token-level MoE (moe_config.token_moe=False)"
            )
        parameters.append("mlp.gate.weight")
    if "sequence_routers" in parts:
        if not moe.sequence_moe:
            raise ValueError(
                "parts includes 'sequence_routers' but this model has no sequence-level MoE "
                "(moe_config.sequence_moe=False)"
            )
        modules.append(r"sequence_moe\.router")
    return {
        "target_modules": f"{_DECODER_LAYER}(?:{'|'.join(modules)})" if modules else [],
        "target_parameters": parameters or None,
        "modules_to_save": ["lm_head"] if train_lm_head else None,
    }


def default_lora_config(
    config: UniF2aceConfig,
    parts: Sequence[str] = DEFAULT_LORA_PARTS,
    r: int = 16,
    lora_alpha: int = 32,
    train_lm_head: bool = True,
    **kwargs,
) -> "LoraConfig":
    """
    A `peft.LoraConfig` on `parts` of the decoder ([`default_lora_target_modules`]), rank `r`, scale `lora_alpha / r`.
    Other keyword arguments go to `LoraConfig` (e.g. `init_lora_weights`, `use_rslora`, `rank_pattern`).

        >>> from peft import get_peft_model
        >>> model = get_peft_model(model, default_lora_config(model.config, r=8))
    """
    from peft import LoraConfig

    targets = default_lora_target_modules(config, parts, train_lm_head)
    if targets["target_parameters"]:
        for name, supported in _PARAM_WRAPPER_UNSUPPORTED.items():
            if kwargs.get(name, supported) != supported:
                raise ValueError(
                    f"{name}={kwargs[name]!r} is not supported on fused experts / routers (PEFT's target_parameters); "
                    f"use {name}={supported!r} or parts without 'experts', 'shared_experts' and 'routers'"
                )
    return LoraConfig(r=r, lora_alpha=lora_alpha, **targets, **kwargs)


__all__ = ["LORA_PARTS", "DEFAULT_LORA_PARTS", "default_lora_target_modules", "default_lora_config"]
