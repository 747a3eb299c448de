"""Grouped token-level MoE: every experts dispatch against the eager reference loop (outputs and gradients), edge
cases of routing, group isolation, the router and the load-balancing loss, and the expert-usage report."""

import pytest
import torch
import torch.nn.functional as F
from conftest import mmu_ids, t2i_ids
from PIL import Image
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.muse_spark.configuration_muse_spark import MuseSparkTextConfig
from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts

from transformers_f2ace import (
    UniF2aceConfig,
    UniF2aceForConditionalGeneration,
    moe_dispatch,
)
from transformers_f2ace import expert_usage as usage_module
from transformers_f2ace.expert_usage import expert_usage
from transformers_f2ace.modeling_unif2ace import (
    UniF2aceSparseMoeBlock,
    load_balancing_loss,
)
from transformers_f2ace.moe_dispatch import FUSED_EXPERTS_IMPLEMENTATION

MMU, T2I = 0, 1
E, K = 4, 2  # tiny preset: 4 routed experts per group, top-2
FAST_PATHS = ["batched_mm", "grouped_mm", FUSED_EXPERTS_IMPLEMENTATION]
SCENARIOS = {  # name: (task ids of the batch, tokens per sequence)
    "mixed": ([MMU, T2I, T2I, MMU], 5),
    "mmu only": ([MMU, MMU], 6),
    "t2i only": ([T2I, T2I, T2I], 3),
    "decode 1 token": ([MMU], 1),
    "decode 3 sequences x 1 token": ([T2I, MMU, T2I], 1),
    "decode 16 tokens": ([MMU], 16),
}


def make_block(seed: int = 0, dtype: torch.dtype = torch.float32, **moe) -> UniF2aceSparseMoeBlock:
    """Tiny block with weights large enough that every path does real work; the router is spread (std 1) so that
    no two experts tie."""
    torch.manual_seed(seed)
    block = UniF2aceSparseMoeBlock(UniF2aceConfig.tiny(moe_config=moe))
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            parameter.normal_(0.0, 1.0 if name == "gate.weight" else 0.1)
    return block.to(dtype)


def forward_backward(block, implementation: str, inputs: torch.Tensor, task_ids: torch.Tensor, seed: int = 1):
    """-> output (B, T, H) and the gradients of `(output * g).sum()` (g random) w.r.t. the input and every weight."""
    block.experts.config._experts_implementation = implementation  # one config: routed and shared experts alike
    inputs = inputs.detach().clone().requires_grad_(True)
    output = block(inputs, task_ids)
    loss_weight = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed)).to(output.dtype)
    (output * loss_weight).sum().backward()
    grads = {"input": inputs.grad, **{name: parameter.grad for name, parameter in block.named_parameters()}}
    block.zero_grad(set_to_none=True)
    return output.detach(), grads


def assert_close(actual, expected, atol: float, what: str) -> None:
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for name in expected:
            assert_close(actual[name], expected[name], atol, f"{what}: grad of {name}")
        return
    assert actual is not None and actual.shape == expected.shape, what
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= atol, f"{what}: max error {error:.2e} > {atol:.1e}"


def padded_batch(config, sequences: list[torch.Tensor]) -> dict:
    length = max(sequence.shape[1] for sequence in sequences)
    ids = torch.full((len(sequences), length), config.pad_token_id)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, length - sequence.shape[1]:], mask[row, length - sequence.shape[1]:] = sequence[0], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}  # labels: ignored by the report


# --------------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------------
def test_fused_path_is_registered_and_selectable_on_the_model():
    assert ALL_EXPERTS_FUNCTIONS[FUSED_EXPERTS_IMPLEMENTATION] is moe_dispatch.fused_experts_forward
    config = UniF2aceConfig.tiny(moe_config={"sequence_moe": False})
    torch.manual_seed(0)
    model = UniF2aceForConditionalGeneration(config).eval()
    batch = padded_batch(config, [mmu_ids(config, [5, 6, 7]), t2i_ids(config, [8, 9])])
    del batch["labels"]
    model.set_experts_implementation("eager")
    reference = model(**batch).logits
    model.set_experts_implementation(FUSED_EXPERTS_IMPLEMENTATION)
    assert model.model.layers[0].mlp.experts.config._experts_implementation == FUSED_EXPERTS_IMPLEMENTATION
    assert_close(model(**batch).logits, reference, 1e-5, "model logits")


