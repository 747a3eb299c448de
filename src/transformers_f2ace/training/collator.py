"""`UniF2aceDataCollator`: raw records -> one left-padded mixed MMU + T2I training batch (SPEC §2, §4).

Records (one image each, a PIL image or anything the image processor takes):

    {"image": ..., "caption": str}                                   T2I: learn to draw `image` from `caption`
    {"image": ..., "messages": [{"role": ..., "content": ...}]}      MMU, Hugging Face chat format
    {"image": ..., "conversations": [{"from": ..., "value": ...}]}   MMU, ShareGPT / LLaVA format ("human" / "gpt")

Extra keys are ignored. Rows keep the record order; the batch holds, for B rows of which B_mmu are MMU and B_t2i
T2I, and T the longest row:

    input_ids, attention_mask (B, T)   left-padded with `[PAD]`; image spans hold `[MASK]` placeholders
    pixel_values (B, 3, R, R)          image i fills the i-th image span (one per row, row order)
    labels (B, T)                      only with MMU rows: the assistant answers (+ their EOS), -100 elsewhere
    image_generation_mask (B, T)       only with T2I rows: the image positions the model re-masks and predicts
    mask_ratio (B,)                    only with T2I rows: n / N per T2I row, 1.0 (unused) on MMU rows
    semantic_pixel_values, identity_pixel_values (B_mmu, ...)   encoder views of the MMU images only (never of a
                                       T2I target, which would leak it), when the image processor makes them

Randomness, in this order per batch: the T2I mask times `t` (B_t2i,), the mask scores (B_t2i, N) (both through
[`mask_image_tokens`]), then the condition-dropout draws (B_t2i,).
"""

import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.utils.chat_template_utils import render_jinja_template

from ..configuration_unif2ace import UniF2aceConfig
from ..loss_d3diff import MASK_SCHEDULES, mask_image_tokens
from ..processing_unif2ace import IMAGE_MARKER, UniF2aceProcessor


IGNORE_INDEX = -100
MMU_KEYS = ("messages", "conversations")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CHAT_ROLES = ("system", "user", "assistant")
RECORD_SHAPES = (
    '{"image": ..., "caption": str} (T2I), {"image": ..., "messages": [{"role", "content"}]} or '
    '{"image": ..., "conversations": [{"from": "human" | "gpt", "value"}]} (MMU)'
)
# an `<image>` marker written in a message's text, with the newline LLaVA puts after it
_MARKER_PATTERN = re.compile(re.escape(IMAGE_MARKER) + r"\n?")


@dataclass
class _Row:
    """One unpadded row: ids, attention, labels (MMU) and the positions of its image / prompt tokens."""

    input_ids: list[int]
    labels: list[int]
    image_positions: list[int]
    prompt_positions: list[int]


