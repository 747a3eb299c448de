"""PEFT LoRA on UniF²ace: default targets (attention, fused experts, routers, LM head), save / reload / merge, loading
an adapter folder through the Auto classes, gradients (also under gradient checkpointing). Real PEFT, tiny models."""

import json
import re

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from transformers_f2ace import UniF2aceConfig, UniF2aceForConditionalGeneration
from transformers_f2ace.peft_utils import LORA_PARTS, default_lora_config, default_lora_target_modules
from transformers_f2ace.training import UniF2aceDataCollator


peft = pytest.importorskip("peft")
from peft import PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer, ParamWrapper  # noqa: E402

RANK = 2
# merge_and_unload folds B·A into the weights: the merged model differs from the adapter one by float32 rounding only
# (measured ~3e-7 on logits of magnitude ~1); 1e-5 leaves a margin and is far below the adapter's effect (> 1e-2).
MERGE_ATOL = 1e-5


def records() -> list[dict]:
    """2 T2I + 2 MMU records, so that both task groups' experts and routers see tokens."""
    red, blue = Image.new("RGB", (32, 32), (200, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 200))
    return [
        {"image": red, "caption": "a smiling woman with red hair"},
        {"image": red, "conversations": [{"from": "human", "value": "<image>\nis the person smiling?"},
                                         {"from": "gpt", "value": "yes"}]},
        {"image": blue, "caption": "a man with a short black beard"},
        {"image": blue, "conversations": [{"from": "human", "value": "what colour is the hair?"},
                                          {"from": "gpt", "value": "brown curly hair"}]},
    ]


@pytest.fixture
def batch(tiny_config, tiny_processor):
    return UniF2aceDataCollator.from_config(tiny_processor, tiny_config, seed=0)(records())


@pytest.fixture
def base_dir(tmp_path, tiny_config):
    torch.manual_seed(0)
    UniF2aceForConditionalGeneration(tiny_config).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def lora_model(model, **kwargs):
    """LoRA with B initialised non-zero (`init_lora_weights=False`), so that the adapter changes every output."""
    torch.manual_seed(1)
    return get_peft_model(model, default_lora_config(model.config, r=RANK, lora_alpha=4, init_lora_weights=False,
                                                     **kwargs))


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


# -------------------------------------------------------------------------------------------------------- targets
def wrapped_targets(model) -> set[str]:
    """`module` for LoRA-wrapped modules, `module.parameter` for LoRA-wrapped parameters (nested wrappers unrolled)."""
    found = set()
    for name, module in model.named_modules():
        name = re.sub(r"^base_model\.model\.", "", name)
        if isinstance(module, ParamWrapper):
            owner = re.sub(r"(\.base_layer)+$", "", name)
            found.add(f"{owner}.{module.parameter_name}")
        elif isinstance(module, LoraLayer):
            found.add(name)
    return found


def test_default_targets_are_exactly_the_decoder_parts(tiny_config, tiny_model):
    model = lora_model(tiny_model)
    expected = set()
    for i in range(tiny_config.text_config.num_hidden_layers):  # naive enumeration from the config
        expected |= {f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "dense")}
        expected |= {f"model.layers.{i}.mlp.experts.up_proj", f"model.layers.{i}.mlp.experts.down_proj",
                     f"model.layers.{i}.mlp.gate.weight"}
    assert wrapped_targets(model) == expected  # no CLIP / resampler q_proj, no shared experts, no VQ
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n or "lm_head.modules_to_save" in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)
    # one rank-r pair per expert: A (r*E, in), B (out, r*E)
    experts = model.base_model.model.model.layers[0].mlp.experts
    num_experts = 2 * tiny_config.moe_config.num_experts
    shapes = {w.parameter_name: (tuple(w.lora_A["default"].weight.shape), tuple(w.lora_B["default"].weight.shape))
              for w in (experts, experts.base_layer)}
    hidden, width = tiny_config.text_config.hidden_size, tiny_config.moe_config.expert_intermediate_size
    assert shapes == {"up_proj": ((RANK * num_experts, hidden), (width, RANK * num_experts)),
                      "down_proj": ((RANK * num_experts, width), (hidden, RANK * num_experts))}


def test_optional_parts(tiny_config, tiny_model):
    model = lora_model(tiny_model, parts=LORA_PARTS)
    layer = "model.layers.1"
    assert {f"{layer}.mlp.shared_experts.up_proj", f"{layer}.mlp.shared_experts.down_proj",
            f"{layer}.sequence_moe.router"} <= wrapped_targets(model)
    attention_only = default_lora_target_modules(tiny_config, parts=("attention",), train_lm_head=False)
    assert attention_only["target_parameters"] is None and attention_only["modules_to_save"] is None
    assert re.fullmatch(attention_only["target_modules"], "model.layers.11.self_attn.dense")
    assert re.fullmatch(attention_only["target_modules"], "layers.0.self_attn.q_proj")  # a bare UniF2aceModel
    clip = "model.feature_encoders.semantic_encoder.encoder.layers.0.self_attn.q_proj"
    assert not re.fullmatch(attention_only["target_modules"], clip)


