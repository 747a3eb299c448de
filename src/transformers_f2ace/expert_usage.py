"""Which experts a UniF²ace model uses: per layer and task group, the share of tokens routed to each token-level
expert and the per-sequence choices of the sequence-level experts, as a markdown table or a PNG heatmap.

    usage = expert_usage(model, dataloader, max_batches=20)
    print(usage.to_table())
    usage.save_heatmap("expert_usage.png")
"""

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import PreTrainedModel

GROUP_NAMES = ("MMU", "T2I")  # task group g = task id (0: understanding, 1: generation)
# heatmap layout in pixels: row labels on the left, column labels on top, one gap column between the two MoE levels
LABEL_WIDTH, HEADER_HEIGHT = 72, 28


@dataclass
class ExpertUsage:
    """Routing statistics over a set of batches (L layers, G = 2 task groups).

    token_counts (L, G, E): top-k assignments of the group's non-pad tokens to its routed expert e (local id).
    token_totals (G,): non-pad tokens per group; each token makes `token_top_k` assignments per layer.
    sequence_choices: per layer (S, k_seq) global sequence-expert ids chosen by each of the S sequences (in order).
    sequence_groups (S,): task group of each sequence.
    sequence_expert_names: per group, the kinds of its E_seq sequence experts (e.g. copy, copy, clip, face).
    """

    token_counts: torch.Tensor
    token_totals: torch.Tensor
    token_top_k: int
    sequence_choices: tuple[torch.Tensor, ...]
    sequence_groups: torch.Tensor
    sequence_expert_names: tuple[tuple[str, ...], ...]

    @property
    def num_layers(self) -> int:
        return max(self.token_counts.shape[0], len(self.sequence_choices))

    @property
    def token_fractions(self) -> torch.Tensor:
        """(L, G, E): share of the group's assignments that went to each routed expert (each row sums to 1; a group
        without tokens is all zeros)."""
        totals = (self.token_totals * self.token_top_k).clamp(min=1)
        return self.token_counts / totals[None, :, None]

    @property
    def sequence_fractions(self) -> torch.Tensor:
        """(L, G, E_seq): share of the group's per-sequence choices that went to each sequence expert."""
        experts = len(self.sequence_expert_names[0]) if self.sequence_expert_names else 0
        counts = torch.zeros(len(self.sequence_choices), len(GROUP_NAMES), experts)
        for layer, choices in enumerate(self.sequence_choices):
            local = choices % experts
            for group in range(len(GROUP_NAMES)):
                chosen = local[self.sequence_groups == group].reshape(-1)
                counts[layer, group] = torch.bincount(chosen, minlength=experts).float() / max(chosen.numel(), 1)
        return counts

    def _rows(self) -> list[tuple[int, int]]:
        return [(layer, group) for layer in range(self.num_layers) for group in range(len(GROUP_NAMES))]

    def _columns(self) -> tuple[list[str], list[str]]:
        """Names of the token-expert and sequence-expert columns (empty for a level the model does not have)."""
        token = [f"e{e}" for e in range(self.token_counts.shape[-1])] if self.token_counts.shape[0] else []
        experts = len(self.sequence_expert_names[0]) if self.sequence_choices else 0
        return token, [f"s{e}" for e in range(experts)]

    def to_table(self) -> str:
        """Markdown: one row per (layer, group); token-expert shares, then sequence-expert shares (percent)."""
        token, sequence = self.token_fractions, self.sequence_fractions
        token_columns, sequence_columns = self._columns()
        header = ["layer", "group"] + (["tokens", *token_columns] if token_columns else [])
        header += ["sequences", *sequence_columns] if sequence_columns else []
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        sequences_per_group = torch.bincount(self.sequence_groups, minlength=len(GROUP_NAMES))
        for layer, group in self._rows():
            cells = [str(layer), GROUP_NAMES[group]]
            if token_columns:
                cells += [str(int(self.token_totals[group]))] + [f"{100 * v:.1f}" for v in token[layer, group].tolist()]
            if sequence_columns:
                names = self.sequence_expert_names[group]
                cells.append(str(int(sequences_per_group[group])))
                cells += [f"{names[e]} {100 * value:.1f}" for e, value in enumerate(sequence[layer, group].tolist())]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def save_heatmap(self, path: str, cell_size: int = 32) -> tuple[int, int]:
        """Draw the shares as a heatmap PNG (rows: layer x group; columns: token experts, a gap, sequence experts;
        darker = larger share, the percentage printed in each cell). Returns the image size (width, height) =
        (LABEL_WIDTH + columns * cell_size, HEADER_HEIGHT + rows * cell_size)."""
        token, sequence = self.token_fractions, self.sequence_fractions
        token_columns, sequence_columns = self._columns()
        columns = token_columns + ([""] if token_columns and sequence_columns else []) + sequence_columns
        rows = self._rows()
        size = (LABEL_WIDTH + len(columns) * cell_size, HEADER_HEIGHT + len(rows) * cell_size)
        image = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default()
        for c, name in enumerate(columns):
            draw.text((LABEL_WIDTH + c * cell_size + 4, 8), name, fill="black", font=font)
        for r, (layer, group) in enumerate(rows):
            top = HEADER_HEIGHT + r * cell_size
            draw.text((4, top + cell_size // 3), f"L{layer} {GROUP_NAMES[group]}", fill="black", font=font)
            values = token[layer, group].tolist() if token_columns else []
            if sequence_columns:
                values += ([None] if token_columns else []) + sequence[layer, group].tolist()
            for c, value in enumerate(values):
                if value is None:
                    continue
                left = LABEL_WIDTH + c * cell_size
                shade = int(255 * (1 - value))
                draw.rectangle((left, top, left + cell_size - 1, top + cell_size - 1), fill=(shade, shade, 255),
                               outline="gray")
                draw.text((left + 3, top + cell_size // 3), f"{100 * value:.0f}",
                          fill="white" if value > 0.5 else "black", font=font)
        image.save(path)
        return size


def _model_inputs(batch: Mapping, accepted: set[str], device: torch.device) -> dict:
    return {
        name: value.to(device) if isinstance(value, torch.Tensor) else value
        for name, value in batch.items()
        if name in accepted
    }


@torch.no_grad()
def expert_usage(model: PreTrainedModel, batches: Iterable[Mapping], max_batches: int | None = None) -> ExpertUsage:
    """Run `model` (a `UniF2aceModel` or `UniF2aceForConditionalGeneration`, put in eval mode for the run) over
    `batches` (dicts of model inputs, e.g. a DataLoader of processor outputs; keys the model does not take, such as
    `labels`, are ignored) and collect its routing. Padding (attention_mask == 0) is not counted."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be None or >= 1, got {max_batches}")
    base = model.base_model
    moe = base.config.moe_config
    accepted = set(inspect.signature(base.forward).parameters) - {"kwargs"}
    groups = len(GROUP_NAMES)
    token_counts = torch.zeros(base.config.text_config.num_hidden_layers if moe.token_moe else 0, groups,
                               moe.num_experts)
    token_totals = torch.zeros(groups, dtype=torch.long)
    sequence_choices, sequence_groups = [], []
    was_training = base.training
    base.eval()
    try:
        for step, batch in enumerate(batches):
            if max_batches is not None and step >= max_batches:
                break
            inputs = _model_inputs(batch, accepted, base.device)
            outputs = base(**inputs, output_router_logits=moe.token_moe, output_sequence_router_logits=moe.sequence_moe)
            task_ids = outputs.task_ids.cpu()
            length = outputs.last_hidden_state.shape[1]
            mask = inputs.get("attention_mask")
            keep = (mask[:, -length:].bool() if mask is not None else torch.ones(len(task_ids), length, dtype=torch.bool)).cpu()
            token_groups = task_ids[:, None].expand(-1, length)[keep]
            token_totals += torch.bincount(token_groups, minlength=groups)
            for layer, logits in enumerate(outputs.router_logits or ()):
                chosen = logits.topk(moe.num_experts_per_tok, dim=-1).indices.cpu()[keep.reshape(-1)]
                flat = chosen.reshape(-1)  # global ids g * E + e
                assignment_groups = token_groups.repeat_interleave(moe.num_experts_per_tok)
                for group in range(groups):
                    local = flat[assignment_groups == group] - group * moe.num_experts
                    token_counts[layer, group] += torch.bincount(local, minlength=moe.num_experts).float()
            for layer, logits in enumerate(outputs.sequence_router_logits or ()):
                chosen = logits.topk(moe.num_sequence_experts_per_seq, dim=-1).indices.cpu()
                if layer == len(sequence_choices):
                    sequence_choices.append([])
                sequence_choices[layer].append(chosen)
            sequence_groups.append(task_ids)
    finally:
        base.train(was_training)
    return ExpertUsage(
        token_counts=token_counts,
        token_totals=token_totals,
        token_top_k=moe.num_experts_per_tok,
        sequence_choices=tuple(torch.cat(per_layer) for per_layer in sequence_choices),
        sequence_groups=torch.cat(sequence_groups) if sequence_groups else torch.zeros(0, dtype=torch.long),
        sequence_expert_names=(
            (tuple(moe.mmu_sequence_experts), tuple(moe.t2i_sequence_experts)) if moe.sequence_moe else ()
        ),
    )


__all__ = ["GROUP_NAMES", "ExpertUsage", "expert_usage"]