@dataclass
class UniF2aceDataCollator:
    r"""
    Collates `{image, caption}` (T2I) and `{image, messages | conversations}` (MMU) records into one mixed batch for
    [`UniF2aceForConditionalGeneration`] (see the module docstring for the batch layout). Usable as the
    `data_collator` of any `transformers.Trainer` (with `remove_unused_columns=False`, which [`UniF2aceTrainer`]
    sets itself).

    Args:
        processor ([`UniF2aceProcessor`]): tokenizes both kinds and makes the pixel values / encoder views.
        mask_schedule (`str`): mask ratio r(t) of the T2I masking, one of `MASK_SCHEDULES` (config: `mask_schedule`).
        min_masked (`int`): at least this many image tokens are masked per T2I image (SPEC §4: 1).
        condition_dropout_prob (`float`): share of T2I prompts dropped for classifier-free guidance (config:
            `condition_dropout_prob`); a dropped prompt's text tokens get attention_mask 0, exactly as the sampler's
            unconditional half.
        seed (`int`, *optional*): seeds a private generator (one stream per DataLoader worker: seed + worker id), so
            batches are reproducible. Without it (and without `generator`) the global torch RNG is used.
        generator (`torch.Generator`, *optional*): a CPU generator to draw from instead (takes precedence over `seed`).
    """

    processor: UniF2aceProcessor
    mask_schedule: str = "cosine"
    min_masked: int = 1
    condition_dropout_prob: float = 0.1
    seed: int | None = None
    generator: torch.Generator | None = None
    _worker_generators: dict[int, torch.Generator] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.processor, UniF2aceProcessor):
            raise ValueError(f"processor must be a UniF2aceProcessor, got {type(self.processor).__name__}")
        if self.mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"mask_schedule must be one of {tuple(MASK_SCHEDULES)}, got {self.mask_schedule!r}")
        if not 0 <= self.min_masked <= self.processor.num_image_tokens:
            raise ValueError(
                f"min_masked must be in [0, {self.processor.num_image_tokens}] (image tokens per image), "
                f"got {self.min_masked}"
            )
        if not 0.0 <= self.condition_dropout_prob <= 1.0:
            raise ValueError(f"condition_dropout_prob must be in [0, 1], got {self.condition_dropout_prob}")
        tokenizer = self.processor.tokenizer
        token_id = tokenizer.convert_tokens_to_ids
        self._pad_id = tokenizer.pad_token_id
        self._soi_id, self._eoi_id = token_id("<|soi|>"), token_id("<|eoi|>")
        self._framing_ids = {tokenizer.bos_token_id, tokenizer.eos_token_id}

    @classmethod
    def from_config(
        cls, processor: UniF2aceProcessor, config: UniF2aceConfig, seed: int | None = None, **kwargs
    ) -> "UniF2aceDataCollator":
        """The collator with the masking schedule and condition dropout of `config` (keyword arguments override)."""
        if processor.num_image_tokens != config.num_image_tokens:
            raise ValueError(
                f"processor.num_image_tokens ({processor.num_image_tokens}) differs from the config's "
                f"num_image_tokens ({config.num_image_tokens}): use the processor saved with this model"
            )
        defaults = {"mask_schedule": config.mask_schedule, "condition_dropout_prob": config.condition_dropout_prob}
        return cls(processor, seed=seed, **{**defaults, **kwargs})

    # ------------------------------------------------------------------------------------------------ batching
    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(records) == 0:
            raise ValueError("records is empty")
        kinds = self.record_kinds(records)
        t2i = [i for i, kind in enumerate(kinds) if kind == "t2i"]
        mmu = [i for i, kind in enumerate(kinds) if kind == "mmu"]
        rows: list[_Row | None] = [None] * len(records)
        pixel_values: list[torch.Tensor | None] = [None] * len(records)
        views: dict[str, torch.Tensor] = {}
        if t2i:
            t2i_rows, t2i_pixels = self._t2i_rows([records[i] for i in t2i])
            for i, row, pixels in zip(t2i, t2i_rows, t2i_pixels):
                rows[i], pixel_values[i] = row, pixels
        if mmu:
            mmu_rows, mmu_pixels, views = self._mmu_rows([records[i] for i in mmu])
            for i, row, pixels in zip(mmu, mmu_rows, mmu_pixels):
                rows[i], pixel_values[i] = row, pixels

        batch = self._pad(rows)
        batch["pixel_values"] = torch.stack(pixel_values)
        batch.update(views)
        if not mmu:
            del batch["labels"]  # all -100: a text loss over no token would be NaN
        if t2i:
            self._add_generation_targets(batch, rows, t2i)
        return batch

    def record_lengths(self, records: Sequence[Mapping[str, Any]]) -> list[int]:
        """Per record its text tokens (the caption, or the conversation through the chat template) plus the image's
        tokens — the row length without the task / BOS / EOS framing — to group records of similar length into batches
        (`train_sampling_strategy="group_by_length"` in [`UniF2aceTrainer`]), so that short T2I rows are not padded
        to the length of long conversations."""
        texts = [record["caption"] if kind == "t2i" else self._render_chat(record)[0]
                 for record, kind in zip(records, self.record_kinds(records))]
        text_lengths = self.processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(ids) + self.processor.num_image_tokens for ids in text_lengths]

    def record_kinds(self, records: Sequence[Mapping[str, Any]]) -> list[str]:
        """Per record its task, "t2i" (a caption) or "mmu" (a conversation); raises ValueError on a malformed one."""
        return [self._record_kind(record, index) for index, record in enumerate(records)]

    def _record_kind(self, record: Any, index: int) -> str:
        if not isinstance(record, Mapping):
            raise ValueError(f"record {index} is a {type(record).__name__}; records are mappings: {RECORD_SHAPES}")
        keys = [key for key in ("caption", *MMU_KEYS) if record.get(key) is not None]
        if record.get("image") is None or len(keys) != 1:
            raise ValueError(
                f"record {index} has keys {sorted(record)}; expected exactly one image and one of caption / "
                f"messages / conversations: {RECORD_SHAPES}"
            )
        if keys[0] == "caption" and not isinstance(record["caption"], str):
            raise ValueError(f"record {index}: caption must be a string, got {type(record['caption']).__name__}")
        return "t2i" if keys[0] == "caption" else "mmu"

    def _t2i_rows(self, records: list[Mapping[str, Any]]) -> tuple[list[_Row], torch.Tensor]:
        """`<|t2i|> BOS caption EOS <|soi|> [MASK]×N <|eoi|>` rows (no encoder views: the image is the target)."""
        inputs = self.processor(
            images=[record["image"] for record in records], text=[record["caption"] for record in records],
            mode="t2i", return_tensors="pt", do_semantic_view=False, do_identity_view=False,
        )
        rows = []
        for ids, attention in zip(inputs["input_ids"], inputs["attention_mask"]):
            ids = ids[attention.bool()].tolist()
            soi = ids.index(self._soi_id)
            # the prompt text: after <|t2i|>, before <|soi|>, without BOS / EOS (as the sampler's unconditional half)
            prompt = [p for p in range(1, soi) if ids[p] not in self._framing_ids]
            image = list(range(soi + 1, ids.index(self._eoi_id)))
            rows.append(_Row(ids, [IGNORE_INDEX] * len(ids), image, prompt))
        return rows, inputs["pixel_values"]

    def _mmu_rows(self, records: list[Mapping[str, Any]]) -> tuple[list[_Row], torch.Tensor, dict[str, torch.Tensor]]:
        """Chat-template rows with labels on the assistant answers; the encoder views of their images."""
        rendered, answer_spans = map(list, zip(*(self._render_chat(record) for record in records)))
        inputs = self.processor(images=[record["image"] for record in records], text=rendered, mode="mmu",
                                return_tensors="pt")
        rows = []
        for ids, attention, text, spans in zip(inputs["input_ids"], inputs["attention_mask"], rendered, answer_spans):
            ids = ids[attention.bool()].tolist()
            answer = self._answer_token_mask(ids, text, spans)
            labels = [token if is_answer else IGNORE_INDEX for token, is_answer in zip(ids, answer)]
            image = list(range(ids.index(self._soi_id) + 1, ids.index(self._eoi_id)))
            rows.append(_Row(ids, labels, image, []))
        views = {
            name: inputs[name] for name in self.processor.image_processor.model_input_names
            if name != "pixel_values" and name in inputs
        }
        return rows, inputs["pixel_values"], views

    def _render_chat(self, record: Mapping[str, Any]) -> tuple[str, list[tuple[int, int]]]:
        """An MMU record's conversation through the chat template -> (text, character spans of the answers)."""
        messages = _normalise_chat(record["messages"] if record.get("messages") is not None else record["conversations"])
        texts, spans = render_jinja_template(
            conversations=[messages], chat_template=self.processor.chat_template, return_assistant_tokens_mask=True,
            **self.processor.tokenizer.special_tokens_map,
        )
        return texts[0], spans[0]

    def _answer_token_mask(self, ids: list[int], text: str, spans: list[tuple[int, int]]) -> list[bool]:
        """Tokens overlapping the template's `{% generation %}` character spans of `text`, located in the processor's
        MMU sequence (`<|mmu|>` + `text` with the `<image>` marker expanded to the image span + BOS).

        Each span first takes in the whitespace right before it: the generation prompt ends at `ASSISTANT:`, so the
        model generates that separator too (and a tokenizer may give it a token of its own, `Ġ` before `hi`).
        The processor's own `return_assistant_tokens_mask` does not account for the image expansion, so the spans are
        shifted here and the re-tokenized sequence is checked against the processor's ids."""
        spans = [(len(text[:start].rstrip()), end) for start, end in spans]
        expansion = self.processor.image_span + self.processor.tokenizer.bos_token
        marker_at = text.index(IMAGE_MARKER)
        sequence = "<|mmu|>" + text.replace(IMAGE_MARKER, expansion)
        encoded = self.processor.tokenizer(sequence, add_special_tokens=False, return_offsets_mapping=True)
        if encoded["input_ids"] != ids:
            raise RuntimeError(
                "The processor's MMU sequence is not `<|mmu|>` + chat text with <image> -> <|soi|> [MASK]*N <|eoi|> "
                "BOS; UniF2aceDataCollator cannot place the answer labels"
            )
        shift = len("<|mmu|>")
        shifted = [
            (start + shift + (len(expansion) - len(IMAGE_MARKER)) * (start > marker_at),
             end + shift + (len(expansion) - len(IMAGE_MARKER)) * (end > marker_at))
            for start, end in spans
        ]
        return [
            any(token_start < end and token_end > start for start, end in shifted)
            for token_start, token_end in encoded["offset_mapping"]
        ]

    def _pad(self, rows: list[_Row]) -> dict[str, torch.Tensor]:
        """Left-pad to the longest row: `[PAD]` ids, attention 0, labels -100."""
        length = max(len(row.input_ids) for row in rows)
        input_ids = torch.full((len(rows), length), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for b, row in enumerate(rows):
            start = length - len(row.input_ids)
            input_ids[b, start:] = torch.tensor(row.input_ids)
            attention_mask[b, start:] = 1
            labels[b, start:] = torch.tensor(row.labels)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _add_generation_targets(self, batch: dict[str, torch.Tensor], rows: list[_Row], t2i: list[int]) -> None:
        """`image_generation_mask`, `mask_ratio` and the condition dropout of the T2I rows (in place)."""
        generator = self._generator()
        num_tokens = self.processor.num_image_tokens
        masked = mask_image_tokens(  # on placeholder codes: only the mask and the ratios are used
            torch.zeros(len(t2i), num_tokens, dtype=torch.long), mask_token_id=1, generator=generator,
            schedule=self.mask_schedule, min_masked=self.min_masked,
        )
        dropped = torch.rand(len(t2i), generator=generator) < self.condition_dropout_prob
        length = batch["input_ids"].shape[1]
        generation_mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        mask_ratio = torch.ones(len(rows))
        for k, b in enumerate(t2i):
            offset = length - len(rows[b].input_ids)
            image = torch.tensor(rows[b].image_positions) + offset
            generation_mask[b, image[masked.mask[k]]] = True
            mask_ratio[b] = masked.mask_ratio[k]
            if dropped[k] and rows[b].prompt_positions:
                batch["attention_mask"][b, torch.tensor(rows[b].prompt_positions) + offset] = 0
        batch["image_generation_mask"] = generation_mask
        batch["mask_ratio"] = mask_ratio

    def _generator(self) -> torch.Generator | None:
        """The explicit generator, else one seeded stream per DataLoader worker, else None (global RNG)."""
        if self.generator is not None or self.seed is None:
            return self.generator
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        if worker_id not in self._worker_generators:
            self._worker_generators[worker_id] = torch.Generator().manual_seed(self.seed + worker_id)
        return self._worker_generators[worker_id]


# ---------------------------------------------------------------------------------------------------- chat records
def _normalise_chat(conversation: Any) -> list[dict[str, Any]]:
    """HF messages or ShareGPT turns -> HF messages with exactly one `{"type": "image"}` part (where an `<image>`
    marker or image part was, else at the start of the first user turn) and at least one assistant answer."""
    if not isinstance(conversation, Sequence) or isinstance(conversation, str) or not conversation:
        raise ValueError(f"messages / conversations must be a non-empty list of turns, got {conversation!r}")
    messages, images = [], 0
    for turn in conversation:
        role, parts = _parse_turn(turn)
        text = []
        for part in parts:
            if part["type"] == "image":
                images += 1
            else:
                images += len(_MARKER_PATTERN.findall(part["text"]))
                text.append(_MARKER_PATTERN.sub("", part["text"]))
        has_image = images > sum(message["has_image"] for message in messages)
        messages.append({"role": role, "text": "".join(text), "has_image": has_image})
    if images > 1:
        raise ValueError(f"a record holds one image, but its conversation has {images} image parts / <image> markers")
    if not any(message["role"] == "assistant" and message["text"].strip() for message in messages):
        raise ValueError("an MMU conversation needs at least one non-empty assistant answer to learn from")
    if images == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError("an MMU conversation needs a user turn to hold the image")
        first_user["has_image"] = True
    return [
        {"role": m["role"], "content": [{"type": "image"}] * m["has_image"] + [{"type": "text", "text": m["text"]}]}
        for m in messages
    ]


def _parse_turn(turn: Any) -> tuple[str, list[dict[str, str]]]:
    """One turn -> (role, content parts `{"type": "text", "text"}` / `{"type": "image"}`)."""
    if isinstance(turn, Mapping) and "role" in turn and "content" in turn:
        role, content = turn["role"], turn["content"]
        if role not in CHAT_ROLES:
            raise ValueError(f"message role must be one of {CHAT_ROLES}, got {role!r}")
    elif isinstance(turn, Mapping) and "from" in turn and "value" in turn:
        if turn["from"] not in SHAREGPT_ROLES:
            raise ValueError(f"ShareGPT 'from' must be one of {tuple(SHAREGPT_ROLES)}, got {turn['from']!r}")
        role, content = SHAREGPT_ROLES[turn["from"]], turn["value"]
    else:
        raise ValueError(f"a chat turn must be {{'role', 'content'}} or {{'from', 'value'}}, got {turn!r}")
    if isinstance(content, str):
        return role, [{"type": "text", "text": content}]
    if not isinstance(content, Sequence):
        raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    parts = []
    for part in content:
        is_text = isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)
        if not is_text and not (isinstance(part, Mapping) and part.get("type") == "image"):
            raise ValueError(f"content parts must be {{'type': 'text', 'text'}} or {{'type': 'image'}}, got {part!r}")
        parts.append({"type": "text", "text": part["text"]} if is_text else {"type": "image"})
    return role, parts


