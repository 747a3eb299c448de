"""Show-o -> UniF²ace conversion (SPEC §3.3): upcycling layouts, dense equivalence against a real `PhiForCausalLM`
(Show-o's backbone), the lossless way back, checkpoint loading safety, errors, and the `unif2ace convert` command.

The Show-o checkpoints are tiny synthetic ones with Show-o's real key names: `showo.` + `PhiForCausalLM.state_dict()`
(qk_layernorm on, as Show-o's `phi.py` forces)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PhiConfig, PhiForCausalLM

from transformers_f2ace import UniF2aceConfig, UniF2aceForConditionalGeneration, UniF2aceVQModel
from transformers_f2ace.cli import main
from transformers_f2ace.conversion import (
    convert_showo_to_unif2ace,
    convert_unif2ace_to_showo,
    dense_equivalence_error,
    load_showo_checkpoint,
    save_showo_checkpoint,
    unif2ace_config_from_showo,
    unif2ace_from_showo,
)


DENSE, EXPERTS, SHARED = 128, 4, 32  # tiny Phi MLP width; slice: 4 experts x 24 + shared 32 = 128
TEXT = [5, 17, 301, 42, 999, 7, 64, 128, 3]


def target_config(upcycle: str = "slice", **moe) -> UniF2aceConfig:
    """Tiny UniF²ace in Show-o's block style; the token MoE sized for `upcycle`."""
    sizes = (
        dict(expert_intermediate_size=(DENSE - SHARED) // EXPERTS, shared_expert_intermediate_size=SHARED)
        if upcycle == "slice"
        else dict(expert_intermediate_size=DENSE, shared_expert_intermediate_size=DENSE, norm_topk_prob=True)
    )
    return UniF2aceConfig.tiny(
        text_config=dict(block_style="parallel", qk_layernorm=True, intermediate_size=DENSE),
        moe_config={"num_experts": EXPERTS, "num_experts_per_tok": 2, **sizes, **moe},
    )


def showo_phi(config: UniF2aceConfig, seed: int = 1) -> PhiForCausalLM:
    """A random Phi-1.5-shaped backbone over the unified vocabulary (weights far from init, LayerNorm scales ~1)."""
    text = config.text_config
    phi = PhiForCausalLM(PhiConfig(
        vocab_size=config.vocab_size, hidden_size=text.hidden_size, intermediate_size=DENSE,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads, qk_layernorm=True,
        max_position_embeddings=text.max_position_embeddings, layer_norm_eps=text.layer_norm_eps,
    ))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in phi.named_parameters():
            offset = 1.0 if "layernorm.weight" in name else 0.0
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1 + offset)
    return phi.eval()


def showo_state_dict(phi: PhiForCausalLM) -> dict[str, torch.Tensor]:
    return {f"showo.{key}": value.clone() for key, value in phi.state_dict().items()}


@pytest.fixture(scope="module")
def phi() -> PhiForCausalLM:
    return showo_phi(target_config())


@pytest.fixture
def showo(phi) -> dict[str, torch.Tensor]:
    return showo_state_dict(phi)


def text_batch(config: UniF2aceConfig) -> torch.Tensor:
    """Two text-only rows (no image span): one routed to the MMU group, one (leading <|t2i|>) to the T2I group."""
    return torch.tensor([[1, *TEXT], [config.t2i_token_id, *TEXT]])