def test_expert_parallel_is_refused_with_a_clear_error():
    block = make_block()
    block.experts._is_expert_parallel = True
    block.experts.config._experts_implementation = FUSED_EXPERTS_IMPLEMENTATION
    with pytest.raises(ValueError, match="expert parallelism"):
        block(torch.randn(1, 2, 64), torch.tensor([MMU]))


# --------------------------------------------------------------------------------------------------------------------
# Every path = the eager reference loop, outputs and gradients
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("implementation", FAST_PATHS)
def test_paths_match_the_eager_reference_fp32(implementation, scenario):
    task_ids, length = SCENARIOS[scenario]
    block = make_block()
    inputs = torch.randn(len(task_ids), length, 64, generator=torch.Generator().manual_seed(2))
    task_ids = torch.tensor(task_ids)
    expected_out, expected_grads = forward_backward(block, "eager", inputs, task_ids)
    out, grads = forward_backward(block, implementation, inputs, task_ids)
    assert_close(out, expected_out, 1e-5, f"{implementation} output")
    assert_close(grads, expected_grads, 1e-5, implementation)


@pytest.mark.parametrize("implementation", FAST_PATHS)
def test_paths_match_the_eager_reference_bf16(implementation):
    """Tolerance: bf16 keeps ~3 significant digits. Each path's error against the fp32 reference must stay within 2%
    of the largest reference value AND within twice the bf16 eager loop's own error (+ one bf16 step of the scale)."""
    task_ids = torch.tensor([MMU, T2I, MMU])
    inputs = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(3))
    reference_out, reference_grads = forward_backward(make_block(), "eager", inputs, task_ids)
    block = make_block(dtype=torch.bfloat16)
    eager_out, eager_grads = forward_backward(block, "eager", inputs.bfloat16(), task_ids)
    out, grads = forward_backward(block, implementation, inputs.bfloat16(), task_ids)

    def bound(reference: torch.Tensor, eager: torch.Tensor) -> float:
        scale = reference.abs().max().item()
        eager_error = (eager.float() - reference).abs().max().item()
        return min(0.02 * scale, 2 * eager_error + scale * 2**-8)

    assert_close(out, reference_out, bound(reference_out, eager_out), f"{implementation} bf16 output")
    for name, reference in reference_grads.items():
        assert_close(grads[name], reference, bound(reference, eager_grads[name]), f"{implementation} bf16 grad {name}")


def test_fused_fallback_without_grouped_gemm_matches_eager(monkeypatch):
    """Backends without a grouped GEMM run the per-slice fallback of `grouped_matmul`: same results."""
    monkeypatch.setattr(moe_dispatch, "can_use_grouped_mm", lambda inputs, weight: False)
    task_ids = torch.tensor([MMU, T2I, T2I])
    inputs = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(4))
    block = make_block()
    expected = forward_backward(block, "eager", inputs, task_ids)
    actual = forward_backward(block, FUSED_EXPERTS_IMPLEMENTATION, inputs, task_ids)
    assert_close(actual[0], expected[0], 1e-5, "fallback output")
    assert_close(actual[1], expected[1], 1e-5, "fallback")


def test_fused_inference_in_token_chunks_matches_eager(monkeypatch):
    """Without autograd the CPU path dispatches token chunks; shrink the chunk budget to 3 tokens (k = 2 slots of
    width 64 in fp32) so a 14-token mixed batch runs as 5 chunks, one of them partial."""
    monkeypatch.setattr(moe_dispatch, "_CPU_INFERENCE_CHUNK_BYTES", 3 * K * 64 * 4)
    calls = []
    original = moe_dispatch.sort_by_expert
    monkeypatch.setattr(moe_dispatch, "sort_by_expert", lambda index, experts: calls.append(len(index)) or original(index, experts))
    block = make_block()
    task_ids = torch.tensor([MMU, T2I])
    inputs = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        block.experts.config._experts_implementation = "eager"
        expected = block(inputs, task_ids)
        block.experts.config._experts_implementation = FUSED_EXPERTS_IMPLEMENTATION
        actual = block(inputs, task_ids)
    # routed (k = 2): chunks of 3 tokens; shared (k = 1): chunks of 6 tokens, of which only the one spanning both tasks
    # (tokens 6..11) is sorted, the single-task ones (0..5, 12..13) take the dense one-expert path
    assert calls == [3, 3, 3, 3, 2, 6]
    assert_close(actual, expected, 1e-5, "chunked inference")


