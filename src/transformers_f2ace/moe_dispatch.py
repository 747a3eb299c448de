"""Fused routing for fused-parameter MoE experts: `experts_implementation="unif2ace_fused"`.

Importing this module registers `fused_experts_forward` in transformers' `ALL_EXPERTS_FUNCTIONS`, so any experts class
decorated with `@use_experts_implementation` (UniF²ace's `UniF2aceExperts` among them) can select it through
`config._experts_implementation` / `model.set_experts_implementation("unif2ace_fused")`.

One dispatch = sort the N·k (token, slot) assignments by expert ONCE, gather the tokens into that order, run every
expert's matmul on its contiguous slice with one grouped GEMM per projection (`torch.nn.functional.grouped_mm`; a loop
over the slices where the backend has none), and put the rows back ONCE: a permutation (each row written exactly once)
followed by a weighted sum over the k slots, so the result is deterministic. Where it differs from
transformers' `grouped_mm` path, measured on CPU (benchmarks/bench_moe.py):

- the backward writes each weight gradient directly in the parameter's layout (no transposed gradient that
  `AccumulateGrad` would copy) and accepts any incoming gradient layout (a plain `.sum()` loss included);
- the down projection is linear, so the routing weights scale its (narrower) input rows and its bias is added after the
  combine as Σ_k w_k b_{i_k}, one small (N, E) x (E, H) GEMM, instead of a gathered (N·k, H) bias;
- on the CPU the GEMMs visit only the experts between the lowest and highest id used (a single-task batch skips the
  other task group's experts);
- when all assignments go to one expert (the shared expert of a single-task batch) it runs as a plain dense MLP.

Shapes: N tokens, H hidden size, k assignments per token, E experts, A = N·k assignments.
"""

import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.utils import is_torchdynamo_compiling
from transformers.utils.import_utils import is_torch_greater_or_equal

FUSED_EXPERTS_IMPLEMENTATION = "unif2ace_fused"
# The CPU grouped GEMM exists from torch 2.9 and needs 16-byte aligned data pointers up to 2.10.
_CPU_GROUPED_MM = hasattr(F, "grouped_mm") and is_torch_greater_or_equal("2.11", accept_dev=True)
_GROUPED_MM_STRIDE_BYTES = 16  # grouped_mm needs every row stride (feature size) to be a multiple of 16 bytes
# Inference on the CPU dispatches the tokens in chunks whose (assignment rows x width) buffers stay under this size:
# glibc hands blocks of 32 MB and more back to the OS on free (every reuse then page-faults them in again), and small
# chunks stay in cache. Measured at 2048 tokens, hidden 1024, fp32: forward 1.23x -> 1.09x of the dense proxy. Not
# under autograd, where every chunk's buffers would be kept for the backward anyway.
_CPU_INFERENCE_CHUNK_BYTES = 4 * 2**20


class ExpertRouting(NamedTuple):
    """The assignments of one dispatch, sorted by expert (stable: ties keep token order).

    expert_ids (A,): expert of each sorted row, non-decreasing.
    order (A,): flat assignment index `token * k + slot` of each sorted row (a permutation of 0..A-1).
    tokens (A,): token of each sorted row (`order // k`).
    first_expert: the GEMMs visit experts `first_expert + arange(len(offsets))`.
    offsets (R,) int32: end row of each visited expert's slice (cumulative counts), as `grouped_mm` expects.
    """

    expert_ids: torch.Tensor
    order: torch.Tensor
    tokens: torch.Tensor
    first_expert: int
    offsets: torch.Tensor


def sort_by_expert(top_k_index: torch.Tensor, num_experts: int) -> ExpertRouting:
    """top_k_index (N, k) expert ids in [0, num_experts) -> the assignments sorted by expert. On the CPU, where
    reading a value costs no device sync, the GEMMs visit only the experts from the lowest to the highest id used;
    elsewhere all experts."""
    expert_ids, order = top_k_index.reshape(-1).sort(stable=True)
    first, last = (int(expert_ids[0]), int(expert_ids[-1])) if expert_ids.is_cpu else (0, num_experts - 1)
    boundaries = torch.arange(first, last + 1, device=expert_ids.device, dtype=expert_ids.dtype)
    offsets = torch.searchsorted(expert_ids, boundaries, right=True, out_int32=True)
    tokens = order.div(top_k_index.shape[-1], rounding_mode="floor")
    return ExpertRouting(expert_ids, order, tokens, first, offsets)


