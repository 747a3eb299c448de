"""Images end to end: processor -> VQ codes at the placeholders -> understanding generate / pipeline."""

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import pipeline

from transformers_f2ace import UniF2aceConfig, UniF2aceForConditionalGeneration


def face(seed: int = 0, size: int = 48) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    r, g, b = torch.randint(0, 256, (3,), generator=generator).tolist()
    image = Image.new("RGB", (size, size), (r, g, b))
    ImageDraw.Draw(image).ellipse((8, 6, size - 8, size - 4), fill=(230, 190, 160))
    return image


def test_pixel_values_fill_the_placeholders_with_vq_codes(tiny_model, tiny_processor, tiny_config):
    inputs = tiny_processor(images=[face(0), face(1)], text=["describe", "is she smiling?"], return_tensors="pt")
    codes = tiny_model.model.vq.encode(inputs["pixel_values"])
    manual = inputs["input_ids"].clone()
    placeholders = manual == tiny_config.image_token_id
    manual[placeholders] = (codes + tiny_config.image_token_offset).flatten()
    encoder_views = {k: inputs[k] for k in ("semantic_pixel_values", "identity_pixel_values")}
    with torch.no_grad():
        from_pixels = tiny_model(**inputs).logits
        from_codes = tiny_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                image_codes=codes, **encoder_views).logits
        from_ids = tiny_model(input_ids=manual, attention_mask=inputs["attention_mask"], **encoder_views).logits
    torch.testing.assert_close(from_pixels, from_codes)
    torch.testing.assert_close(from_pixels, from_ids)


def test_image_count_must_match_the_spans(tiny_model, tiny_processor):
    inputs = tiny_processor(images=face(), text="describe", return_tensors="pt")
    with pytest.raises(ValueError, match="2 images .* for 16 image placeholders"):
        tiny_model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"].repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match="neither pixel_values nor image_codes"):
        tiny_model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="image_codes must lie in"):
        tiny_model(input_ids=inputs["input_ids"], image_codes=torch.full((1, 16), 999))


def test_encoder_views_must_be_one_per_mmu_image(tiny_model, tiny_processor):
    inputs = tiny_processor(images=face(), text="describe", return_tensors="pt")
    inputs["identity_pixel_values"] = inputs["identity_pixel_values"].repeat(2, 1, 1, 1)
    with pytest.raises(ValueError, match="face encoder inputs for 1 MMU sequences"):
        tiny_model(**inputs)


def test_precomputed_identity_embeds_replace_the_identity_encoder(tiny_model, tiny_processor):
    inputs = tiny_processor(images=face(), text="describe", return_tensors="pt")
    encoders = tiny_model.model.feature_encoders
    with torch.no_grad():
        reference = tiny_model(**inputs).logits
        identity = encoders.identity_encoder(inputs.pop("identity_pixel_values"))
        calls = []
        hook = encoders.identity_encoder.register_forward_hook(lambda *args: calls.append(1))
        from_embeds = tiny_model(**inputs, identity_embeds=identity).logits
        hook.remove()
    assert not calls
    torch.testing.assert_close(from_embeds, reference)


def test_understanding_generate_from_processor_outputs(tiny_model, tiny_processor):
    inputs = tiny_processor(images=[face(0), face(1)], text=["describe", "is the person smiling today?"],
                            return_tensors="pt")
    cached = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    uncached = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()
    assert cached.shape == (2, inputs["input_ids"].shape[1] + 6)
    texts = tiny_processor.batch_decode(cached[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_chat_template_to_generate(tiny_model, tiny_processor):
    messages = [{"role": "user", "content": [{"type": "image", "image": face()},
                                             {"type": "text", "text": "Describe the face."}]}]
    inputs = tiny_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, return_tensors="pt")
    out = tiny_model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_image_text_to_text_pipeline(tiny_model, tiny_processor):
    tiny_model.generation_config.max_new_tokens = 5
    pipe = pipeline("image-text-to-text", model=tiny_model, processor=tiny_processor)
    messages = [{"role": "user", "content": [{"type": "image", "image": face()},
                                             {"type": "text", "text": "Describe the face."}]}]
    result = pipe(text=messages, max_new_tokens=5, do_sample=False)
    assert isinstance(result[0]["generated_text"], (str, list))


def test_frozen_vq_gets_no_gradient_and_stays_in_eval(tiny_processor):
    model = UniF2aceForConditionalGeneration(UniF2aceConfig.tiny()).train()
    assert not model.model.vq.training
    inputs = tiny_processor(images=face(), text="describe the face", return_tensors="pt")
    labels = inputs["input_ids"].clone()
    model(**inputs, labels=labels).loss.backward()
    assert all(p.grad is None for p in model.model.vq.parameters())
    assert model.lm_head.weight.grad is not None


def test_mixed_text_only_and_image_rows_generate(tiny_model, tiny_processor):
    inputs = tiny_processor(images=[[], [face()]], text=["what is a fringe?", "describe"], return_tensors="pt")
    out = tiny_model.generate(**inputs, max_new_tokens=3, do_sample=False)
    single = tiny_processor(images=face(), text="describe", return_tensors="pt")
    alone = tiny_model.generate(**single, max_new_tokens=3, do_sample=False)
    assert out[1, -3:].tolist() == alone[0, -3:].tolist()