def test_fused_path_is_deterministic_and_survives_a_plain_sum_loss():
    """Bitwise-equal repeats; `.sum().backward()` hands an expanded (zero-stride) gradient to the dispatch, which the
    raw grouped GEMM backward rejects: the fused path must still give the eager gradients."""
    block = make_block()
    task_ids = torch.tensor([MMU, T2I])
    inputs = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(5))
    first = forward_backward(block, FUSED_EXPERTS_IMPLEMENTATION, inputs, task_ids)
    second = forward_backward(block, FUSED_EXPERTS_IMPLEMENTATION, inputs, task_ids)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][name], second[1][name]) for name in first[1])

    grads = {}
    for implementation in ("eager", FUSED_EXPERTS_IMPLEMENTATION):
        block.experts.config._experts_implementation = implementation
        x = inputs.clone().requires_grad_(True)
        block(x, task_ids).sum().backward()
        grads[implementation] = (x.grad, block.experts.up_proj.grad.clone())
        block.zero_grad(set_to_none=True)
    assert_close(grads[FUSED_EXPERTS_IMPLEMENTATION][0], grads["eager"][0], 1e-5, "input grad, sum loss")
    assert_close(grads[FUSED_EXPERTS_IMPLEMENTATION][1], grads["eager"][1], 1e-5, "up_proj grad, sum loss")


# --------------------------------------------------------------------------------------------------------------------
# Routing edge cases, forced through the router weights
# --------------------------------------------------------------------------------------------------------------------
def forced_inputs(batch: int, length: int, seed: int = 6) -> torch.Tensor:
    """Inputs whose coordinate 0 is >= 5 for every token, so router column 0 dominates the logits."""
    inputs = torch.randn(batch, length, 64, generator=torch.Generator().manual_seed(seed))
    inputs[..., 0] = 5 + inputs[..., 0].abs()
    return inputs


def force_router(block, column0: list[float]) -> None:
    """Router logits = x_0 * column0[e] (+ small terms): a large column pins the ranking of the experts."""
    with torch.no_grad():
        block.gate.weight.mul_(0.01)
        block.gate.weight[:, 0] = torch.tensor(column0)


@pytest.mark.parametrize("implementation", FAST_PATHS)
def test_experts_without_tokens_get_zero_gradients(implementation):
    block = make_block()
    force_router(block, [-50.0, 0.0, 1.0, 2.0] * 2)  # expert 0 of each group is never in a top-2
    task_ids = torch.tensor([MMU, T2I])
    inputs = forced_inputs(2, 6)
    _, _, index = block.gate(inputs.reshape(-1, 64), task_ids.repeat_interleave(6))
    assert not torch.isin(index, torch.tensor([0, E])).any()
    expected_out, expected_grads = forward_backward(block, "eager", inputs, task_ids)
    out, grads = forward_backward(block, implementation, inputs, task_ids)
    assert_close(out, expected_out, 1e-5, "output")
    assert_close(grads, expected_grads, 1e-5, implementation)
    for name in ("up_proj", "up_proj_bias", "down_proj", "down_proj_bias"):
        assert grads[f"experts.{name}"][[0, E]].abs().max() == 0


@pytest.mark.parametrize("implementation", FAST_PATHS)
def test_every_token_on_one_expert(implementation):
    """Top-1 with one dominant expert: the whole batch is one expert's slice (the fused path's dense shortcut)."""
    block = make_block(num_experts_per_tok=1)
    force_router(block, [0.0, 3.0, 1.0, 2.0] * 2)
    task_ids = torch.tensor([MMU, MMU, MMU])
    inputs = forced_inputs(3, 4)
    _, weights, index = block.gate(inputs.reshape(-1, 64), task_ids.repeat_interleave(4))
    assert index.unique().tolist() == [1]
    assert (weights < 1).all()  # un-renormalised top-1 weight: a real scale, not a no-op
    expected_out, expected_grads = forward_backward(block, "eager", inputs, task_ids)
    out, grads = forward_backward(block, implementation, inputs, task_ids)
    assert_close(out, expected_out, 1e-5, "output")
    assert_close(grads, expected_grads, 1e-5, implementation)