def can_use_grouped_mm(inputs: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `torch.nn.functional.grouped_mm` runs for these operands here (device, dtype, row alignment); else the
    per-slice fallback is used."""
    if not hasattr(F, "grouped_mm") or (is_torchdynamo_compiling() and weight.dtype != torch.bfloat16):
        return False
    if any(size * weight.element_size() % _GROUPED_MM_STRIDE_BYTES for size in weight.shape[1:]):
        return False
    if weight.device.type == "cuda":
        return torch.cuda.get_device_capability(weight.device) >= (8, 0)
    return weight.device.type == "cpu" and _CPU_GROUPED_MM


def _grouped_product(inputs, weight, bias, expert_ids, offsets, first_expert: int, transposed: bool) -> torch.Tensor:
    """The forward of [`_GroupedLinear`]: one `grouped_mm` over the visited experts' slice, then the row biases."""
    visited = weight[first_expert : first_expert + offsets.numel()]
    output = F.grouped_mm(inputs, visited if transposed else visited.transpose(1, 2), offs=offsets)
    if bias is not None:
        output.add_(bias.index_select(0, expert_ids))
    return output


class _GroupedLinear(torch.autograd.Function):
    """Per sorted row r of expert e: inputs[r] @ W_e^T (+ b_e), W stored (E, out, in) or, `transposed`, (E, in, out).
    The backward computes the weight gradient for all E experts (zeros for unvisited ones) in the parameter's own
    layout, and the bias gradient as a per-expert row sum."""

    @staticmethod
    def forward(ctx, inputs, weight, bias, expert_ids, offsets, first_expert: int, transposed: bool):
        output = _grouped_product(inputs, weight, bias, expert_ids, offsets, first_expert, transposed)
        ctx.save_for_backward(inputs, weight, expert_ids, offsets)
        ctx.first_expert, ctx.transposed = first_expert, transposed
        return output

    @staticmethod
    def backward(ctx, grad_output):
        inputs, weight, expert_ids, offsets = ctx.saved_tensors
        grad_output = grad_output.contiguous()  # e.g. the expanded gradient of a plain `.sum()`
        grad_inputs = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            visited = weight[ctx.first_expert : ctx.first_expert + offsets.numel()]
            grad_inputs = F.grouped_mm(grad_output, visited.transpose(1, 2) if ctx.transposed else visited, offs=offsets)
        if ctx.needs_input_grad[1]:
            before = offsets.new_zeros(ctx.first_expert)
            after = offsets.new_full((weight.shape[0] - ctx.first_expert - offsets.numel(),), inputs.shape[0])
            all_offsets = torch.cat([before, offsets, after])
            if ctx.transposed:
                grad_weight = F.grouped_mm(inputs.t(), grad_output, offs=all_offsets)
            else:
                grad_weight = F.grouped_mm(grad_output.t(), inputs, offs=all_offsets)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.new_zeros(weight.shape[0], grad_output.shape[1]).index_add_(0, expert_ids, grad_output)
        return grad_inputs, grad_weight, grad_bias, None, None, None, None


def grouped_linear(
    inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing: ExpertRouting, transposed: bool
) -> torch.Tensor:
    """inputs (A, in) sorted by expert -> (A, out): each row through its expert's linear layer. weight (E, out, in),
    or (E, in, out) when `transposed`; bias (E, out) or None."""
    inputs = inputs.to(weight.dtype)  # under autocast the input may be fp32 while the weights are bf16
    if can_use_grouped_mm(inputs, weight):
        operands = (inputs, weight, bias, routing.expert_ids, routing.offsets, routing.first_expert, transposed)
        needs_grad = torch.is_grad_enabled() and any(
            tensor is not None and tensor.requires_grad for tensor in (inputs, weight, bias)
        )
        # without autograd, skip the Function's bookkeeping (~25 us a call: a visible share of a decode step)
        return _GroupedLinear.apply(*operands) if needs_grad else _grouped_product(*operands)
    starts = [0, *routing.offsets.tolist()]  # one host sync, then one product per visited expert's slice
    outputs = []
    for expert, (start, end) in enumerate(itertools.pairwise(starts), start=routing.first_expert):
        expert_bias = bias[expert] if bias is not None else None
        if transposed:
            product = inputs[start:end] @ weight[expert]
            outputs.append(product + expert_bias if expert_bias is not None else product)
        else:
            outputs.append(F.linear(inputs[start:end], weight[expert], expert_bias))
    return torch.cat(outputs)


def _projection(experts: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    return getattr(experts, name), (getattr(experts, f"{name}_bias") if experts.has_bias else None)


def _hidden_activation(experts: nn.Module, projected: torch.Tensor) -> torch.Tensor:
    return experts._apply_gate(projected) if experts.has_gate else experts.act_fn(projected)


def _dense_linear(experts: nn.Module, name: str, inputs: torch.Tensor, expert: int) -> torch.Tensor:
    weight, bias = _projection(experts, name)
    bias = bias[expert] if bias is not None else None
    if not experts.is_transposed:
        return F.linear(inputs, weight[expert], bias)
    return torch.addmm(bias, inputs, weight[expert]) if bias is not None else inputs @ weight[expert]


def _dense_expert(experts: nn.Module, hidden_states: torch.Tensor, expert: int) -> torch.Tensor:
    """(N, H) through one expert as a plain MLP (biases fused into the GEMMs)."""
    up = _dense_linear(experts, "gate_up_proj" if experts.has_gate else "up_proj", hidden_states, expert)
    output = _dense_linear(experts, "down_proj", _hidden_activation(experts, up), expert)
    return experts.post_expert_norm(output) if experts.has_post_expert_norm else output


def fused_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """hidden_states (N, H), top_k_index (N, k) expert ids, top_k_weights (N, k) -> (N, H) = Σ_k w_k · expert_{i_k}(x).

    `self` is a `@use_experts_implementation` experts module (fused `up_proj`/`gate_up_proj` and `down_proj`, optional
    biases, transposed or not). Expert parallelism (sentinel expert ids) is not supported.
    """
    if self._is_expert_parallel:
        raise ValueError(
            f"experts_implementation={FUSED_EXPERTS_IMPLEMENTATION!r} does not support expert parallelism; use "
            "'grouped_mm' for expert-parallel models"
        )
    num_tokens, top_k = top_k_index.shape
    if num_tokens == 0:
        return torch.zeros_like(hidden_states)
    if top_k == 1 and bool((top_k_index == top_k_index[0, 0]).all()):
        output = _dense_expert(self, hidden_states, int(top_k_index[0, 0]))
        return (output * top_k_weights.to(output.dtype)).to(hidden_states.dtype)
    up_weight, up_bias = _projection(self, "gate_up_proj" if self.has_gate else "up_proj")
    if hidden_states.is_cpu and not torch.is_grad_enabled():
        width = max(hidden_states.shape[-1], up_weight.shape[2 if self.is_transposed else 1])
        chunk = max(1, _CPU_INFERENCE_CHUNK_BYTES // (top_k * width * hidden_states.element_size()))
        if num_tokens > chunk:
            return torch.cat([
                fused_experts_forward(self, hidden_states[start : start + chunk], top_k_index[start : start + chunk],
                                      top_k_weights[start : start + chunk])
                for start in range(0, num_tokens, chunk)
            ])

    routing = sort_by_expert(top_k_index, self.num_experts)
    sorted_states = hidden_states.index_select(0, routing.tokens)
    sorted_weights = top_k_weights.reshape(-1, 1).index_select(0, routing.order)
    hidden = _hidden_activation(self, grouped_linear(sorted_states, up_weight, up_bias, routing, self.is_transposed))
    down_weight, down_bias = _projection(self, "down_proj")
    if self.has_post_expert_norm:  # the bias sits before the norm, the routing weight after it
        output = grouped_linear(hidden, down_weight, down_bias, routing, self.is_transposed)
        output = self.post_expert_norm(output) * sorted_weights.to(output.dtype)
        down_bias = None  # already in
    else:  # linear down projection: weight its (narrower) input; the bias follows the combine as Σ_k w_k b_{i_k}
        output = grouped_linear(hidden * sorted_weights.to(hidden.dtype), down_weight, None, routing, self.is_transposed)
    # back to (token, slot) order: each row is written once (a permutation), then the k slots are summed
    unsorted = output.new_empty(output.shape).index_copy_(0, routing.order, output)
    output = unsorted.view(num_tokens, top_k, -1).sum(1)
    if down_bias is not None:
        dense_weights = top_k_weights.new_zeros(num_tokens, self.num_experts).scatter(1, top_k_index, top_k_weights)
        output = torch.addmm(output, dense_weights.to(output.dtype), down_bias)
    return output.to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(FUSED_EXPERTS_IMPLEMENTATION, fused_experts_forward)


__all__ = [
    "FUSED_EXPERTS_IMPLEMENTATION",
    "ExpertRouting",
    "can_use_grouped_mm",
    "fused_experts_forward",
    "grouped_linear",
    "sort_by_expert",
]
