"""Saving and loading: every Auto class, sharded safetensors, bf16, trust_remote_code without the package, bad checkpoints."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
)

from conftest import BLOCK_PACKAGE, UNDERSTANDING_OPTIONS, mmu_ids
from transformers_f2ace import UniF2aceConfig, UniF2aceForConditionalGeneration, UniF2aceModel


TEXT = [21, 22, 23]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize(
    "auto_class, expected",
    [
        (AutoModel, UniF2aceModel),
        (AutoModelForCausalLM, UniF2aceForConditionalGeneration),
        (AutoModelForImageTextToText, UniF2aceForConditionalGeneration),
        (AutoModelForMultimodalLM, UniF2aceForConditionalGeneration),
    ],
)
def test_round_trip_through_every_auto_class(tmp_path, tiny_model, auto_class, expected):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin")), "weights must be safetensors only"
    loaded = auto_class.from_pretrained(tmp_path)
    assert type(loaded) is expected
    ids = mmu_ids(tiny_model.config, TEXT)
    if expected is UniF2aceModel:
        assert_same_weights(tiny_model.model, loaded)
        reference = tiny_model.model(ids).last_hidden_state
        torch.testing.assert_close(loaded(ids).last_hidden_state, reference, atol=1e-6, rtol=1e-6)
    else:
        assert_same_weights(tiny_model, loaded)
        torch.testing.assert_close(loaded(ids).logits, tiny_model(ids).logits, atol=1e-6, rtol=1e-6)


def test_config_round_trip_through_auto_config(tmp_path, tiny_config):
    tiny_config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is UniF2aceConfig
    ignore = {"_name_or_path"}
    assert {k: v for k, v in loaded.to_dict().items() if k not in ignore} == {
        k: v for k, v in tiny_config.to_dict().items() if k not in ignore
    }
    assert loaded.mask_token_id == tiny_config.mask_token_id


def test_sharded_safetensors_round_trip(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {shard.name for shard in shards}
    assert_same_weights(tiny_model, AutoModelForCausalLM.from_pretrained(tmp_path))


def test_bf16_round_trip(tmp_path, tiny_model):
    model = tiny_model.to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert_same_weights(model, loaded)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert auto.dtype == torch.bfloat16
    ids = mmu_ids(model.config, TEXT)
    out = loaded(ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_saved_folder_carries_the_model_code_and_full_auto_map(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    for name in ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText",
                 "AutoModelForMultimodalLM"):
        module = auto_map[name].split(".")[0]
        assert (tmp_path / f"{module}.py").exists(), name
    for source in tmp_path.glob("*.py"):
        assert "transformers_f2ace" not in source.read_text(), f"{source.name} must only use relative imports"


REMOTE_CODE_SCRIPT = BLOCK_PACKAGE + textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForImageTextToText
    folder, ids_file, out_file = sys.argv[1:4]
    try:
        AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=False)
    except Exception as error:  # without the package and without trust, loading must refuse
        refused = type(error).__name__
    else:
        refused = None
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    assert "transformers_f2ace" not in sys.modules
    with torch.no_grad():
        logits = model(torch.load(ids_file)).logits
    torch.save({"logits": logits, "refused": refused, "module": type(model).__module__}, out_file)
    """
)


@pytest.mark.parametrize("moe", [{}, UNDERSTANDING_OPTIONS], ids=["paper", "understanding_options"])
def test_trust_remote_code_load_without_the_package(tmp_path, moe):
    torch.manual_seed(0)
    tiny_model = UniF2aceForConditionalGeneration(UniF2aceConfig.tiny(moe_config=moe)).eval()
    folder = tmp_path / "checkpoint"
    tiny_model.save_pretrained(folder)
    ids = mmu_ids(tiny_model.config, TEXT)
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "load.py"
    script.write_text(REMOTE_CODE_SCRIPT)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["refused"] is not None
    assert out["module"].startswith("transformers_modules")
    torch.testing.assert_close(out["logits"], tiny_model(ids).logits, atol=1e-6, rtol=1e-6)


def test_checkpoint_with_mismatched_shapes_is_refused_with_the_parameter_named(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["hidden_size"] = 96
    config["text_config"]["intermediate_size"] = 192
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match") as error:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "model.embed_tokens.weight: checkpoint (1027, 64) vs model (1027, 96)" in str(error.value)
    # deliberately accepting re-initialised weights still works
    model = AutoModelForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    assert model.config.text_config.hidden_size == 96


def test_checkpoint_missing_weights_is_refused(tmp_path, tiny_config):
    dense = UniF2aceForConditionalGeneration(UniF2aceConfig.tiny(moe_config=dict(token_moe=False)))
    dense.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["moe_config"]["token_moe"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_with_a_different_codebook_is_refused(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vq_config"]["codebook_bits"] += 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lm_head.weight: checkpoint"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_stored_text_vocab_size_is_rederived_from_the_layout(tiny_config):
    data = tiny_config.to_dict()
    data["text_config"]["vocab_size"] = 5
    # the unified vocabulary is derived from the layout; a stored text_config.vocab_size is overwritten, never trusted
    assert UniF2aceConfig.from_dict(data).text_config.vocab_size == tiny_config.vocab_size


def test_per_expert_checkpoints_load_into_the_fused_layout(tmp_path, tiny_model):
    from safetensors.torch import load_file, save_file

    tiny_model.save_pretrained(tmp_path)
    fused = load_file(tmp_path / "model.safetensors")
    assert "model.layers.0.mlp.experts.up_proj" in fused, "our own saves keep the fused layout"
    names = {"up_proj": "fc1.weight", "up_proj_bias": "fc1.bias", "down_proj": "fc2.weight", "down_proj_bias": "fc2.bias"}
    per_expert = {}
    for key, value in fused.items():
        prefix, name = key.rsplit(".", 1)
        if prefix.endswith((".mlp.experts", ".mlp.shared_experts")):
            per_expert.update({f"{prefix}.{e}.{names[name]}": value[e].clone() for e in range(value.shape[0])})
        else:
            per_expert[key] = value
    assert "model.layers.1.mlp.experts.7.fc2.bias" in per_expert
    save_file(per_expert, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert_same_weights(tiny_model, AutoModelForCausalLM.from_pretrained(tmp_path))


def test_base_model_checkpoint_loads_into_the_head_class(tmp_path, tiny_model):
    tiny_model.model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same_weights(tiny_model.model, loaded.model)
