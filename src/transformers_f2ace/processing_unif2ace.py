"""UniF2aceProcessor: face images + text -> the unified-vocabulary sequences of SPEC §2.

    MMU  <|mmu|> <|soi|> [MASK]×N <|eoi|> <|endoftext|> text …        (image placeholders; the model fills them with
                                                                        the VQ codes of `pixel_values`)
    T2I  <|t2i|> <|endoftext|> prompt <|endoftext|> <|soi|> [MASK]×N <|eoi|>

`<image>` in MMU text marks where an image goes (the chat template writes it); text without a marker gets its image
first. Batches are left-padded with `[PAD]` so that generation continues every row at the same position and every
T2I image span ends at the same column.
"""

import re
from typing import Any, Literal

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack


IMAGE_MARKER = "<image>"
TASKS = ("mmu", "t2i")

# Show-o's understanding prompt: a system line, then USER / ASSISTANT turns; images come first in their message.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- for part in parts if part['type'] == 'image' -%}<image>{%- endfor -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{{ '\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "USER: {% for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{{ '\\n' }}"
    "{%- else -%}"
    "ASSISTANT:{% generation %} {% for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "<|endoftext|>{% endgeneration %}{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)


def _images_per_row(images: Any, num_texts: int, mode: str) -> list[list[Any]]:
    """The images of each text row. Accepted: None; one image (one text); a flat list (one image per text, or all for
    a single understanding text); a nested list with one (possibly empty) list per text."""
    if images is None:
        return [[] for _ in range(num_texts)]
    if not isinstance(images, (list, tuple)):
        images = [images]
    if images and all(isinstance(row, (list, tuple)) for row in images):
        rows = [list(row) for row in images]
    elif mode == "mmu" and num_texts == 1:
        rows = [list(images)]
    else:
        rows = [[image] for image in images]
    if len(rows) != num_texts:
        raise ValueError(
            f"Got {len(rows)} images (or image lists) for {num_texts} texts: pass one image per text, a list of "
            "images for a single text, or one list of images per text"
        )
    if mode == "t2i" and {len(row) for row in rows} != {1}:
        raise ValueError("mode='t2i' takes one target image per prompt (training), or none at all (generation)")
    return rows


def _expand(text: str, replacements: list[tuple[int, int, str, str]]) -> tuple[str, list[dict[str, Any]]]:
    """Apply `(start, end, type, replacement)` edits (sorted, non-overlapping; `start == end` inserts) to `text`.
    Returns the new text and, per edit, transformers' replacement record: `span` in `text`, `new_span` in the result
    (what `ProcessorMixin._adjust_assistant_masks_indices` reads to shift chat-template character offsets)."""
    pieces, records, last, gained = [], [], 0, 0
    for start, end, kind, replacement in replacements:
        pieces += [text[last:start], replacement]
        new_start = start + gained
        records.append({"type": kind, "span": (start, end), "new_span": (new_start, new_start + len(replacement)),
                        "text": text[start:end], "replacement": replacement})
        gained += len(replacement) - (end - start)
        last = end
    pieces.append(text[last:])
    return "".join(pieces), records


class UniF2aceProcessorKwargs(ProcessingKwargs, total=False):
    r"""
    Processor defaults: left padding, no tokenizer special tokens (the processor frames the sequences itself).
    """

    _defaults = {
        "text_kwargs": {"padding": True, "padding_side": "left", "add_special_tokens": False},
        "images_kwargs": {},
    }


