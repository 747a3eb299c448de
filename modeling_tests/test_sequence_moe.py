"""Grouped sequence-level MoE, the feature encoders (CLIP, IResNet), the Perceiver resampler and span placement."""

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError

from conftest import UNDERSTANDING_OPTIONS, mmu_ids
from transformers import AutoModelForImageTextToText
from transformers_f2ace import UniF2aceConfig, UniF2aceForConditionalGeneration
from transformers_f2ace.modeling_unif2ace_encoders import (
    IResNet,
    MlpProjector,
    PerceiverResampler,
    UniF2aceFeatureEncoders,
    UniF2aceSequenceMoeBlock,
    init_encoder_weights,
    place_on_image_span,
)


MMU, T2I = 0, 1
E = 4  # sequence experts per group in the tiny preset: MMU (copy, copy, clip, face), T2I (copy, copy, zero, noise)
H = 64  # tiny hidden size


def make_block(seed: int = 0, router_scale: float = 1.0, **moe) -> UniF2aceSequenceMoeBlock:
    torch.manual_seed(seed)
    block = UniF2aceSequenceMoeBlock(UniF2aceConfig.tiny(moe_config=moe)).eval()
    with torch.no_grad():
        block.router.weight.normal_(0.0, router_scale)  # spread the router so ties cannot occur
    return block


def naive_sequence_moe(block, hidden_states, task_ids, token_mask, features, mmu_route=None):
    """Independent reference: per sequence, route on the masked mean (or, for MMU, take the local experts
    `mmu_route` at equal weight), run *every* chosen expert densely."""
    outputs = []
    for b in range(hidden_states.shape[0]):
        x = hidden_states[b]
        group = int(task_ids[b])
        pooled = x[token_mask[b]].mean(dim=0)
        group_weight = block.router.weight[group * E : (group + 1) * E]
        probs = torch.softmax(group_weight @ pooled, dim=-1)
        weights, local = probs.topk(block.top_k)
        if group == MMU and mmu_route is not None:
            weights, local = torch.full((len(mmu_route),), 1 / len(mmu_route)), torch.tensor(mmu_route)
        y = torch.zeros_like(x)
        for g, e in zip(weights, local.tolist()):
            expert = group * E + e
            kind = block.expert_kinds[expert]
            if kind == "copy":
                y = y + g * x
            elif kind in ("clip", "face", "noise"):
                gate = block.feature_gates[str(expert)]
                w = torch.softmax(x @ gate.weight.T + (0 if gate.bias is None else gate.bias), dim=-1)[:, :1]
                f = features[kind][b] if kind in features else torch.zeros_like(x)
                y = y + g * (w * x + (1 - w) * f)
        outputs.append(y)
    return torch.stack(outputs)


# --------------------------------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------------------------------
def test_one_route_per_sequence_invariant_to_token_order():
    block = make_block()
    x = torch.randn(3, 10, H)
    task_ids = torch.tensor([MMU, T2I, MMU])
    _, logits, (weights, index) = block(x, task_ids)
    assert logits.shape == (3, 2 * E) and weights.shape == index.shape == (3, block.top_k)
    permuted = x[:, torch.randperm(10)]
    _, permuted_logits, (permuted_weights, permuted_index) = block(permuted, task_ids)
    assert torch.equal(index, permuted_index)
    torch.testing.assert_close(permuted_logits, logits)
    torch.testing.assert_close(permuted_weights, weights)


