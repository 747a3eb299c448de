"""Text -> image: MaskGIT sampling through the model, CFG in one batched forward, D3Diff inside forward."""

import pytest
import torch
from PIL import Image

from conftest import mmu_ids
from transformers_f2ace import UniF2aceConfig, UniF2aceForConditionalGeneration


PROMPTS = ["a smiling woman with long red curly hair", "a man with a short black beard"]


@pytest.fixture
def prompts(tiny_processor):
    return tiny_processor(text=PROMPTS, return_tensors="pt")


def sample(model, prompts, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("progress", False)
    return model.generate(**prompts, generation_mode="image", generator=torch.Generator().manual_seed(seed), **kwargs)


def test_image_codes_shape_range_and_seeded_determinism(tiny_model, tiny_config, prompts):
    codes = sample(tiny_model, prompts)
    assert codes.shape == (2, tiny_config.num_image_tokens) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < tiny_config.codebook_size
    assert torch.equal(codes, sample(tiny_model, prompts))
    assert not torch.equal(codes, sample(tiny_model, prompts, seed=1))


def test_guidance_runs_cond_and_uncond_in_one_batched_forward_per_step(tiny_model, prompts):
    batch_sizes = []
    hook = tiny_model.model.register_forward_hook(lambda module, args, out: batch_sizes.append(out[0].shape[0]))
    sample(tiny_model, prompts, num_inference_steps=5, guidance_scale=2.0)
    hook.remove()
    assert batch_sizes == [4] * 5
    batch_sizes.clear()
    hook = tiny_model.model.register_forward_hook(lambda module, args, out: batch_sizes.append(out[0].shape[0]))
    sample(tiny_model, prompts, num_inference_steps=5, guidance_scale=0.0)
    hook.remove()
    assert batch_sizes == [2] * 5


def test_unconditional_half_masks_out_exactly_the_prompt(tiny_model, tiny_config, prompts):
    image, prompt = tiny_model._image_prompt_layout(prompts["input_ids"])
    ids = prompts["input_ids"]
    for row in range(ids.shape[0]):
        text = ids[row][prompt[row]].tolist()
        assert text and all(t < tiny_config.text_vocab_size and t != tiny_config.bos_token_id for t in text)
    assert int(image.sum()) == 2 * tiny_config.num_image_tokens
    # guidance changes the result (the unconditional half differs from the conditional one)
    assert not torch.equal(sample(tiny_model, prompts, guidance_scale=0.0), sample(tiny_model, prompts, guidance_scale=3.0))


def test_generate_images_returns_pil_images(tiny_model, tiny_config, prompts):
    images = tiny_model.generate_images(**prompts, num_inference_steps=2, progress=False,
                                        generator=torch.Generator().manual_seed(0))
    assert len(images) == 2 and all(isinstance(i, Image.Image) for i in images)
    assert images[0].size == (tiny_config.vq_config.resolution,) * 2 and images[0].mode == "RGB"
    codes = sample(tiny_model, prompts, num_inference_steps=2)
    pixels = tiny_model.decode_image_tokens(codes)
    assert pixels.shape == (2, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
        (dict(guidance_scale=-1.0), "guidance_scale must be >= 0"),
        (dict(cfg=2), "unexpected arguments"),
    ],
)
def test_bad_sampling_arguments(tiny_model, prompts, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        sample(tiny_model, prompts, **kwargs)


def test_mixed_or_malformed_batches_are_rejected(tiny_model, tiny_config, prompts):
    mixed = torch.cat([prompts["input_ids"][:1, -20:], mmu_ids(tiny_config, [5, 6])[:, :20]])
    with pytest.raises(ValueError, match="T2I prompts only"):
        tiny_model.generate(mixed, generation_mode="image", progress=False)
    short = prompts["input_ids"][:, :-3]
    with pytest.raises(ValueError, match=f"{tiny_config.num_image_tokens} \\[MASK\\] tokens"):
        tiny_model.generate(short, generation_mode="image", progress=False)
    with pytest.raises(ValueError, match="generation_mode"):
        tiny_model.generate(prompts["input_ids"], generation_mode="video")


def test_non_finite_logits_raise_instead_of_sampling_garbage(tiny_config, prompts):
    model = UniF2aceForConditionalGeneration(tiny_config).eval()
    with torch.no_grad():
        model.lm_head.bias[tiny_config.image_token_offset] = float("nan")
    with pytest.raises(ValueError, match="(?i)nan|finite"):
        sample(model, prompts)


def t2i_training_batch(processor, config, seed=0):
    from test_image_path import face

    inputs = processor(images=[face(seed), face(seed + 1)], text=PROMPTS, mode="t2i", return_tensors="pt")
    image_span = inputs["input_ids"] == config.mask_token_id
    generator = torch.Generator().manual_seed(seed)
    mask = image_span & (torch.rand(image_span.shape, generator=generator) < 0.5)
    mask[:, -2] = True  # at least one masked position per image (the last image token)
    inputs["image_generation_mask"] = mask
    inputs["mask_ratio"] = mask.sum(-1).float() / config.num_image_tokens
    return {k: v for k, v in inputs.items() if k not in ("semantic_pixel_values", "identity_pixel_values")}


def test_d3diff_in_forward_equals_the_loss_on_the_masked_codes(tiny_model, tiny_processor, tiny_config):
    batch = t2i_training_batch(tiny_processor, tiny_config)
    out = tiny_model(**batch)
    assert out.logits is None, "a generation-only batch never builds full logits"
    codes = tiny_model.model.vq.encode(batch["pixel_values"])
    ids = batch["input_ids"].clone()
    span = ids == tiny_config.mask_token_id
    ids[span] = (codes + tiny_config.image_token_offset).flatten()
    targets = ids[batch["image_generation_mask"]] - tiny_config.image_token_offset
    ids[batch["image_generation_mask"]] = tiny_config.mask_token_id
    with torch.no_grad():
        logits = tiny_model(ids, attention_mask=batch["attention_mask"]).logits
    offset = tiny_config.image_token_offset
    code_logits = logits[batch["image_generation_mask"]][:, offset : offset + tiny_config.codebook_size]
    nll = torch.nn.functional.cross_entropy(code_logits, targets)
    torch.testing.assert_close(out.mask_loss, nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.mask_loss + tiny_config.d3diff_alpha * out.score_loss)


def test_chunked_fused_generation_loss_equals_the_plain_path(tiny_processor, tiny_config):
    losses, grads = [], []
    for chunk in (0, 5):
        torch.manual_seed(0)
        model = UniF2aceForConditionalGeneration(UniF2aceConfig.tiny(d3diff_chunk_size=chunk))
        out = model(**t2i_training_batch(tiny_processor, tiny_config))
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(model.lm_head.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_a_single_prompt_generates(tiny_model, tiny_processor, tiny_config):
    prompt = tiny_processor(text=PROMPTS[0], return_tensors="pt")
    images = tiny_model.generate_images(**prompt, num_inference_steps=2, progress=False)
    assert len(images) == 1 and images[0].size == (tiny_config.vq_config.resolution,) * 2


def test_skip_logits_keeps_both_losses_of_a_batch_with_labels_and_masked_images(tiny_processor, tiny_config):
    batch = t2i_training_batch(tiny_processor, tiny_config)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == tiny_config.mask_token_id, -100)
    batch["labels"] = labels.masked_fill(batch["attention_mask"] == 0, -100)
    outputs, grads = [], []
    for skip_logits in (False, True):
        torch.manual_seed(0)
        model = UniF2aceForConditionalGeneration(tiny_config)
        out = model(**batch, skip_logits=skip_logits)
        out.loss.backward()
        outputs.append(out)
        grads.append(model.lm_head.weight.grad.clone())
    full, skipped = outputs
    assert full.logits is not None and skipped.logits is None
    for term in ("text_loss", "mask_loss", "score_loss", "loss"):
        torch.testing.assert_close(getattr(skipped, term), getattr(full, term), atol=1e-5, rtol=1e-5, msg=term)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)