# --------------------------------------------------------------------------------------------------------------------
# Upcycling layouts
# --------------------------------------------------------------------------------------------------------------------
def test_slice_upcycling_layout(showo):
    config = target_config()
    converted = convert_showo_to_unif2ace(showo, config, upcycle="slice")
    width = (DENSE - SHARED) // EXPERTS
    for layer in range(2):
        fc1_w, fc1_b, fc2_w, fc2_b = (showo[f"showo.model.layers.{layer}.mlp.{name}"]
                                      for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
        mlp = f"model.layers.{layer}.mlp."
        for group in range(2):
            for e in range(EXPERTS):
                row, units = group * EXPERTS + e, slice(e * width, (e + 1) * width)
                assert torch.equal(converted[mlp + "experts.up_proj"][row], fc1_w[units])
                assert torch.equal(converted[mlp + "experts.up_proj_bias"][row], fc1_b[units])
                assert torch.equal(converted[mlp + "experts.down_proj"][row], fc2_w[:, units])
                assert not converted[mlp + "experts.down_proj_bias"][row].any()
            rest = slice(EXPERTS * width, DENSE)
            assert torch.equal(converted[mlp + "shared_experts.up_proj"][group], fc1_w[rest])
            assert torch.equal(converted[mlp + "shared_experts.up_proj_bias"][group], fc1_b[rest])
            assert torch.equal(converted[mlp + "shared_experts.down_proj"][group], fc2_w[:, rest])
            assert torch.equal(converted[mlp + "shared_experts.down_proj_bias"][group], fc2_b)
        for module in ("input_layernorm", "self_attn.q_proj", "self_attn.dense", "self_attn.k_layernorm"):
            for kind in ("weight", "bias"):
                key = f"model.layers.{layer}.{module}.{kind}"
                assert torch.equal(converted[key], showo[f"showo.{key}"]), key
    for key in ("model.embed_tokens.weight", "model.final_layernorm.bias", "lm_head.weight", "lm_head.bias"):
        assert torch.equal(converted[key], showo[f"showo.{key}"]), key
    UniF2aceForConditionalGeneration(config).load_state_dict(converted, strict=True)


def test_copy_upcycling_layout(showo):
    config = target_config("copy")
    converted = convert_showo_to_unif2ace(showo, config, upcycle="copy")
    fc1_w, fc2_w = showo["showo.model.layers.1.mlp.fc1.weight"], showo["showo.model.layers.1.mlp.fc2.weight"]
    fc2_b = showo["showo.model.layers.1.mlp.fc2.bias"]
    for part, rows in (("experts", 2 * EXPERTS), ("shared_experts", 2)):
        for row in range(rows):
            assert torch.equal(converted[f"model.layers.1.mlp.{part}.up_proj"][row], fc1_w)
            assert torch.equal(converted[f"model.layers.1.mlp.{part}.down_proj"][row], fc2_w / 2)
            assert torch.equal(converted[f"model.layers.1.mlp.{part}.down_proj_bias"][row], fc2_b / 2)


def test_slice_without_shared_expert_spreads_the_fc2_bias(showo):
    config = target_config(expert_intermediate_size=DENSE // EXPERTS, shared_expert_intermediate_size=0)
    converted = convert_showo_to_unif2ace(showo, config)
    assert "model.layers.0.mlp.shared_experts.up_proj" not in converted
    bias = converted["model.layers.0.mlp.experts.down_proj_bias"]
    assert torch.allclose(bias, showo["showo.model.layers.0.mlp.fc2.bias"].expand(2 * EXPERTS, -1) / EXPERTS)
    assert dense_equivalence_error(showo, converted, config) < 1e-12


# --------------------------------------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("upcycle", ["slice", "copy"])
def test_experts_plus_shared_reproduce_the_dense_mlp(showo, upcycle):
    config = target_config(upcycle)
    converted = convert_showo_to_unif2ace(showo, config, upcycle=upcycle)
    assert dense_equivalence_error(showo, converted, config, upcycle=upcycle) < 1e-12
    # the check is not vacuous: one expert's down projection exchanged with another's breaks it
    down = converted["model.layers.1.mlp.experts.down_proj"]
    down[[0, 1]] = down[[1, 0]] if upcycle == "slice" else down[[1, 0]] * 1.5
    assert dense_equivalence_error(showo, converted, config, upcycle=upcycle) > 1e-3


def test_logits_match_phi_on_the_dense_equivalent_path(phi, showo):
    """Slice upcycling with every routed expert on at weight 1 is Show-o: k = E, zero router (uniform weights 1/E),
    routed down projections scaled by E (exact for E = 4) to turn the 1/E into 1."""
    config = target_config(num_experts_per_tok=EXPERTS, sequence_moe=False)
    model = unif2ace_from_showo(showo, config, upcycle="slice")
    ids = text_batch(config)
    with torch.no_grad():
        reference = phi(ids).logits
        uncompensated = model(ids).logits
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
            layer.mlp.experts.down_proj.mul_(EXPERTS)
            layer.mlp.experts.down_proj_bias.mul_(EXPERTS)
        logits = model(ids).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=2e-5)
    assert (uncompensated - reference).abs().max() > 1e-2


def test_copy_upcycling_matches_phi_with_real_top_k_routing(phi, showo):
    """Copy upcycling with renormalised top-2 routing is Show-o for ANY router: random routers, no adjustment."""
    config = target_config("copy", sequence_moe=False)
    model = unif2ace_from_showo(showo, config, upcycle="copy")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
        logits = model(text_batch(config)).logits
    torch.testing.assert_close(logits, phi(text_batch(config)).logits, rtol=0, atol=2e-5)


def test_dense_target_matches_phi(phi, showo):
    config = target_config(token_moe=False, sequence_moe=False)
    model = unif2ace_from_showo(showo, config)
    with torch.no_grad():
        torch.testing.assert_close(model(text_batch(config)).logits, phi(text_batch(config)).logits, rtol=0, atol=2e-5)
    back = convert_unif2ace_to_showo(model.state_dict(), config)
    assert back.keys() == showo.keys() and all(torch.equal(back[k], showo[k]) for k in showo)


# --------------------------------------------------------------------------------------------------------------------
# Back to Show-o
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "upcycle, moe",
    [("slice", {}), ("copy", {}),
     ("slice", dict(expert_intermediate_size=DENSE // EXPERTS, shared_expert_intermediate_size=0))],
    ids=["slice", "copy", "slice-no-shared"],
)
def test_round_trip_to_showo_is_exact(showo, upcycle, moe):
    config = target_config(upcycle, **moe)
    back = convert_unif2ace_to_showo(convert_showo_to_unif2ace(showo, config, upcycle=upcycle), config, upcycle=upcycle)
    assert back.keys() == showo.keys()
    for key in showo:
        assert torch.equal(back[key], showo[key]), key


def test_saved_showo_checkpoint_loads_into_phi(phi, showo, tmp_path):
    config = target_config()
    back = convert_unif2ace_to_showo(convert_showo_to_unif2ace(showo, config), config)
    folder = save_showo_checkpoint(back, config, tmp_path / "showo")
    showo_config = json.loads((folder / "config.json").read_text())
    assert (showo_config["vocab_size"], showo_config["llm_vocab_size"]) == (config.vocab_size, config.text_vocab_size)
    assert (showo_config["codebook_size"], showo_config["num_vq_tokens"]) == (16, 16)
    rebuilt = PhiForCausalLM(PhiConfig.from_pretrained(folder / "phi")).eval()
    weights = load_file(folder / "model.safetensors")
    rebuilt.load_state_dict({key.removeprefix("showo."): value for key, value in weights.items()}, strict=True)
    ids = text_batch(config)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, phi(ids).logits, rtol=0, atol=0)


def test_reverse_refuses_experts_that_are_not_an_upcycled_mlp(showo):
    config = target_config()
    converted = convert_showo_to_unif2ace(showo, config)
    diverged = dict(converted)
    diverged["model.layers.1.mlp.experts.up_proj"] = converted["model.layers.1.mlp.experts.up_proj"].clone()
    diverged["model.layers.1.mlp.experts.up_proj"][EXPERTS + 2] += 0.01  # a T2I expert trained apart
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\..*task groups"):
        convert_unif2ace_to_showo(diverged, config)
    biased = dict(converted)
    biased["model.layers.0.mlp.experts.down_proj_bias"] = converted["model.layers.0.mlp.experts.down_proj_bias"] + 0.1
    with pytest.raises(ValueError, match="non-zero fc2 biases"):
        convert_unif2ace_to_showo(biased, config)
    with pytest.raises(ValueError, match="identical copies"):  # sliced experts are not copies
        convert_unif2ace_to_showo(converted, target_config("copy", expert_intermediate_size=(DENSE - SHARED) // EXPERTS,
                                                           shared_expert_intermediate_size=SHARED), upcycle="copy")
    with pytest.raises(ValueError, match="parallel"):
        convert_unif2ace_to_showo(converted, UniF2aceConfig.tiny())


# --------------------------------------------------------------------------------------------------------------------
# Loading checkpoints
# --------------------------------------------------------------------------------------------------------------------
class NotATensor:
    pass


def test_pickle_needs_opt_in_and_is_read_weights_only(showo, tmp_path):
    torch.save(showo, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_showo_checkpoint(tmp_path)
    loaded = load_showo_checkpoint(tmp_path, allow_pickle=True)
    assert loaded.keys() == showo.keys() and all(torch.equal(loaded[k], showo[k]) for k in showo)
    torch.save({**showo, "showo.extra": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_showo_checkpoint(tmp_path / "evil.pt", allow_pickle=True)
    with pytest.raises(SystemExit, match="allow-pickle"):
        main(["convert", str(tmp_path), str(tmp_path / "out")])


def test_sharded_safetensors(showo, tmp_path):
    keys = sorted(showo)
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    shards = {first: keys[: len(keys) // 2], second: keys[len(keys) // 2:]}
    for name, names in shards.items():
        save_file({k: showo[k] for k in names}, tmp_path / name)
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_showo_checkpoint(tmp_path)
    assert loaded.keys() == showo.keys() and all(torch.equal(loaded[k], showo[k]) for k in showo)
    dropped = shards[second][0]
    save_file({k: showo[k] for k in shards[second][1:]}, tmp_path / second)
    with pytest.raises(ValueError, match=dropped.replace(".", r"\.")):
        load_showo_checkpoint(tmp_path)


def test_missing_and_unexpected_keys_are_named(showo, tmp_path):
    broken = dict(showo)
    del broken["showo.model.layers.1.mlp.fc2.bias"]
    broken["showo.model.layers.0.mlp.fc3.weight"] = torch.zeros(2)
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as error:
        load_showo_checkpoint(tmp_path)
    assert "showo.model.layers.1.mlp.fc2.bias" in str(error.value)
    assert "showo.model.layers.0.mlp.fc3.weight" in str(error.value)
    with pytest.raises(ValueError, match=r"showo\.model\.layers\.1\.mlp\.fc2\.bias"):
        convert_showo_to_unif2ace(broken, target_config())


def test_size_mismatches_are_named(showo):
    with pytest.raises(ValueError) as error:
        convert_showo_to_unif2ace(showo, UniF2aceConfig.tiny(
            text_vocab_size=999, text_config=dict(block_style="parallel", qk_layernorm=True),
            moe_config=dict(num_experts=EXPERTS, expert_intermediate_size=24, shared_expert_intermediate_size=SHARED)))
    assert "model.embed_tokens.weight: converted Show-o (1027, 64) vs model (1026, 64)" in str(error.value)
    assert "lm_head.bias" in str(error.value)
    with pytest.raises(ValueError, match=r"4 \* 16 \+ 32 = 96 != D = 128"):
        convert_showo_to_unif2ace(showo, target_config(expert_intermediate_size=16))
    with pytest.raises(ValueError, match="expert_intermediate_size == D"):
        convert_showo_to_unif2ace(showo, target_config(), upcycle="copy")
    with pytest.raises(ValueError, match="2 layers"):
        convert_showo_to_unif2ace(showo, UniF2aceConfig.tiny(text_config=dict(
            block_style="parallel", qk_layernorm=True, num_hidden_layers=3)))
    with pytest.raises(ValueError, match="upcycle must be one of"):
        convert_showo_to_unif2ace(showo, target_config(), upcycle="average")


def test_bare_phi_state_dict_and_derived_buffers(phi, showo):
    """A plain PhiForCausalLM state dict (no `showo.` prefix), with the rotary caches old checkpoints stored."""
    bare = {**phi.state_dict(), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    config = target_config()
    from_bare, from_showo = convert_showo_to_unif2ace(bare, config), convert_showo_to_unif2ace(showo, config)
    assert from_bare.keys() == from_showo.keys() and all(torch.equal(from_bare[k], from_showo[k]) for k in from_showo)


def test_magvit_and_projector_keys(showo):
    magvit = {"encoder.conv_in.weight": torch.zeros(1), "quantize.embedding": torch.zeros(1)}
    with pytest.raises(ValueError, match="MAGVIT-v2"):
        convert_showo_to_unif2ace(magvit, target_config())
    # Show-o's CLIP-ViT variant carries an MMU projector: dropped (no counterpart), the rest converts
    with_projector = {**showo, "mm_projector.0.weight": torch.zeros(64, 8), "mm_projector.0.bias": torch.zeros(64)}
    converted = convert_showo_to_unif2ace(with_projector, target_config())
    assert not any("mm_projector" in key for key in converted)


def test_block_style_must_be_parallel_unless_allowed(showo):
    config = UniF2aceConfig.tiny(text_config=dict(qk_layernorm=True), moe_config=dict(
        num_experts=EXPERTS, expert_intermediate_size=24, shared_expert_intermediate_size=SHARED))
    with pytest.raises(ValueError, match="parallel"):
        convert_showo_to_unif2ace(showo, config)
    converted = convert_showo_to_unif2ace(showo, config, allow_sequential=True)
    for kind in ("weight", "bias"):
        assert torch.equal(converted[f"model.layers.0.post_attention_layernorm.{kind}"],
                           showo[f"showo.model.layers.0.input_layernorm.{kind}"])


# --------------------------------------------------------------------------------------------------------------------
# New modules, the VQ, derived configs
# --------------------------------------------------------------------------------------------------------------------
def test_new_modules_come_from_the_seed(showo):
    config = target_config()
    rng = torch.get_rng_state()
    first, again = convert_showo_to_unif2ace(showo, config, seed=3), convert_showo_to_unif2ace(showo, config, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left as it was
    other = convert_showo_to_unif2ace(showo, config, seed=4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["model.layers.0.mlp.gate.weight"], other["model.layers.0.mlp.gate.weight"])
    router = "model.layers.0.sequence_moe.router.weight"
    assert not torch.equal(first[router], other[router])
    assert torch.equal(first["model.layers.0.mlp.experts.up_proj"], other["model.layers.0.mlp.experts.up_proj"])


def test_vq_weights_are_kept(showo):
    config = target_config()
    torch.manual_seed(7)
    vq = UniF2aceVQModel(config.vq_config).state_dict()
    converted = convert_showo_to_unif2ace(showo, config, vq_state_dict=vq)
    assert all(torch.equal(converted[f"model.vq.{key}"], value) for key, value in vq.items())
    wider = UniF2aceConfig.tiny(vq_config=dict(base_channels=16)).vq_config
    wrong = UniF2aceVQModel(wider).state_dict()
    with pytest.raises(ValueError, match=r"decoder\.conv_in\.weight: VQ \(32, 4, 3, 3\) vs model \(16, 4, 3, 3\)"):
        convert_showo_to_unif2ace(showo, config, vq_state_dict=wrong)


def test_config_derived_from_a_phi_15_sized_checkpoint():
    """Shapes only (meta tensors): Show-o's 24 x 2048 Phi-1.5 with the 58,498-token vocabulary."""
    hidden, dense, head = 2048, 8192, 64
    shapes = {"model.embed_tokens.weight": (58498, hidden), "model.final_layernorm.weight": (hidden,),
              "model.final_layernorm.bias": (hidden,), "lm_head.weight": (58498, hidden), "lm_head.bias": (58498,)}
    for i in range(24):
        for module, (out, inp) in {"input_layernorm": (hidden, None), "self_attn.q_proj": (hidden, hidden),
                                   "self_attn.k_proj": (hidden, hidden), "self_attn.v_proj": (hidden, hidden),
                                   "self_attn.dense": (hidden, hidden), "self_attn.q_layernorm": (head, None),
                                   "self_attn.k_layernorm": (head, None), "mlp.fc1": (dense, hidden),
                                   "mlp.fc2": (hidden, dense)}.items():
            shapes[f"model.layers.{i}.{module}.weight"] = (out,) if inp is None else (out, inp)
            shapes[f"model.layers.{i}.{module}.bias"] = (out,)
    state_dict = {f"showo.{k}": torch.empty(shape, device="meta") for k, shape in shapes.items()}
    config = unif2ace_config_from_showo(state_dict)
    text, moe = config.text_config, config.moe_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.head_dim) == (2048, 24, 32, 64)
    assert (text.block_style, text.qk_layernorm) == ("parallel", True)
    assert (config.text_vocab_size, config.codebook_size, config.vocab_size) == (50295, 8192, 58498)
    assert (config.num_image_tokens, config.vq_config.resolution) == (256, 256)
    assert moe.num_experts * moe.expert_intermediate_size + moe.shared_expert_intermediate_size == dense
    assert (moe.num_experts, moe.expert_intermediate_size, moe.shared_expert_intermediate_size) == (8, 896, 1024)
    copy = unif2ace_config_from_showo(state_dict, upcycle="copy").moe_config
    assert (copy.expert_intermediate_size, copy.shared_expert_intermediate_size, copy.norm_topk_prob) == (
        dense, dense, True)
    assert unif2ace_config_from_showo(state_dict, showo_config={"num_vq_tokens": 1024}).vq_config.resolution == 512
    with pytest.raises(ValueError, match="positive multiple of E"):
        unif2ace_config_from_showo(state_dict, moe_config=dict(num_experts=5))
    with pytest.raises(ValueError, match="power-of-two codebook"):
        unif2ace_config_from_showo(state_dict, showo_config={"llm_vocab_size": 50000})


def test_derived_tiny_config_converts(showo):
    tiny = UniF2aceConfig.tiny()
    config = unif2ace_config_from_showo(
        showo, showo_config={"llm_vocab_size": 1000, "num_vq_tokens": 16}, num_attention_heads=4,
        vq_config=tiny.vq_config, bos_token_id=0, eos_token_id=0, semantic_config=tiny.semantic_config,
        identity_config=tiny.identity_config, text_config=dict(max_position_embeddings=256),
        moe_config=dict(num_experts=EXPERTS, shared_expert_intermediate_size=SHARED, num_experts_per_tok=2,
                        resampler_depth=1, resampler_num_heads=2),
    )
    assert (config.moe_config.expert_intermediate_size, config.codebook_size) == ((DENSE - SHARED) // EXPERTS, 16)
    assert dense_equivalence_error(showo, convert_showo_to_unif2ace(showo, config), config) < 1e-12


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------
def test_cli_converts_a_folder_and_back(showo, tmp_path, capsys):
    source, config_dir = tmp_path / "showo", tmp_path / "config"
    source.mkdir()
    save_file(showo, source / "model.safetensors")
    config = target_config()
    config.save_pretrained(config_dir)
    assert main(["convert", str(source), str(tmp_path / "unif2ace"), "--config", str(config_dir), "--seed", "5"]) == 0
    assert "Dense-equivalence check" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "unif2ace")
    assert isinstance(model, UniF2aceForConditionalGeneration)
    expected = convert_showo_to_unif2ace(showo, config, seed=5)
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)

    assert main(["convert", str(tmp_path / "unif2ace"), str(tmp_path / "back"), "--reverse"]) == 0
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == showo.keys() and all(torch.equal(back[k], showo[k]) for k in showo)


class Intercepted(Exception):
    pass


def test_cli_derives_the_config_from_the_showo_folder(showo, tmp_path, monkeypatch):
    """Without --config the target config comes from the weights, Show-o's config.json, --num-attention-heads,
    --vq and --block-style. (Intercepted before the build: a derived config has paper-size CLIP / IResNet encoders.)"""
    from transformers_f2ace import conversion

    vocab = 50295 + 10 + 16 + 1  # Show-o's text vocabulary (Phi's <|endoftext|> = 50256 is a valid BOS) + 16 codes
    source, vq_dir = tmp_path / "showo", tmp_path / "vq"
    source.mkdir()
    generator = torch.Generator().manual_seed(0)
    weights = {**showo, "showo.model.embed_tokens.weight": torch.randn(vocab, 64, generator=generator),
               "showo.lm_head.weight": torch.randn(vocab, 64, generator=generator),
               "showo.lm_head.bias": torch.randn(vocab, generator=generator)}
    save_file(weights, source / "model.safetensors")
    (source / "config.json").write_text(json.dumps({"_class_name": "Showo", "codebook_size": 16, "num_vq_tokens": 16}))
    vq = UniF2aceVQModel(UniF2aceConfig.tiny().vq_config)
    vq.save_pretrained(vq_dir)
    seen = {}

    def intercept(state_dict, config, **kwargs):
        seen.update(config=config, **kwargs)
        raise Intercepted

    monkeypatch.setattr(conversion, "unif2ace_from_showo", intercept)
    arguments = ["convert", str(source), str(tmp_path / "out"), "--num-attention-heads", "4", "--vq", str(vq_dir),
                 "--block-style", "sequential", "--seed", "2"]
    with pytest.raises(SystemExit, match="cannot split the dense width 128 into 8 routed experts"):
        main(arguments)  # slice with the default E = 8, S = 1024 does not fit D = 128
    with pytest.raises(Intercepted):
        main([*arguments, "--upcycle", "copy"])
    config = seen["config"]
    assert (config.text_vocab_size, config.codebook_size, config.num_image_tokens) == (50295, 16, 16)
    assert (config.text_config.num_attention_heads, config.text_config.block_style) == (4, "sequential")
    moe = config.moe_config
    assert (moe.expert_intermediate_size, moe.shared_expert_intermediate_size) == (DENSE, DENSE) and moe.norm_topk_prob
    assert config.vq_config.base_channels == vq.config.base_channels
    assert seen["allow_sequential"] and seen["seed"] == 2
    assert all(torch.equal(seen["vq_state_dict"][k], v) for k, v in vq.state_dict().items())
