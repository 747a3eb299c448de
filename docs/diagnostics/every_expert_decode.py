"""Tried and not kept (README, "Token-level MoE"): decode through every expert of the group instead of the fused
dispatch's sort / gather / grouped GEMMs.

    PYTHONPATH=src python docs/diagnostics/every_expert_decode.py

The up projection is one dense GEMM over the fused (E·I, H) view of the visited experts, the routing weights scale
the (E, N, I) activations, the down projection is one `bmm` over the experts. Prints the largest output difference
to the current path and the ratios of both to the dense proxy of `benchmarks/bench_moe.py` (decode shapes, 1 thread,
medians of interleaved repeats).
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from transformers_f2ace.moe_dispatch import (
    FUSED_EXPERTS_IMPLEMENTATION,
    _hidden_activation,
    _projection,
    fused_experts_forward,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_moe import Case, Shape, medians  # noqa: E402

EVERY_EXPERT = "every_expert_decode"


def every_expert_forward(self, hidden_states, top_k_index, top_k_weights):
    """(N, H) -> (N, H) through every expert between the lowest and highest routed id (non-transposed layout)."""
    num_tokens, top_k = top_k_index.shape
    if torch.is_grad_enabled() or num_tokens > 16 or (top_k == 1 and bool((top_k_index == top_k_index[0, 0]).all())):
        return fused_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    first, last = int(top_k_index.min()), int(top_k_index.max())
    up_weight, up_bias = _projection(self, "up_proj")
    down_weight, down_bias = _projection(self, "down_proj")
    up_weight, down_weight = up_weight[first:last + 1], down_weight[first:last + 1]
    visited = last - first + 1
    up = F.linear(hidden_states.to(up_weight.dtype), up_weight.reshape(-1, up_weight.shape[-1]))
    up = up.view(num_tokens, visited, -1).transpose(0, 1) + up_bias[first:last + 1, None, :]
    weights = top_k_weights.new_zeros(num_tokens, visited).scatter(1, top_k_index - first, top_k_weights)
    hidden = _hidden_activation(self, up) * weights.t().unsqueeze(-1).to(up.dtype)  # (E, N, I)
    output = torch.bmm(hidden, down_weight.transpose(1, 2)).sum(0)
    return torch.addmm(output, weights.to(output.dtype), down_bias[first:last + 1]).to(hidden_states.dtype)


def main() -> None:
    ALL_EXPERTS_FUNCTIONS.register(EVERY_EXPERT, every_expert_forward)
    torch.set_num_threads(1)
    for dtype in (torch.bfloat16, torch.float32):
        for tokens, hidden in ((16, 512), (1, 512), (16, 1024), (1, 1024)):
            case = Case(Shape(tokens, hidden, hidden), dtype, task_ids=[0], layers=4)
            block = case.blocks[0]
            with torch.no_grad():
                outputs = []
                for implementation in (FUSED_EXPERTS_IMPLEMENTATION, EVERY_EXPERT):
                    block.experts.config._experts_implementation = implementation
                    outputs.append(block(case.inputs, case.task_ids).float())
            calls = {"proxy": lambda: case.run(None, False),
                     "ours": lambda: case.run(FUSED_EXPERTS_IMPLEMENTATION, False),
                     "every expert": lambda: case.run(EVERY_EXPERT, False)}
            times = medians(calls, 60, time.process_time)
            print(f"{tokens} token(s), H{hidden}, {str(dtype)[6:]}: max difference "
                  f"{(outputs[0] - outputs[1]).abs().max().item():.1e}; x proxy: ours {times['ours'] / times['proxy']:.2f}, "
                  f"every expert {times['every expert'] / times['proxy']:.2f}", flush=True)


if __name__ == "__main__":
    main()