class UniF2aceProcessor(ProcessorMixin):
    r"""
    Combines [`UniF2aceImageProcessor`] and the unified-vocabulary tokenizer.

    Args:
        image_processor: the image processor (`pixel_values` plus the optional encoder views).
        tokenizer: a tokenizer built by `tokenization_unif2ace` (ids must match the model config).
        num_image_tokens (`int`): image tokens per image (`config.num_image_tokens`).
        chat_template (`str`, *optional*): Jinja template; Show-o's USER / ASSISTANT format by default.
    """

    valid_processor_kwargs = UniF2aceProcessorKwargs

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens: int = 256, chat_template=None, **kwargs):
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        self.num_image_tokens = num_image_tokens
        self.image_token = tokenizer.mask_token
        self.image_token_id = tokenizer.mask_token_id
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE, **kwargs)

    @property
    def image_span(self) -> str:
        """`<|soi|> [MASK]×N <|eoi|>` as text."""
        return "<|soi|>" + self.image_token * self.num_image_tokens + "<|eoi|>"

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        mode: Literal["mmu", "t2i"] | None = None,
        **kwargs: Unpack[UniF2aceProcessorKwargs],
    ) -> BatchFeature:
        """Returns `input_ids`, `attention_mask` (B, T) and, with images, `pixel_values` (+ encoder views).

        `mode`: `"mmu"` (understanding: images + questions; the default when images are given) or `"t2i"` (generation
        prompts; the default for text alone; images, one per prompt, are training targets). `images`: one image, a
        list (one per text, or all of them for a single understanding text) or one list per text (empty for a
        text-only understanding row).

        With `return_offsets_mapping=True` the tokenizer's `offset_mapping` (character spans in the *expanded* sequence)
        is returned too, and with `return_text_replacement_offsets=True` the `text_replacement_offsets`: per row, each
        insertion into the given text (task token, `<image>` expansion, BOS / EOS framing) as
        `{"type", "span", "new_span", "text", "replacement"}` in transformers' format. Together they let
        `apply_chat_template(..., return_assistant_tokens_mask=True)` place the assistant masks."""
        if images is None and text is None:
            raise ValueError("Pass `text` (prompts or questions), `images`, or both")
        mode = mode or ("mmu" if images is not None else "t2i")
        if mode not in TASKS:
            raise ValueError(f"mode must be one of {TASKS}, got {mode!r}")
        if text is None:
            text = [""] * (len(images) if isinstance(images, (list, tuple)) else 1)
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings")
        rows_images = _images_per_row(images, len(texts), mode)
        merged = self._merge_kwargs(UniF2aceProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None) or images_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        return_replacements = text_kwargs.pop("return_text_replacement_offsets", None)
        if return_replacements is None:
            return_replacements = merged.get("return_text_replacement_offsets", False)

        counts = [len(row) for row in rows_images]
        expanded = [
            self._mmu_text(t, n) if mode == "mmu" else self._t2i_text(t) for t, n in zip(texts, counts)
        ]
        sequences = [sequence for sequence, _ in expanded]
        data = {}
        flat_images = [image for row in rows_images for image in row]
        if flat_images:
            data.update(self.image_processor(flat_images, return_tensors=return_tensors, **images_kwargs))

        encoded = self.tokenizer(sequences, return_tensors=return_tensors, **text_kwargs)
        self._check_structure(encoded["input_ids"], [s.count("<|soi|>") for s in sequences], mode)
        self._check_length(encoded["input_ids"])
        data.update(encoded)
        if return_replacements:
            data["text_replacement_offsets"] = [replacements for _, replacements in expanded]
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    def _mmu_text(self, text: str, num_images: int) -> tuple[str, list[dict[str, Any]]]:
        """`<|mmu|>` + text with each `<image>` -> image span + BOS (without markers, the row's images come first;
        a text-only row gets `<|mmu|> BOS text`), and the replacements made (see `_expand`)."""
        image = self.image_span + self.tokenizer.bos_token
        markers = [(m.start(), m.end(), "image", image) for m in re.finditer(re.escape(IMAGE_MARKER), text)]
        if markers and len(markers) != num_images:
            raise ValueError(
                f"A text has {len(markers)} {IMAGE_MARKER} markers but {num_images} images were given for it"
            )
        prefix = "" if markers else (image * num_images or self.tokenizer.bos_token)
        return _expand(text, [(0, 0, "task", "<|mmu|>" + prefix), *markers])

    def _t2i_text(self, prompt: str) -> tuple[str, list[dict[str, Any]]]:
        """`<|t2i|> BOS prompt EOS <|soi|> [MASK]×N <|eoi|>` and the replacements made (see `_expand`)."""
        if IMAGE_MARKER in prompt:
            raise ValueError(f"T2I prompts cannot contain {IMAGE_MARKER}: the image is what gets generated")
        bos, eos = self.tokenizer.bos_token, self.tokenizer.eos_token
        end = len(prompt)
        return _expand(prompt, [(0, 0, "task", f"<|t2i|>{bos}"), (end, end, "image", f"{eos}{self.image_span}")])

    def _check_structure(self, input_ids, images_per_row: list[int], mode: str) -> None:
        """Text that spells reserved tokens ([MASK], <|soi|>, <|eoi|>, task tokens) would corrupt the image spans or
        the task routing: refuse it."""
        token_id = self.tokenizer.convert_tokens_to_ids
        for row, images in zip(input_ids, images_per_row):
            row = list(row)
            expected = {
                self.image_token_id: self.num_image_tokens * images,
                token_id("<|soi|>"): images,
                token_id("<|eoi|>"): images,
                token_id("<|mmu|>"): int(mode == "mmu"),
                token_id("<|t2i|>"): int(mode == "t2i"),
            }
            if any(row.count(token) != count for token, count in expected.items()):
                raise ValueError(
                    "The text contains reserved tokens (<|soi|>, <|eoi|>, [MASK], <|mmu|>, <|t2i|>); write images as "
                    f"{IMAGE_MARKER} (understanding) or pass them as `images`, and choose the task with `mode`."
                )

    def _check_length(self, input_ids) -> None:
        limit = self.tokenizer.model_max_length
        longest = max(len(row) for row in input_ids)
        if limit and longest > limit:
            raise ValueError(
                f"A sequence has {longest} tokens ({self.num_image_tokens} per image included) but the model takes at "
                f"most {limit}; shorten the text."
            )

    def apply_chat_template(self, conversation, chat_template=None, processor_kwargs: dict | None = None, **kwargs):
        """Chats are understanding (MMU) sequences, with or without images; see `ProcessorMixin.apply_chat_template`.
        The `mode` goes in `processor_kwargs` (transformers warns about processing arguments left in `**kwargs`)."""
        processor_kwargs = {"mode": kwargs.pop("mode", "mmu"), **(processor_kwargs or {})}
        return super().apply_chat_template(conversation, chat_template, processor_kwargs=processor_kwargs, **kwargs)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def postprocess(self, pixel_values):
        """Pixels in [-1, 1] (B, 3, H, W) -> list of PIL images."""
        return self.image_processor.postprocess(pixel_values)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", *self.image_processor.model_input_names]


__all__ = ["UniF2aceProcessor"]
