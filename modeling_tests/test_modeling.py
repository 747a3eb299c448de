"""The unified decoder: cache, attention kernels, omni-attention semantics, padding, checkpointing, bad input."""

import pytest
import torch

from conftest import mmu_ids, t2i_ids
from transformers_f2ace import UniF2aceConfig, UniF2aceForConditionalGeneration, UniF2aceModel
from transformers_f2ace.modeling_unif2ace import image_block_ids


TEXT = [11, 12, 13, 14, 15, 16]


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize("block_style", ["sequential", "parallel"])
@pytest.mark.parametrize("token_moe", [True, False])
def test_kv_cache_decoding_matches_full_forward(block_style, token_moe):
    config = UniF2aceConfig.tiny(text_config=dict(block_style=block_style), moe_config=dict(token_moe=token_moe))
    torch.manual_seed(0)
    model = UniF2aceForConditionalGeneration(config).eval()
    ids = mmu_ids(config, TEXT)
    full = logits(model, ids)
    prefix = ids.shape[1] - 4
    with torch.no_grad():
        out = model(ids[:, :prefix], use_cache=True)
        cached = [out.logits]
        cache = out.past_key_values
        for position in range(prefix, ids.shape[1]):
            out = model(ids[:, position : position + 1], past_key_values=cache, use_cache=True)
            cached.append(out.logits)
    torch.testing.assert_close(torch.cat(cached, dim=1), full, atol=1e-5, rtol=1e-5)


def test_eager_and_sdpa_agree(tiny_config):
    torch.manual_seed(0)
    eager = UniF2aceForConditionalGeneration(tiny_config).eval()
    eager.set_attn_implementation("eager")
    sdpa = UniF2aceForConditionalGeneration(tiny_config).eval()
    sdpa.load_state_dict(eager.state_dict())
    sdpa.set_attn_implementation("sdpa")
    for ids in (mmu_ids(tiny_config, TEXT), t2i_ids(tiny_config, TEXT)):
        torch.testing.assert_close(logits(eager, ids), logits(sdpa, ids), atol=1e-5, rtol=1e-5)


def test_image_block_ids_marks_only_the_span_between_soi_and_eoi(tiny_config):
    c = tiny_config
    ids = torch.tensor([[c.t2i_token_id, 5, c.soi_token_id, 7, 8, c.eoi_token_id, 9, c.soi_token_id, 3, c.eoi_token_id]])
    assert image_block_ids(ids, c.soi_token_id, c.eoi_token_id).tolist() == [[-1, -1, -1, 1, 1, -1, -1, -1, 2, -1]]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_omni_attention_semantics(attn_implementation):
    # dense FFN, no sequence MoE: with token MoE, grouped expert GEMMs see different row counts when other tokens'
    # routing changes (1e-7 perturbations); the sequence MoE routes on the whole image context by design (tested
    # below). The attention pattern itself is what is tested here, with exact zeros.
    c = UniF2aceConfig.tiny(moe_config=dict(token_moe=False, sequence_moe=False))
    torch.manual_seed(0)
    tiny_model = UniF2aceForConditionalGeneration(c).eval()
    tiny_model.set_attn_implementation(attn_implementation)
    n = c.num_image_tokens
    codes = list(range(n))
    base = mmu_ids(c, TEXT, codes=codes)
    image_start = 2  # <|mmu|> <|soi|>
    image = slice(image_start, image_start + n)

    # a later image token changes the outputs of earlier image tokens (bidirectional inside the image)
    changed = base.clone()
    changed[0, image_start + n - 1] = c.image_token_offset + (codes[-1] + 1) % c.codebook_size
    delta = (logits(tiny_model, base) - logits(tiny_model, changed)).abs().amax(-1)[0]
    assert delta[image][: n - 1].min() > 1e-6, "every earlier image token must see the last image token"
    assert delta[:image_start].max() == 0, "text before the image must not see it"

    # later text never changes earlier outputs (causal text), whether before or after the image
    later = base.clone()
    later[0, -1] = 99
    delta = (logits(tiny_model, base) - logits(tiny_model, later)).abs().amax(-1)[0]
    assert delta[:-1].max() == 0
    assert delta[-1] > 0

    # T2I: the prompt never sees the image, every image token sees the whole image
    t2i = t2i_ids(c, TEXT, codes=codes)
    t2i_changed = t2i.clone()
    t2i_changed[0, -2] = c.mask_token_id
    delta = (logits(tiny_model, t2i) - logits(tiny_model, t2i_changed)).abs().amax(-1)[0]
    prompt_end = 1 + len(TEXT) + 1  # up to and including <|soi|>
    assert delta[:prompt_end].max() == 0
    assert delta[prompt_end:-2].min() > 1e-6