@pytest.mark.parametrize("seed", range(3))
def test_group_isolation_in_a_mixed_batch(seed):
    block = make_block(seed, router_scale=5.0)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, H, generator=generator)
    task_ids = torch.randint(0, 2, (16,), generator=generator)
    _, logits, (_, index) = block(x, task_ids)
    low, high = task_ids[:, None] * E, (task_ids[:, None] + 1) * E
    assert ((index >= low) & (index < high)).all()
    in_group = (torch.arange(2 * E)[None] // E) == task_ids[:, None]
    assert torch.isinf(logits[~in_group]).all() and torch.isfinite(logits[in_group]).all()


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_copy_only_routing_scales_the_input_by_the_gate_sum(norm_topk_prob):
    copies = ["copy"] * 4
    block = make_block(norm_topk_prob=norm_topk_prob, mmu_sequence_experts=copies, t2i_sequence_experts=copies)
    x = torch.randn(2, 5, H)
    output, _, _ = block(x, torch.tensor([MMU, T2I]))
    for b, group in enumerate((MMU, T2I)):
        probs = torch.softmax(block.router.weight[group * E : (group + 1) * E] @ x[b].mean(0), dim=-1)
        scale = 1.0 if norm_topk_prob else probs.sort(descending=True).values[:2].sum()
        torch.testing.assert_close(output[b], scale * x[b])


def test_zero_expert_contributes_nothing():
    block = make_block()
    x = torch.randn(1, 5, H)
    route = (torch.tensor([[0.7, 0.3]]), torch.tensor([[E + 2, E + 0]]))  # T2I zero expert, T2I copy expert
    output, logits, _ = block(x, torch.tensor([T2I]), route=route)
    assert logits is None
    torch.testing.assert_close(output, 0.3 * x)


def test_feature_expert_is_the_gated_mix_computed_by_hand():
    block = make_block()
    x, clip, face = torch.randn(3, 1, 6, H).unbind(0)
    route = (torch.tensor([[0.6, 0.4]]), torch.tensor([[2, 3]]))  # MMU clip and face experts
    output, _, _ = block(x, torch.tensor([MMU]), features={"clip": clip, "face": face}, route=route)
    expected = torch.zeros_like(x)
    for g, expert, f in ((0.6, 2, clip), (0.4, 3, face)):
        a, b = (x @ block.feature_gates[str(expert)].weight.T).unbind(-1)
        w = (a.exp() / (a.exp() + b.exp()))[..., None]
        expected += g * (w * x + (1 - w) * f)
    torch.testing.assert_close(output, expected)
    # a missing kind means f = 0: the face term reduces to its gated copy
    without_face, _, _ = block(x, torch.tensor([MMU]), features={"clip": clip}, route=route)
    a, b = (x @ block.feature_gates["3"].weight.T).unbind(-1)
    w_face = (a.exp() / (a.exp() + b.exp()))[..., None]
    torch.testing.assert_close(without_face, expected - 0.4 * (1 - w_face) * face)


def test_noise_expert_is_zero_at_eval_and_scaled_gaussian_in_training():
    block = make_block(noise_std=3.0)
    x = torch.randn(4, 32, H)
    route = (torch.ones(4, 2), torch.tensor([[E + 3, E + 2]] * 4))  # noise (weight 1) + zero
    w = torch.softmax(x @ block.feature_gates[str(E + 3)].weight.T, dim=-1)[..., :1]
    eval_output, _, _ = block(x, torch.full((4,), T2I), route=route)
    torch.testing.assert_close(eval_output, w * x)
    train_output, _, _ = block.train()(x, torch.full((4,), T2I), route=route)
    noise = (train_output - w * x) / (1 - w)
    assert abs(noise.mean().item()) < 0.15 and abs(noise.std().item() - 3.0) < 0.15  # 8192 samples
    block.noise_at_eval = True
    assert not torch.allclose(block.eval()(x, torch.full((4,), T2I), route=route)[0], w * x)


def test_padding_does_not_affect_the_route():
    block = make_block(router_scale=5.0)
    x = torch.randn(2, 8, H)
    token_mask = torch.ones(2, 8, dtype=torch.bool)
    token_mask[0, :3] = False  # left padding
    token_mask[1, 6:] = False  # right padding
    _, logits, route = block(x, torch.tensor([MMU, T2I]), token_mask)
    changed = torch.where(token_mask[..., None], x, 100 * torch.randn_like(x))
    _, changed_logits, changed_route = block(changed, torch.tensor([MMU, T2I]), token_mask)
    torch.testing.assert_close(changed_logits, logits)
    assert torch.equal(changed_route[1], route[1])
    # without the mask the same change does move the router
    assert not torch.allclose(block(changed, torch.tensor([MMU, T2I]))[1], logits)


def test_sparse_dispatch_matches_the_naive_reference_on_a_mixed_batch():
    block = make_block(router_scale=3.0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 7, H, generator=generator)
    task_ids = torch.tensor([MMU, T2I] * 4)
    token_mask = torch.rand(8, 7, generator=generator) > 0.3
    token_mask[:, 0] = True
    features = {"clip": torch.randn(8, 7, H, generator=generator), "face": torch.randn(8, 7, H, generator=generator)}
    output, _, _ = block(x, task_ids, token_mask, features)
    torch.testing.assert_close(output, naive_sequence_moe(block, x, task_ids, token_mask, features))


def test_fixed_mmu_route_replaces_the_router_for_understanding_only():
    fixed = make_block(router_scale=5.0, mmu_fixed_sequence_route=["clip", "copy"], feature_gate_bias=3.0)
    learned = make_block(router_scale=5.0, feature_gate_bias=3.0)  # same seed and layout: the same weights
    assert torch.equal(learned.router.weight, fixed.router.weight)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(8, 7, H, generator=generator)
    task_ids = torch.tensor([MMU, T2I] * 4)
    token_mask = torch.ones(8, 7, dtype=torch.bool)
    features = {"clip": torch.randn(8, 7, H, generator=generator), "face": torch.randn(8, 7, H, generator=generator)}
    output, logits, (weights, index) = fixed(x, task_ids, token_mask, features)
    _, learned_logits, (learned_weights, learned_index) = learned(x, task_ids, token_mask, features)
    mmu, t2i = task_ids == MMU, task_ids == T2I
    # MMU experts (copy, copy, clip, face): "clip" is local 2, the first "copy" local 0, each at weight 1/2
    assert {tuple(sorted(row)) for row in index[mmu].tolist()} == {(0, 2)}
    torch.testing.assert_close(weights[mmu], torch.full((4, 2), 0.5))
    expected_logits = torch.full((2 * E,), float("-inf"))
    expected_logits[[0, 2]] = torch.tensor(0.5).log()
    torch.testing.assert_close(logits[mmu], expected_logits.expand(4, -1))
    assert torch.equal(index[t2i], learned_index[t2i])  # generation keeps its learned route
    torch.testing.assert_close(weights[t2i], learned_weights[t2i])
    torch.testing.assert_close(logits[t2i], learned_logits[t2i])
    torch.testing.assert_close(output, naive_sequence_moe(fixed, x, task_ids, token_mask, features, mmu_route=[2, 0]))


@pytest.mark.parametrize(
    "route, indices", [(None, None), (["copy", "clip"], [0, 2]), (["copy", "copy"], [0, 1]), (["face", "clip"], [3, 2])]
)
def test_fixed_route_kinds_resolve_to_mmu_experts_in_order(route, indices):
    assert UniF2aceConfig.tiny(moe_config=dict(mmu_fixed_sequence_route=route)).moe_config.mmu_fixed_sequence_indices() \
        == indices


@pytest.mark.parametrize(
    "moe, message",
    [
        (dict(mmu_fixed_sequence_route=["clip", "clip"]), "takes 2 'clip'"),
        (dict(mmu_fixed_sequence_route=["zero", "copy"]), "takes 1 'zero'"),  # a T2I kind: not in the MMU group
        (dict(mmu_fixed_sequence_route=["copy"]), "num_sequence_experts_per_seq"),
        (dict(resampler_type="qformer"), "resampler_type"),
        (dict(feature_gate_bias=-1.0), "feature_gate_bias"),
    ],
)
def test_understanding_options_reject_impossible_values(moe, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        UniF2aceConfig.tiny(moe_config=moe)


@pytest.mark.parametrize("bias", [0.0, 3.0])
def test_feature_gate_bias_opens_the_clip_and_face_gates_at_init(bias):
    torch.manual_seed(0)
    model = UniF2aceForConditionalGeneration(UniF2aceConfig.tiny(moe_config=dict(feature_gate_bias=bias)))
    block = model.model.layers[0].sequence_moe
    x = torch.randn(4, 16, H)
    for key, gate in block.feature_gates.items():
        kind = block.expert_kinds[int(key)]
        if bias == 0 or kind == "noise":  # the paper's bias-free gate: no parameter, old checkpoints still load
            assert gate.bias is None
            continue
        torch.testing.assert_close(gate.bias, torch.tensor([-bias / 2, bias / 2]))
        w = torch.softmax(gate(x), dim=-1)[..., 0]  # share of the hidden state in the mix
        expected = torch.sigmoid(torch.tensor(-bias))  # the weights (std 0.02) move it only slightly
        assert abs(w.mean().item() - expected.item()) < 0.01, kind


# --------------------------------------------------------------------------------------------------------------------
# Decoding with a remembered route
# --------------------------------------------------------------------------------------------------------------------
def test_reusing_the_route_reproduces_the_output_also_for_new_tokens_only():
    block = make_block()
    x = torch.randn(2, 9, H)
    features = {"clip": torch.randn(2, 9, H)}
    task_ids = torch.tensor([MMU, T2I])
    output, _, route = block(x, task_ids, features=features)
    again, logits, again_route = block(x, task_ids, features=features, route=route)
    assert logits is None and again_route is route
    torch.testing.assert_close(again, output)
    # decoding feeds only the last tokens: the route must be the prompt's, so the outputs agree position-wise
    tail, _, _ = block(x[:, -2:], task_ids, features={"clip": features["clip"][:, -2:]}, route=route)
    torch.testing.assert_close(tail, output[:, -2:])


def test_router_and_gates_receive_gradients():
    block = make_block()
    x = torch.randn(2, 5, H, requires_grad=True)
    output, _, route = block(x, torch.tensor([MMU, MMU]), features={"clip": torch.randn(2, 5, H)})
    output.square().sum().backward()
    assert block.router.weight.grad.abs().sum() > 0
    chosen = {str(i) for i in route[1].flatten().tolist()}
    for name, gate in block.feature_gates.items():
        assert (gate.weight.grad is not None) == (name in chosen)  # unchosen experts are never evaluated


# --------------------------------------------------------------------------------------------------------------------
# Encoders and resampler
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoders() -> UniF2aceFeatureEncoders:
    torch.manual_seed(0)
    return UniF2aceFeatureEncoders(UniF2aceConfig.tiny()).eval()


def test_identity_embeds_bypass_the_iresnet_and_match_it(encoders):
    calls = []
    handle = encoders.identity_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        faces = torch.rand(2, 3, 32, 32) * 2 - 1
        from_pixels = encoders(identity_pixel_values=faces)
        assert len(calls) == 1 and set(from_pixels) == {"face"}
        embeds = encoders.identity_encoder(faces)
        calls.clear()
        from_embeds = encoders(identity_embeds=embeds)
        assert calls == []
    finally:
        handle.remove()
    assert from_embeds["face"].shape == (2, 16, H)  # M = num_image_tokens
    torch.testing.assert_close(from_embeds["face"], from_pixels["face"])
    # a sequence of identity embeddings (B, S, D) also works
    assert encoders(identity_embeds=torch.randn(2, 3, 32))["face"].shape == (2, 16, H)


@pytest.mark.parametrize("layer", [-1, -2])
def test_semantic_embeds_are_clip_patch_tokens_without_cls(layer):
    torch.manual_seed(0)
    encoders = UniF2aceFeatureEncoders(UniF2aceConfig.tiny(moe_config=dict(semantic_feature_layer=layer))).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden_states = encoders.semantic_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states
    tokens = hidden_states[layer]
    assert tokens.shape == (2, 1 + 16, 32)  # CLS + (32 / 8)² patches
    if layer == -1:  # the last hidden state is the tower's output before post_layernorm
        torch.testing.assert_close(tokens, encoders.semantic_encoder(pixel_values=pixels).last_hidden_state)
    from_pixels = encoders(semantic_pixel_values=pixels)["clip"]
    torch.testing.assert_close(encoders(semantic_embeds=tokens[:, 1:])["clip"], from_pixels)


def test_encoders_are_frozen_by_default_and_the_resamplers_train():
    torch.manual_seed(0)
    encoders = UniF2aceFeatureEncoders(UniF2aceConfig.tiny()).train()
    assert not encoders.identity_encoder.training and not encoders.semantic_encoder.training
    assert encoders.resamplers.training
    running_mean = encoders.identity_encoder.bn1.running_mean.clone()
    features = encoders(semantic_pixel_values=torch.randn(2, 3, 32, 32), identity_pixel_values=torch.rand(2, 3, 32, 32))
    sum(f.square().sum() for f in features.values()).backward()
    assert torch.equal(encoders.identity_encoder.bn1.running_mean, running_mean)  # BN statistics untouched
    for encoder in (encoders.semantic_encoder, encoders.identity_encoder):
        assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())
    for resampler in encoders.resamplers.values():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in resampler.parameters())


