"""UniF2aceConfig: the unified vocabulary layout, validation with named fields, presets, serialisation."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError

from transformers_f2ace import UniF2aceConfig, UniF2aceForConditionalGeneration


def test_paper_size_vocabulary_matches_show_o():
    config = UniF2aceConfig()
    # SPEC §1: 50,295 text + 10 special + 8,192 image codes + 1 mask = 58,498
    assert config.vocab_size == 58498
    assert config.text_config.vocab_size == 58498
    assert config.mask_token_id == 58497 == config.image_token_id
    assert config.soi_token_id == 50295 and config.pad_token_id == 50304
    assert config.image_token_offset == 50305
    assert config.num_image_tokens == 256  # 256 px / 16
    assert config.special_token_id("<|t2i|>") == 50295 + 4


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(text_config=dict(num_attention_heads=5)), "num_attention_heads"),
        (dict(text_config=dict(block_style="diagonal")), "block_style"),
        (dict(text_config=dict(resid_pdrop=1.5)), "resid_pdrop"),
        (dict(moe_config=dict(num_experts_per_tok=9)), "num_experts_per_tok"),
        (dict(moe_config=dict(mmu_sequence_experts=["copy", "copy", "clip", "laser"])), "mmu_sequence_experts"),
        (dict(moe_config=dict(t2i_sequence_experts=["copy", "zero"])), "t2i_sequence_experts"),
        (dict(moe_config=dict(num_sequence_experts_per_seq=5)), "num_sequence_experts_per_seq"),
        (dict(vq_config=dict(resolution=30)), "resolution"),
        (dict(identity_config=dict(layers=[1, 1])), "layers"),
        (dict(special_tokens=["<|soi|>", "<|eoi|>"]), "special_tokens"),
        (dict(bos_token_id=10**6), "bos_token_id"),
        (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef"),
        (dict(text_config=dict(max_position_embeddings=8)), "max_position_embeddings"),
    ],
)
def test_impossible_values_are_rejected_naming_the_field(overrides, field):
    with pytest.raises((ValueError, TypeError, StrictDataclassClassValidationError, StrictDataclassFieldValidationError)) as error:
        UniF2aceConfig.tiny(**overrides)
    assert field in str(error.value)


def test_wrong_types_are_rejected():
    with pytest.raises((StrictDataclassClassValidationError, StrictDataclassFieldValidationError, TypeError, ValueError)):
        UniF2aceConfig.tiny(text_vocab_size="many")


def test_dict_round_trip_keeps_every_field():
    config = UniF2aceConfig.small(text_config=dict(block_style="parallel"), moe_config=dict(norm_topk_prob=True))
    again = UniF2aceConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert again.text_config.block_style == "parallel" and again.moe_config.norm_topk_prob


def test_presets_build_working_models():
    for preset in (UniF2aceConfig.tiny, UniF2aceConfig.small):
        config = preset()
        model = UniF2aceForConditionalGeneration(config).eval()
        ids = torch.tensor([[config.mmu_token_id, config.bos_token_id, 5, 6]])
        assert model(ids).logits.shape == (1, 4, config.vocab_size)


def test_paper_size_model_instantiates_on_meta_and_counts_about_1_8b():
    with torch.device("meta"):
        model = UniF2aceForConditionalGeneration(UniF2aceConfig())
    counts = model.parameter_counts()
    # SPEC §3.1: ≈1.65B for the decoder with both token-MoE groups; ≈1.8B with routers and resamplers
    assert 1.55e9 < counts["decoder"] < 1.75e9, counts
    assert 1.7e9 < counts["total_without_frozen"] < 1.95e9, counts