def test_dense_mlp_and_bad_parts(tiny_model):
    dense = UniF2aceConfig.tiny(moe_config=dict(token_moe=False))
    targets = default_lora_target_modules(dense, parts=("experts",))
    assert targets["target_parameters"] is None and re.fullmatch(targets["target_modules"], "model.layers.0.mlp.fc2")
    torch.manual_seed(0)
    model = lora_model(UniF2aceForConditionalGeneration(dense), parts=("attention", "experts"))
    assert {"model.layers.0.mlp.fc1", "model.layers.1.mlp.fc2"} <= wrapped_targets(model)
    with pytest.raises(ValueError, match="no token-level MoE"):
        default_lora_target_modules(dense, parts=("routers",))
    with pytest.raises(ValueError, match="has none"):
        default_lora_target_modules(dense, parts=("shared_experts",))
    with pytest.raises(ValueError, match="parts must be"):
        default_lora_target_modules(tiny_model.config, parts=("mlp",))
    with pytest.raises(ValueError, match="lora_dropout"):
        default_lora_config(tiny_model.config, lora_dropout=0.1)
    assert default_lora_config(tiny_model.config, parts=("attention",), lora_dropout=0.1).lora_dropout == 0.1


# ---------------------------------------------------------------------------------------------- save, reload, merge
def test_save_reload_merge_and_auto_loading(tmp_path, base_dir, batch):
    model = lora_model(AutoModelForImageTextToText.from_pretrained(base_dir)).eval()
    with torch.no_grad():  # the trained LM-head copy differs from the base head
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.05)
    base_logits = logits(AutoModelForImageTextToText.from_pretrained(base_dir).eval(), batch)
    adapter_logits = logits(model, batch)
    assert (adapter_logits - base_logits).abs().max() > 1e-2

    model.save_pretrained(tmp_path / "adapter")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_dir)
    assert set(adapter_config["target_parameters"]) == {"mlp.experts.up_proj", "mlp.experts.down_proj",
                                                        "mlp.gate.weight"}

    # reload on a fresh base: identical outputs
    reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), tmp_path / "adapter")
    assert torch.equal(logits(reloaded.eval(), batch), adapter_logits)

    # merge: same outputs up to rounding; every targeted weight moved by a rank <= r update per expert
    base_weights = UniF2aceForConditionalGeneration.from_pretrained(base_dir).state_dict()
    merged = reloaded.merge_and_unload()
    assert type(merged) is UniF2aceForConditionalGeneration
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    merged_logits = logits(merged.eval(), batch)
    torch.testing.assert_close(merged_logits, adapter_logits, atol=MERGE_ATOL, rtol=0)
    merged_weights = merged.state_dict()
    assert merged_weights.keys() == base_weights.keys()
    for name in ("model.layers.0.mlp.experts.up_proj", "model.layers.1.mlp.experts.down_proj"):
        delta = merged_weights[name] - base_weights[name]
        assert all(0 < int(torch.linalg.matrix_rank(d)) <= RANK for d in delta)  # one rank-r update per expert
    for name in ("model.layers.0.mlp.gate.weight", "model.layers.1.self_attn.dense.weight"):
        assert 0 < int(torch.linalg.matrix_rank(merged_weights[name] - base_weights[name])) <= RANK
    targeted = r"self_attn\.(q_proj|k_proj|v_proj|dense)\.weight$|mlp\.(experts\.(up|down)_proj|gate\.weight)$|lm_head"
    untouched = [name for name in base_weights if not re.search(targeted, name)]
    assert all(torch.equal(merged_weights[n], base_weights[n]) for n in untouched)

    # the merged model is a plain checkpoint again
    merged.save_pretrained(tmp_path / "merged")
    assert torch.equal(logits(AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval(), batch),
                       merged_logits)

    # transformers' PEFT integration: an adapter folder loads directly, its base from base_model_name_or_path
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path / "adapter").eval()
    assert type(auto) is UniF2aceForConditionalGeneration and auto.active_adapters() == ["default"]
    assert torch.equal(logits(auto, batch), adapter_logits)


# --------------------------------------------------------------------------------------------------------- gradients
def lora_gradients(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the T2I noise expert draws from the global RNG at train time
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradients_reach_every_adapter_also_with_checkpointing(tiny_model, batch):
    model = lora_model(tiny_model).train()
    grads = lora_gradients(model, batch)
    assert all(bool(g.abs().sum() > 0) for g in grads.values()), [n for n, g in grads.items() if not g.abs().sum()]
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.base_model.model.model.gradient_checkpointing
    checkpointed = lora_gradients(model, batch)
    assert checkpointed.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