def test_unfrozen_encoders_get_gradients():
    torch.manual_seed(0)
    encoders = UniF2aceFeatureEncoders(UniF2aceConfig.tiny(freeze_encoders=False)).train()
    assert encoders.identity_encoder.training
    features = encoders(semantic_pixel_values=torch.randn(2, 3, 32, 32), identity_pixel_values=torch.rand(2, 3, 32, 32))
    sum(f.square().sum() for f in features.values()).backward()
    assert encoders.identity_encoder.conv1.weight.grad.abs().sum() > 0
    assert encoders.semantic_encoder.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_encoders_exist_only_for_used_kinds():
    config = UniF2aceConfig.tiny(moe_config=dict(mmu_sequence_experts=["copy", "copy", "zero", "face"]))
    encoders = UniF2aceFeatureEncoders(config)
    assert encoders.semantic_encoder is None and isinstance(encoders.identity_encoder, IResNet)
    assert set(encoders.resamplers) == {"face"}
    # a view for a kind no expert uses is skipped (processors always produce every view)
    assert set(encoders(semantic_embeds=torch.randn(1, 16, 32), identity_embeds=torch.randn(1, 32))) == {"face"}
    block = UniF2aceSequenceMoeBlock(config)
    assert set(block.feature_gates) == {"3", str(E + 3)}  # the face and noise experts


