"""UniF2aceProcessor: SPEC §2 sequences, padding, chat template, save/load, bad input (incl. property-based)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoProcessor

from transformers_f2ace import UniF2aceProcessor


def face(color=(200, 120, 90), size=(40, 48)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_mmu_sequence_layout(tiny_processor, tiny_config):
    c = tiny_config
    out = tiny_processor(images=face(), text="is the person smiling?", return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    n = c.num_image_tokens
    assert ids[:2] == [c.mmu_token_id, c.soi_token_id]
    assert ids[2 : 2 + n] == [c.image_token_id] * n
    assert ids[2 + n : 4 + n] == [c.eoi_token_id, c.bos_token_id]
    question = tiny_processor.tokenizer("is the person smiling?", add_special_tokens=False)["input_ids"]
    assert ids[4 + n :] == question
    assert out["pixel_values"].shape == (1, 3, c.vq_config.resolution, c.vq_config.resolution)
    assert out["attention_mask"].tolist() == [[1] * len(ids)]


def test_t2i_sequence_layout(tiny_processor, tiny_config):
    c = tiny_config
    ids = tiny_processor(text="a smiling woman", return_tensors="pt")["input_ids"][0].tolist()
    prompt = tiny_processor.tokenizer("a smiling woman", add_special_tokens=False)["input_ids"]
    n = c.num_image_tokens
    assert ids == [c.t2i_token_id, c.bos_token_id, *prompt, c.eos_token_id, c.soi_token_id,
                   *[c.mask_token_id] * n, c.eoi_token_id]


def test_batches_are_left_padded_with_pad(tiny_processor, tiny_config):
    out = tiny_processor(text=["a woman", "a man with a short black beard and a blue hat"], return_tensors="pt")
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape[0] == 2
    pad = int((mask[0] == 0).sum())
    assert pad > 0 and mask[0, :pad].sum() == 0 and mask[0, pad:].all()
    assert (ids[0, :pad] == tiny_config.pad_token_id).all()
    # image spans end at the same column in every row
    assert (ids[:, -1] == tiny_config.eoi_token_id).all()


def test_image_marker_places_the_image(tiny_processor, tiny_config):
    ids = tiny_processor(images=face(), text="look: <image> now answer", return_tensors="pt")["input_ids"][0]
    soi = ids.tolist().index(tiny_config.soi_token_id)
    assert soi > 1 and ids[0] == tiny_config.mmu_token_id


def test_chat_template(tiny_processor):
    messages = [
        {"role": "system", "content": "You describe faces."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the face."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A smiling woman."}]},
        {"role": "user", "content": "Hair colour?"},
    ]
    text = tiny_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "You describe faces.\n<image>USER: Describe the face.\nASSISTANT: A smiling woman.<|endoftext|>\n"
        "USER: Hair colour?\nASSISTANT:"
    )
    messages[1]["content"][0]["image"] = face()
    encoded = tiny_processor.apply_chat_template(
        messages[1:2], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert encoded["pixel_values"].shape[0] == 1
    assert encoded["input_ids"][0, 0] == tiny_processor.tokenizer.convert_tokens_to_ids("<|mmu|>")


def test_save_load_through_auto_processor(tmp_path, tiny_processor):
    tiny_processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is UniF2aceProcessor
    assert loaded.num_image_tokens == tiny_processor.num_image_tokens
    assert loaded.chat_template == tiny_processor.chat_template
    assert loaded.image_processor.to_dict() == tiny_processor.image_processor.to_dict()
    sample = dict(images=face(), text="describe", return_tensors="np")
    for key, value in tiny_processor(**sample).items():
        np.testing.assert_array_equal(loaded(**sample)[key], value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(images=[face(), face(), face()], text=["a", "b"]), "Got 3 images"),
        (dict(images=[face(), face()], text="a <image> face"), "1 <image> markers but 2 images"),
        (dict(images=[[face()], []], text=["a", "b"], mode="t2i"), "one target image per prompt"),
        (dict(), "Pass `text`"),
        (dict(text="hi", mode="video"), "mode must be one of"),
        (dict(text="a <image> face", mode="t2i"), "cannot contain <image>"),
        (dict(images=Image.new("RGB", (0, 5)), text="x"), "zero"),
        (dict(text="a [MASK] face"), "reserved tokens"),
        (dict(images=face(), text="<|eoi|> hi"), "reserved tokens"),
        (dict(images=face(), text="<|t2i|> draw"), "reserved tokens"),
    ],
)
def test_bad_input_raises_clear_errors(tiny_processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_processor(**kwargs)


def test_too_long_prompt_is_rejected(tiny_processor, tiny_config):
    limit = tiny_config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match=f"at most {limit}"):
        tiny_processor(text="beard " * limit)


MODES = ["RGB", "L", "RGBA", "P", "CMYK", "I;16", "LA", "1"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    width=st.integers(0, 90),
    height=st.integers(0, 90),
    mode=st.sampled_from(MODES),
    text=st.lists(st.sampled_from(["a", " beard", "<image>", "[MASK]", "<|soi|>", "<|eoi|>", "<|t2i|>", "é", "\n"]),
                  max_size=12).map("".join) | st.text(max_size=40),
    task=st.sampled_from(["mmu", "t2i"]),
)
def test_processor_property_well_formed_or_value_error(tiny_processor, tiny_config, width, height, mode, text, task):
    try:
        image = Image.new(mode, (width, height))
    except ValueError:
        return
    try:
        out = tiny_processor(images=image if task == "mmu" else None, text=text, mode=task, return_tensors="pt")
    except ValueError as error:
        assert str(error)
        return
    ids = out["input_ids"]
    assert ids.ndim == 2 and ids.shape == out["attention_mask"].shape
    assert int(ids.min()) >= 0 and int(ids.max()) < tiny_config.vocab_size
    assert int((ids == tiny_config.soi_token_id).sum()) == 1
    task_token = tiny_config.mmu_token_id if task == "mmu" else tiny_config.t2i_token_id
    assert int((ids == task_token).sum()) == 1
    assert int((ids == tiny_config.mask_token_id).sum()) == tiny_config.num_image_tokens
    if task == "mmu":
        pixels = out["pixel_values"]
        assert pixels.shape == (1, 3, tiny_config.vq_config.resolution, tiny_config.vq_config.resolution)
        assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0


def test_text_only_and_mixed_understanding_rows(tiny_processor, tiny_config):
    c = tiny_config
    out = tiny_processor(images=[[], [face()]], text=["hello there", "describe"], return_tensors="pt")
    assert out["pixel_values"].shape[0] == 1
    ids = out["input_ids"]
    assert int((ids[0] == c.soi_token_id).sum()) == 0 and int((ids[1] == c.soi_token_id).sum()) == 1
    first = ids[0][out["attention_mask"][0].bool()].tolist()
    assert first[:2] == [c.mmu_token_id, c.bos_token_id]


def test_text_only_chat_is_an_understanding_sequence(tiny_processor, tiny_config):
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    messages = [{"role": "user", "content": "What is a fringe?"}]
    with CaptureLogger(logging.get_logger("transformers.processing_utils")) as captured:
        encoded = tiny_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True, return_tensors="pt")
    assert "processor_kwargs" not in captured.out  # the MMU mode travels as a processing argument, silently
    ids = encoded["input_ids"][0].tolist()
    assert ids[0] == tiny_config.mmu_token_id and tiny_config.t2i_token_id not in ids
    assert tiny_config.soi_token_id not in ids


def test_several_images_in_one_understanding_text(tiny_processor, tiny_config):
    out = tiny_processor(images=[face(), face((10, 20, 30))], text="compare <image> and <image>", return_tensors="pt")
    assert out["pixel_values"].shape[0] == 2
    assert int((out["input_ids"] == tiny_config.soi_token_id).sum()) == 2