def test_sequence_moe_routes_on_the_image_context_so_later_text_stays_causal():
    c = UniF2aceConfig.tiny(moe_config=dict(token_moe=False))
    torch.manual_seed(0)
    model = UniF2aceForConditionalGeneration(c).eval()
    base = mmu_ids(c, TEXT)
    later = base.clone()
    later[0, -1] = 99
    with torch.no_grad():
        a = model(base, output_router_logits=True)
        b = model(later, output_router_logits=True)
    assert (a.logits - b.logits).abs().amax(-1)[0, :-1].max() == 0
    # a different image changes the route (one decision per sequence, from its image context)
    other_image = mmu_ids(c, TEXT, seed=5)
    with torch.no_grad():
        route_a = model.model(base, output_sequence_router_logits=True).sequence_router_logits
        route_c = model.model(other_image, output_sequence_router_logits=True).sequence_router_logits
    assert len(route_a) == c.text_config.num_hidden_layers and route_a[0].shape == (1, 2 * c.moe_config.num_sequence_experts)
    assert not torch.equal(route_a[0], route_c[0])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_matters(tiny_model, tiny_config, side):
    c = tiny_config
    short = mmu_ids(c, TEXT[:2])
    long = mmu_ids(c, TEXT, seed=1)
    pad = long.shape[1] - short.shape[1]
    pad_ids = torch.full((1, pad), c.pad_token_id)
    padded = torch.cat([pad_ids, short], 1) if side == "left" else torch.cat([short, pad_ids], 1)
    mask = torch.ones_like(padded)
    if side == "left":
        mask[0, :pad] = 0
    else:
        mask[0, -pad:] = 0
    batch = torch.cat([padded, long])
    batch_mask = torch.cat([mask, torch.ones_like(long)])
    out = logits(tiny_model, batch, attention_mask=batch_mask)
    real = slice(pad, None) if side == "left" else slice(0, short.shape[1])
    torch.testing.assert_close(out[0, real], logits(tiny_model, short)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], logits(tiny_model, long)[0], atol=1e-5, rtol=1e-5)

    # the pad token ids themselves are irrelevant: any id under mask 0 gives the same real outputs
    other = batch.clone()
    other[0][mask[0] == 0] = 7
    torch.testing.assert_close(logits(tiny_model, other, attention_mask=batch_mask)[0, real], out[0, real])


def test_left_padded_generate_matches_single_runs(tiny_model, tiny_config):
    c = tiny_config
    prompts = [mmu_ids(c, TEXT[:1]), mmu_ids(c, TEXT, seed=3)]
    width = max(p.shape[1] for p in prompts)
    ids = torch.stack([torch.cat([torch.full((width - p.shape[1],), c.pad_token_id), p[0]]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - p.shape[1]), torch.ones(p.shape[1])]) for p in prompts]).long()
    batched = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for row, prompt in enumerate(prompts):
        single = tiny_model.generate(prompt, max_new_tokens=5, do_sample=False)
        assert batched[row, width:].tolist() == single[0, prompt.shape[1]:].tolist()


def test_generate_with_cache_equals_without(tiny_model, tiny_config):
    ids = mmu_ids(tiny_config, TEXT)
    with_cache = tiny_model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    without = tiny_model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert with_cache.tolist() == without.tolist()