def test_padding_positions_do_not_change_other_tokens_and_all_paths_agree_on_a_padded_model_batch():
    config = UniF2aceConfig.tiny(moe_config={"sequence_moe": False})
    torch.manual_seed(0)
    model = UniF2aceForConditionalGeneration(config).eval()
    mmu, t2i = mmu_ids(config, [5, 6, 7, 8]), t2i_ids(config, [9, 10])
    batch = padded_batch(config, [mmu, t2i])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()
    outputs = {}
    for implementation in ["eager", *FAST_PATHS]:
        model.set_experts_implementation(implementation)
        outputs[implementation] = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    valid = mask.bool()
    for implementation in FAST_PATHS:
        assert_close(outputs[implementation].logits[valid], outputs["eager"].logits[valid], 1e-5, implementation)
        assert_close(outputs[implementation].aux_loss, outputs["eager"].aux_loss, 1e-6, f"{implementation} aux")
    # the padded MMU row equals the MMU sequence run alone
    model.set_experts_implementation(FUSED_EXPERTS_IMPLEMENTATION)
    alone = model(input_ids=mmu).logits[0]
    assert_close(outputs[FUSED_EXPERTS_IMPLEMENTATION].logits[0, valid[0]], alone, 1e-4, "padded vs alone")


# --------------------------------------------------------------------------------------------------------------------
# Group isolation
# --------------------------------------------------------------------------------------------------------------------
def test_router_keeps_each_task_inside_its_group():
    block = make_block()
    for seed in range(5):
        inputs = torch.randn(40, 64, generator=torch.Generator().manual_seed(seed))
        groups = torch.randint(0, 2, (40,), generator=torch.Generator().manual_seed(seed + 100))
        logits, _, index = block.gate(inputs, groups)
        assert (index[groups == MMU] < E).all() and (index[groups == T2I] >= E).all()
        assert torch.isinf(logits[groups == MMU, E:]).all() and torch.isinf(logits[groups == T2I, :E]).all()


@pytest.mark.parametrize("implementation", ["eager", *FAST_PATHS])
def test_zeroing_the_t2i_experts_leaves_mmu_outputs_unchanged(implementation):
    block = make_block()
    block.experts.config._experts_implementation = implementation
    task_ids = torch.tensor([MMU, T2I, MMU])
    inputs = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = block(inputs, task_ids)
        for experts, rows in ((block.experts, slice(E, None)), (block.shared_experts, slice(T2I, T2I + 1))):
            for parameter in experts.parameters():
                parameter[rows] = 0
        after = block(inputs, task_ids)
    mmu = task_ids == MMU
    assert torch.equal(after[mmu], before[mmu])
    assert after[~mmu].abs().max() == 0 and before[~mmu].abs().max() > 0


# --------------------------------------------------------------------------------------------------------------------
# Router and load-balancing loss
# --------------------------------------------------------------------------------------------------------------------
def test_load_balancing_loss_matches_a_hand_computation():
    """2 experts per group, top-1, 4 tokens (2 MMU, 2 T2I), logits = log-probabilities so softmax gives them back.
    MMU: p = (0.8, 0.2) -> e0, p = (0.4, 0.6) -> e1: f = (1/2, 1/2), P = (0.6, 0.4): 2 * (0.30 + 0.20) = 1.0.
    T2I: p = (0.9, 0.1) -> e0, p = (0.7, 0.3) -> e0: f = (1, 0), P = (0.8, 0.2): 2 * 0.8 = 1.6.
    One layer: 2.6; two identical layers: 5.2. Masking out the last token: T2I f = (1, 0), P = (0.9, 0.1) -> 1.8,
    total 2.8 per layer. Top-2 (both experts always chosen, f = 1/2 each): 2 * 0.5 * (P0 + P1) = 1 per group -> 2."""
    inf = float("inf")
    probabilities = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.9, 0.1], [0.7, 0.3]])
    logits = torch.full((4, 4), -inf)
    logits[:2, :2] = probabilities[:2].log()
    logits[2:, 2:] = probabilities[2:].log()
    groups = torch.tensor([MMU, MMU, T2I, T2I])
    assert load_balancing_loss((logits,), groups, 2, 1).item() == pytest.approx(2.6, abs=1e-6)
    assert load_balancing_loss((logits, logits), groups, 2, 1).item() == pytest.approx(5.2, abs=1e-6)
    keep = torch.tensor([True, True, True, False])
    assert load_balancing_loss((logits,), groups, 2, 1, keep).item() == pytest.approx(2.8, abs=1e-6)
    assert load_balancing_loss((logits,), groups, 2, 2).item() == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("renormalise", [False, True])