def _batch_norm(x, sd, prefix):
    return F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"],
                        sd[f"{prefix}.bias"], eps=1e-5)


def insightface_iresnet_reference(sd, x, layers):
    """insightface's iresnet.py forward written from its source, reading weights by insightface's key names."""
    x = F.prelu(_batch_norm(F.conv2d(x, sd["conv1.weight"], padding=1), sd, "bn1"), sd["prelu.weight"])
    for stage, num_blocks in enumerate(layers, start=1):
        for block in range(num_blocks):
            p = f"layer{stage}.{block}"
            stride = 2 if block == 0 else 1
            out = _batch_norm(x, sd, f"{p}.bn1")
            out = F.conv2d(out, sd[f"{p}.conv1.weight"], padding=1)
            out = F.prelu(_batch_norm(out, sd, f"{p}.bn2"), sd[f"{p}.prelu.weight"])
            out = _batch_norm(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1), sd, f"{p}.bn3")
            if f"{p}.downsample.0.weight" in sd:
                x = _batch_norm(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), sd, f"{p}.downsample.1")
            x = out + x
    x = torch.flatten(_batch_norm(x, sd, "bn2"), 1)
    return _batch_norm(F.linear(x, sd["fc.weight"], sd["fc.bias"]), sd, "features")


def test_iresnet_matches_the_insightface_layout():
    config = UniF2aceConfig.tiny(identity_config=dict(layers=[2, 1, 2, 1])).identity_config
    torch.manual_seed(0)
    model = IResNet(config).eval()
    with torch.no_grad():  # non-trivial BN statistics and PReLU slopes
        for name, tensor in model.state_dict().items():
            if name.endswith(("running_var", "prelu.weight")):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", "bn1.bias", "bn3.weight")):
                tensor.normal_(0, 0.1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert not model.features.weight.requires_grad  # insightface fixes the embedding BN scale
    torch.testing.assert_close(model(x), insightface_iresnet_reference(model.state_dict(), x, config.layers))
    assert model.fc.in_features == 8 * 8 * (32 // 16) ** 2  # width base·8 at S/16


def test_resampler_matches_a_naive_flamingo_reference():
    torch.manual_seed(0)
    resampler = PerceiverResampler(input_dim=12, hidden_size=16, num_queries=3, depth=2, num_heads=4).eval()
    resampler.apply(lambda module: init_encoder_weights(module, std=0.5))
    inputs = torch.randn(2, 5, 12)
    media = resampler.proj_in(inputs)
    latents = resampler.queries.expand(2, -1, -1)
    for layer in resampler.layers:
        a = layer.attn
        q_in = a.norm_queries(latents)
        context = torch.cat([a.norm_inputs(media), q_in], dim=1)
        q, k, v = (t.view(2, -1, 4, 4).transpose(1, 2) for t in (a.q_proj(q_in), a.k_proj(context), a.v_proj(context)))
        attention = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v  # head dim 4 -> scale 1/2
        latents = latents + a.o_proj(attention.transpose(1, 2).reshape(2, 3, 16))
        latents = latents + layer.fc2(F.gelu(layer.fc1(layer.mlp_norm(latents))))
    torch.testing.assert_close(resampler(inputs), resampler.norm_out(latents))
    assert resampler(torch.randn(2, 12)).shape == (2, 3, 16)  # one embedding = one input token


def test_mlp_projector_keeps_each_patch_on_the_image_tokens_it_covers():
    torch.manual_seed(0)
    projector = MlpProjector(input_dim=8, hidden_size=16, num_outputs=16).eval()  # 2x2 patches -> 4x4 tokens
    inputs = torch.randn(2, 4, 8)
    output = projector(inputs)
    by_hand = projector.norm(projector.fc2(F.gelu(projector.fc1(inputs))))  # (2, 4, 16) per patch
    grid = torch.arange(16).view(4, 4)
    patch_of_token = (grid // 4) // 2 * 2 + (grid % 4) // 2  # token (r, c) lies in patch (r // 2, c // 2)
    torch.testing.assert_close(output, by_hand[:, patch_of_token.flatten()])
    changed = inputs.clone()
    changed[:, 1] += 1.0  # patch (0, 1): the top-right quarter
    moved = (projector(changed) - output).abs().sum(dim=(0, 2)) > 0
    assert moved.nonzero().flatten().tolist() == [2, 3, 6, 7]
    torch.testing.assert_close(projector(inputs[:, 0]), by_hand[:, :1].expand(-1, 16, -1))  # one embedding: every token


@pytest.mark.parametrize(
    "build, inputs, message",
    [
        (lambda: MlpProjector(8, 16, 15), None, "num_outputs"),
        (lambda: MlpProjector(8, 16, 16), torch.randn(1, 3, 8), "square number"),
        (lambda: MlpProjector(8, 16, 16), torch.randn(1, 4, 7), r"\(B, S, 8\)"),
    ],
)
def test_mlp_projector_rejects_grids_it_cannot_map(build, inputs, message):
    with pytest.raises(ValueError, match=message):
        build()(inputs)


def test_resampler_type_selects_the_projector_for_both_feature_kinds():
    torch.manual_seed(0)
    config = UniF2aceConfig.tiny(moe_config=dict(resampler_type="mlp"))
    encoders = UniF2aceFeatureEncoders(config).eval()
    assert all(type(resampler) is MlpProjector for resampler in encoders.resamplers.values())
    features = encoders(semantic_pixel_values=torch.randn(2, 3, 32, 32), identity_embeds=torch.randn(2, 32))
    assert features["clip"].shape == features["face"].shape == (2, config.num_image_tokens, H)


def test_model_with_the_understanding_options_round_trips_and_trains(tmp_path):
    torch.manual_seed(0)
    config = UniF2aceConfig.tiny(moe_config=UNDERSTANDING_OPTIONS)
    model = UniF2aceForConditionalGeneration(config)
    ids = mmu_ids(config, [5, 6, 7])
    pixels = torch.randn(1, 3, 32, 32)
    loss = model(input_ids=ids, semantic_pixel_values=pixels, labels=ids).loss
    loss.backward()
    projector = model.model.feature_encoders.resamplers["clip"]
    assert projector.fc1.weight.grad.abs().sum() > 0  # the semantic features reach the understanding loss
    clip_gate = model.model.layers[0].sequence_moe.feature_gates["2"]
    assert clip_gate.bias.grad.abs().sum() > 0
    model.eval().save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert loaded.config.moe_config.mmu_fixed_sequence_route == ["copy", "clip"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, semantic_pixel_values=pixels).logits,
                                   model(input_ids=ids, semantic_pixel_values=pixels).logits)
        without_features = model(input_ids=ids).logits
    assert not torch.allclose(without_features, loaded(input_ids=ids, semantic_pixel_values=pixels).logits)


def test_init_encoder_weights_covers_queries_and_prelu():
    resampler = PerceiverResampler(8, 16, 100, 1, 2)
    init_encoder_weights(resampler, std=0.5)
    assert abs(resampler.queries.std().item() - 0.5) < 0.05
    prelu = torch.nn.PReLU(4)
    torch.nn.init.zeros_(prelu.weight)
    init_encoder_weights(prelu, std=0.5)
    assert torch.equal(prelu.weight, torch.full((4,), 0.25))


# --------------------------------------------------------------------------------------------------------------------
# Span placement
# --------------------------------------------------------------------------------------------------------------------
def test_place_on_image_span_puts_feature_m_at_the_mth_image_position():
    features = torch.arange(2 * 3 * 2, dtype=torch.float).view(2, 3, 2) + 1  # nonzero, distinct
    image_mask = torch.zeros(3, 7, dtype=torch.bool)
    image_mask[0, 1:4] = True
    image_mask[2, [2, 4, 6]] = True  # positions need not be contiguous
    placed = place_on_image_span(features, image_mask, batch_index=torch.tensor([2, 0]))
    expected = torch.zeros(3, 7, 2)
    expected[0, 1:4] = features[1]
    expected[2, [2, 4, 6]] = features[0]
    torch.testing.assert_close(placed, expected)
    # default batch_index: row b takes features[b]; a row without image positions stays zero
    image_mask[1] = False
    placed = place_on_image_span(torch.cat([features, features[:1]]), image_mask)
    assert torch.equal(placed[0, 1:4], features[0]) and torch.equal(placed[1], torch.zeros(7, 2))
    assert torch.equal(placed[2, [2, 4, 6]], features[0])


def test_place_on_image_span_passes_gradients_to_the_features():
    features = torch.randn(1, 2, 3, requires_grad=True)
    image_mask = torch.tensor([[False, True, True, False]])
    (place_on_image_span(features, image_mask) * torch.arange(4.0)[None, :, None]).sum().backward()
    torch.testing.assert_close(features.grad, torch.tensor([[[1.0] * 3, [2.0] * 3]]))


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------
def test_span_length_mismatch_names_resampler_num_queries():
    with pytest.raises(ValueError, match="resampler_num_queries"):
        place_on_image_span(torch.randn(1, 4, 2), torch.tensor([[True, True, True, False, False]]))
    with pytest.raises(ValueError, match="batch_index"):
        place_on_image_span(torch.randn(2, 1, 2), torch.ones(3, 1, dtype=torch.bool))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(identity_embeds=torch.randn(2, 31)), "identity_config.embedding_size"),
        (dict(identity_embeds=torch.randn(2, 1, 1, 32)), "identity_embeds"),
        (dict(semantic_embeds=torch.randn(2, 16, 64)), "semantic_config.hidden_size"),
        (dict(identity_pixel_values=torch.randn(2, 3, 64, 64)), r"\(B, 3, 32, 32\)"),
        (dict(semantic_pixel_values=torch.randn(2, 1, 32, 32)), "semantic_pixel_values"),
        (dict(identity_embeds=torch.randn(2, 32), identity_pixel_values=torch.randn(2, 3, 32, 32)), "not both"),
    ],
)
def test_encoder_input_validation(encoders, kwargs, message):
    with pytest.raises(ValueError, match=message):
        encoders(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(task_ids=torch.tensor([0, 2])), "task_ids"),
        (dict(task_ids=torch.tensor([0])), "task_ids"),
        (dict(token_mask=torch.ones(2, 4, dtype=torch.bool)), "token_mask"),
        (dict(features={"clip": torch.randn(2, 16, H)}), "place_on_image_span"),
        (dict(features={"depth": torch.randn(2, 5, H)}), "keys"),
        (dict(route=(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long))), "route"),
    ],
)
def test_sequence_moe_input_validation(kwargs, message):
    block = make_block()
    arguments = {"hidden_states": torch.randn(2, 5, H), "task_ids": torch.tensor([0, 1]), **kwargs}
    with pytest.raises(ValueError, match=message):
        block(**arguments)