def test_task_group_is_remembered_through_the_cache(tiny_model, tiny_config):
    ids = t2i_ids(tiny_config, TEXT)
    with torch.no_grad():
        out = tiny_model.model(ids[:, :-3], use_cache=True)
        assert out.task_ids.tolist() == [1]
        step = tiny_model.model(ids[:, -3:-2], past_key_values=out.past_key_values, use_cache=True)
    assert step.task_ids.tolist() == [1]


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config):
    config = UniF2aceConfig.tiny()
    ids = torch.cat([mmu_ids(config, TEXT), mmu_ids(config, TEXT, seed=2)])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = UniF2aceForConditionalGeneration(config).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_labels_give_shifted_next_token_loss(tiny_model, tiny_config):
    ids = mmu_ids(tiny_config, TEXT)
    labels = ids.clone()
    labels[:, : -len(TEXT)] = -100
    out = tiny_model(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def losses_and_gradients(model, batch, **kwargs):
    """(outputs, {parameter name: gradient}) of one backward pass of `outputs.loss`."""
    model.zero_grad()
    out = model(**batch, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_skip_logits_gives_the_same_loss_and_gradients(tiny_config):
    torch.manual_seed(0)
    model = UniF2aceForConditionalGeneration(tiny_config)
    ids = torch.cat([mmu_ids(tiny_config, TEXT), mmu_ids(tiny_config, TEXT, seed=2)])
    labels = ids.clone()
    labels[:, : -len(TEXT)] = -100
    labels[1, -2:] = -100  # rows with different numbers of labelled positions
    batch = {"input_ids": ids, "labels": labels, "output_router_logits": True}
    full, full_grads = losses_and_gradients(model, batch)
    skipped, skipped_grads = losses_and_gradients(model, batch, skip_logits=True)
    assert full.logits is not None and skipped.logits is None
    torch.testing.assert_close(skipped.text_loss, full.text_loss)
    torch.testing.assert_close(skipped.loss, full.loss)
    assert skipped_grads.keys() == full_grads.keys() and "lm_head.weight" in full_grads
    for name in full_grads:
        torch.testing.assert_close(skipped_grads[name], full_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_router_aux_loss_is_added_when_requested(tiny_model, tiny_config):
    ids = mmu_ids(tiny_config, TEXT)
    plain = tiny_model(ids, labels=ids)
    with_aux = tiny_model(ids, labels=ids, output_router_logits=True)
    assert plain.aux_loss is None and with_aux.aux_loss is not None
    assert len(with_aux.router_logits) == tiny_config.text_config.num_hidden_layers
    torch.testing.assert_close(with_aux.loss, plain.loss + tiny_config.router_aux_loss_coef * with_aux.aux_loss)


def test_ids_outside_the_vocabulary_are_rejected(tiny_model, tiny_config):
    ids = mmu_ids(tiny_config, TEXT)
    ids[0, -1] = tiny_config.vocab_size
    with pytest.raises(ValueError, match="outside the unified vocabulary"):
        tiny_model(ids)
    ids[0, -1] = -3
    with pytest.raises(ValueError, match="outside the unified vocabulary"):
        tiny_model(ids)


def test_wrong_attention_mask_shape_is_rejected(tiny_model, tiny_config):
    ids = mmu_ids(tiny_config, TEXT)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        tiny_model(ids, attention_mask=torch.ones(1, ids.shape[1] + 1, dtype=torch.long))


def test_input_ids_and_embeds_are_exclusive(tiny_model, tiny_config):
    ids = mmu_ids(tiny_config, TEXT)
    with pytest.raises(ValueError, match="exactly one"):
        tiny_model(ids, inputs_embeds=tiny_model.get_input_embeddings()(ids))
    # embeddings carry no image spans (no omni blocks, no image-context routing): compare on the causal prefix of a
    # model without the sequence-level MoE
    config = UniF2aceConfig.tiny(moe_config=dict(sequence_moe=False))
    model = UniF2aceForConditionalGeneration(config).eval()
    embeds_out = model(inputs_embeds=model.get_input_embeddings()(ids), task_ids=torch.tensor([0])).logits
    torch.testing.assert_close(embeds_out[:, :2], logits(model, ids)[:, :2])


def test_base_model_returns_hidden_states(tiny_config):
    model = UniF2aceModel(tiny_config).eval()
    out = model(mmu_ids(tiny_config, TEXT), output_hidden_states=True)
    assert out.last_hidden_state.shape[-1] == tiny_config.text_config.hidden_size
    assert len(out.hidden_states) == tiny_config.text_config.num_hidden_layers + 1


def test_resizing_the_unified_vocabulary_is_refused(tiny_model, tiny_config):
    assert tiny_model.resize_token_embeddings(tiny_config.vocab_size).num_embeddings == tiny_config.vocab_size
    with pytest.raises(ValueError, match="laid out by the config"):
        tiny_model.resize_token_embeddings(tiny_config.vocab_size + 10)


def test_inputs_embeds_route_causally_and_generate(tiny_config):
    torch.manual_seed(0)
    model = UniF2aceForConditionalGeneration(UniF2aceConfig.tiny(moe_config=dict(token_moe=False))).eval()
    embeds = model.get_input_embeddings()(torch.tensor([[tiny_config.mmu_token_id, 5, 6, 7, 8]]))
    changed = embeds.clone()
    changed[0, -1] += 1.0
    with torch.no_grad():
        a = model(inputs_embeds=embeds, task_ids=torch.tensor([0])).logits
        b = model(inputs_embeds=changed, task_ids=torch.tensor([0])).logits
    assert (a - b)[0, :-1].abs().max() == 0
    out = model.generate(inputs_embeds=embeds, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 3)


def test_default_end_of_text_id_follows_the_text_range():
    assert UniF2aceConfig().bos_token_id == 50256
    small = UniF2aceConfig.tiny(bos_token_id=None, eos_token_id=None)
    assert small.bos_token_id == small.eos_token_id == 0