class StepSeededCollator:
    r"""
    Wraps a [`UniF2aceDataCollator`] so that the T2I masks (and the condition dropout) of every micro-batch come from a
    generator seeded with `(seed, stream, index)`: for training batches, `index` is the micro-batch's position in the
    whole run across processes, `(batches this process consumed before the current pass + position in the pass) ·
    num_processes + process_index`; evaluation batches ([`evaluating`]) have their own stream, restarted at every
    evaluation.

    The masks then depend only on the step, not on what a stateful generator drew before. That makes resuming from a
    checkpoint exact (the Trainer skips the trained batches without collating them, so a running stream would continue
    from the wrong place; its prefetching and the evaluations would also move the stream), gives every process its
    own masks (a shared `seed` would draw the same masks on every rank), and makes N processes × batch B draw exactly
    what 1 process × batch B × N accumulation steps draws. DataLoader workers are accounted for (batch i of a pass
    goes to worker i mod W). [`StepSeedCallback`] sets the offsets at every epoch start.
    """

    TRAIN_STREAM, EVAL_STREAM = 0, 1

    def __init__(self, collator: UniF2aceDataCollator, seed: int):
        self.collator = collator
        self.seed = seed
        self.start, self.process_index, self.num_processes = 0, 0, 1
        self._count = {self.TRAIN_STREAM: 0, self.EVAL_STREAM: 0}
        self._stream = self.TRAIN_STREAM

    def reset(self, start: int, process_index: int, num_processes: int) -> None:
        """A new pass over the training data begins at this process's micro-batch number `start`."""
        self.start, self.process_index, self.num_processes = start, process_index, num_processes
        self._count[self.TRAIN_STREAM] = 0

    @contextmanager
    def evaluating(self):
        """Batches collated inside come from the evaluation stream (from its start), leaving training's untouched."""
        self._stream, self._count[self.EVAL_STREAM] = self.EVAL_STREAM, 0
        try:
            yield
        finally:
            self._stream = self.TRAIN_STREAM

    def __call__(self, records):
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        stream = self._stream
        start = self.start if stream == self.TRAIN_STREAM else 0
        position = start + worker_id + self._count[stream] * num_workers
        self._count[stream] += 1
        index = position * self.num_processes + self.process_index
        state = np.random.SeedSequence([self.seed, stream, index]).generate_state(1, dtype=np.uint64)[0]
        self.collator.generator = torch.Generator().manual_seed(int(state))
        return self.collator(records)