def test_router_weights_renormalisation_flag(renormalise):
    block = make_block(norm_topk_prob=renormalise)
    with torch.no_grad():
        block.gate.weight.mul_(0.05)  # flat probabilities: the top-2 carry clearly less than 1
    inputs = torch.randn(12, 64, generator=torch.Generator().manual_seed(8))
    groups = torch.tensor([MMU] * 6 + [T2I] * 6)
    _, weights, index = block.gate(inputs, groups)
    # independent: softmax over the group's own E experts, top-k
    group_weight = torch.stack([block.gate.weight[g * E:(g + 1) * E] for g in groups.tolist()])  # (N, E, H)
    probabilities = torch.einsum("neh,nh->ne", group_weight, inputs).softmax(-1)
    top, local = probabilities.topk(K, dim=-1)
    assert torch.equal(index, local + groups[:, None] * E)
    expected = top / top.sum(-1, keepdim=True) if renormalise else top
    assert_close(weights, expected, 1e-6, "top-k weights")
    sums = weights.sum(-1)
    assert torch.allclose(sums, torch.ones(12)) if renormalise else (sums < 1 - 1e-3).all()


def test_router_softmax_runs_in_fp32_under_bf16():
    block = make_block(dtype=torch.bfloat16)
    inputs = torch.randn(10, 64, generator=torch.Generator().manual_seed(9)).bfloat16()
    groups = torch.tensor([MMU] * 5 + [T2I] * 5)
    logits, weights, _ = block.gate(inputs, groups)
    assert logits.dtype == torch.float32 and weights.dtype == torch.bfloat16
    fp32_top = F.linear(inputs, block.gate.weight).float().masked_fill(torch.isinf(logits), -float("inf"))
    fp32_top = fp32_top.softmax(-1).topk(K, dim=-1).values
    assert torch.equal(weights, fp32_top.bfloat16())  # fp32 softmax, rounded once at the end


# --------------------------------------------------------------------------------------------------------------------
# Other experts layouts through the registered function (gated, transposed, biased)
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "muse_spark"])
def test_fused_path_matches_eager_for_other_transformers_experts_layouts(family):
    if family == "mixtral":  # gated, (E, 2I, H), no bias
        config = MixtralConfig(hidden_size=32, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2)
        experts = MixtralExperts(config)
    elif family == "gpt_oss":  # gated with interleaved gate/up, transposed (E, H, 2I), biased
        config = GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2)
        experts = GptOssExperts(config)
    else:  # gated, with a norm after each expert (the routing weight applies after it)
        config = MuseSparkTextConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                                     moe_hidden_size=32, moe_intermediate_size=16, num_local_experts=6)
        experts = MuseSparkExperts(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.normal_(0.0, 0.2)
    inputs = torch.randn(10, 32)
    index = torch.stack([torch.randperm(6)[:2] for _ in range(10)])
    weights = torch.rand(10, 2)
    results = {}
    for implementation in ("eager", FUSED_EXPERTS_IMPLEMENTATION):
        config._experts_implementation = implementation
        x = inputs.clone().requires_grad_(True)
        output = experts(x, index, weights)
        (output * torch.linspace(-1, 1, 32)).sum().backward()
        results[implementation] = (output.detach(), x.grad, *[p.grad for p in experts.parameters()])
        experts.zero_grad(set_to_none=True)
    for actual, expected in zip(results[FUSED_EXPERTS_IMPLEMENTATION], results["eager"]):
        assert_close(actual, expected, 1e-5, family)


# --------------------------------------------------------------------------------------------------------------------
# Expert-usage report
# --------------------------------------------------------------------------------------------------------------------
def test_expert_usage_with_pinned_routers_counts_exactly():
    """Every norm before a router outputs the constant e_0 (weight 0, bias e_0), so each router's logits are its
    column 0: token level (3, 2, 1, 0 | 0, 1, 2, 3) -> MMU picks e0, e1 and T2I e3, e2 (half each); sequence level
    (0, 1, 2, 3 | 3, 2, 1, 0) -> MMU picks clip (s2) and face (s3), T2I the two copies (s0, s1)."""
    config = UniF2aceConfig.tiny()
    torch.manual_seed(0)
    model = UniF2aceForConditionalGeneration(config)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.post_attention_layernorm, layer.sequence_layernorm):
                norm.weight.zero_()
                norm.bias.zero_()
                norm.bias[0] = 1.0
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.weight[:, 0] = torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0])
            layer.sequence_moe.router.weight.zero_()
            layer.sequence_moe.router.weight[:, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0, 2.0, 1.0, 0.0])
    mmu, t2i = mmu_ids(config, [5, 6, 7]), t2i_ids(config, [8, 9, 10, 11])
    batches = [padded_batch(config, [mmu, t2i, mmu]), padded_batch(config, [t2i])]
    usage = expert_usage(model, batches)
    layers = config.text_config.num_hidden_layers
    assert usage.token_totals.tolist() == [2 * mmu.shape[1], 2 * t2i.shape[1]]  # padding not counted
    expected_tokens = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]).expand(layers, 2, 4)
    assert torch.equal(usage.token_fractions, expected_tokens)
    expected_sequences = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 0.0, 0.0]]).expand(layers, 2, 4)
    assert torch.equal(usage.sequence_fractions, expected_sequences)
    assert usage.sequence_groups.tolist() == [MMU, T2I, MMU, T2I]
    assert [sorted(row) for row in usage.sequence_choices[0].tolist()] == [[2, 3], [4, 5], [2, 3], [4, 5]]
    assert model.training  # restored after the eval-mode run

    first_only = expert_usage(model, batches, max_batches=1)
    assert first_only.token_totals.tolist() == [2 * mmu.shape[1], t2i.shape[1]]


def test_expert_usage_table_and_heatmap(tmp_path):
    config = UniF2aceConfig.tiny()
    torch.manual_seed(1)
    model = UniF2aceForConditionalGeneration(config).eval()
    with torch.no_grad():  # a spread router so the shares are uneven
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 1.0)
    batches = [padded_batch(config, [mmu_ids(config, [5, 6, 7], seed=s), t2i_ids(config, [8, 9])]) for s in range(2)]
    usage = expert_usage(model, batches)
    layers = config.text_config.num_hidden_layers
    token_sums, sequence_sums = usage.token_fractions.sum(-1), usage.sequence_fractions.sum(-1)
    assert torch.allclose(token_sums, torch.ones(layers, 2)) and torch.allclose(sequence_sums, torch.ones(layers, 2))
    assert usage.token_fractions.max() > 0.25  # not a uniform artefact

    table = usage.to_table().splitlines()
    assert len(table) == 2 + 2 * layers  # header, separator, one row per (layer, group)
    assert table[2].startswith("| 0 | MMU |") and table[3].startswith("| 0 | T2I |")
    assert all(line.count("|") == table[0].count("|") for line in table)

    path = tmp_path / "usage.png"
    cell = 32
    size = usage.save_heatmap(str(path), cell_size=cell)
    columns = E + 1 + 4  # token experts, a gap, sequence experts
    expected_size = (usage_module.LABEL_WIDTH + columns * cell, usage_module.HEADER_HEIGHT + 2 * layers * cell)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == expected_size == size
        share = usage.token_fractions[0, MMU, 0].item()
        shade = int(255 * (1 - share))
        pixel = image.convert("RGB").getpixel((usage_module.LABEL_WIDTH + 1, usage_module.HEADER_HEIGHT + 1))
        assert pixel == (shade, shade, 255)  # cell colour encodes the share of layer 0 / MMU / e0


def test_router_z_loss_is_added_and_equals_a_hand_computation():
    import math

    from transformers_f2ace.modeling_unif2ace import router_z_loss

    # two tokens, experts of the other group at -inf: logsumexp over the group's two logits
    logits = torch.tensor([[0.0, math.log(3.0), float("-inf"), float("-inf")],
                           [float("-inf"), float("-inf"), 1.0, 1.0]])
    expected = (math.log(4.0) ** 2 + (1.0 + math.log(2.0)) ** 2) / 2
    assert abs(router_z_loss((logits,)).item() - expected) < 1e-6
    assert abs(router_z_loss((logits, logits)).item() - 2 * expected) < 1e-6
    assert abs(router_z_loss((logits,), torch.tensor([True, False])).item() - math.log(4.0) ** 2) < 1e-6

    config = UniF2aceConfig.tiny(moe_config=dict(router_z_loss_coef=0.001))
    model = UniF2aceForConditionalGeneration(config).eval()
    ids = torch.tensor([[config.mmu_token_id, config.bos_token_id, 5, 6, 7]])
    out = model(ids, labels=ids, output_router_logits=True)
    assert out.z_loss is not None and out.z_loss > 0
    torch.testing.assert_close(
        out.loss, out.text_loss + config.router_aux_loss_coef * out.aux_loss + 0.001 * out.z_loss
    )
