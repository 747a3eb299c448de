"""Tests of the UniF²ace tokenizer builders: ids match the config's unified vocabulary, text round trips, save/load."""

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, TokenizersBackend

from transformers_f2ace.configuration_unif2ace import UniF2aceConfig
from transformers_f2ace.tokenization_unif2ace import (
    check_tokenizer_matches_config,
    tokenizer_from_pretrained_text_tokenizer,
    train_unif2ace_tokenizer,
)


CORPUS = [
    "A young woman with long wavy blonde hair, blue eyes and a gentle smile.",
    "This man has a thick black beard, short curly hair and wears round glasses.",
    "She looks surprised; her eyebrows are raised and her mouth is slightly open.",
    "An elderly man with grey sideburns, a bald head and a neutral expression.",
] * 5
TEXTS = [
    "a woman with long blonde hair",
    "A man with a beard, smiling!",
    "  leading spaces and\ttabs\nnewlines  ",
    "unicode: café, naïve, 日本語, emoji 😀",
    "",
]
SPECIALS = ["<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>", "<|t2i|>", "<|mmu|>", "<|t2v|>", "<|v2v|>", "<|lvg|>", "[PAD]"]


@pytest.fixture(scope="module")
def config():
    return UniF2aceConfig.tiny()


@pytest.fixture(scope="module")
def tokenizer(config):
    return train_unif2ace_tokenizer(CORPUS, config)


def test_trained_tokenizer_ids_follow_the_layout(tokenizer, config):
    # tiny: 1000 text ids, then 10 special tokens, 16 image codes, [MASK]
    assert len(tokenizer) == 1000 + 10 + 16 + 1 == config.vocab_size
    assert tokenizer.vocab_size == 1000  # the BPE vocabulary alone fills the text range
    for i, token in enumerate(SPECIALS):
        assert tokenizer.convert_tokens_to_ids(token) == 1000 + i
    for code in (0, 7, 15):
        assert tokenizer.convert_tokens_to_ids(f"<|img_{code}|>") == 1010 + code
    assert tokenizer.convert_ids_to_tokens(1026) == "[MASK]"
    assert tokenizer.mask_token_id == tokenizer.image_token_id == config.mask_token_id == 1026
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == 0
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == config.pad_token_id == 1009
    assert tokenizer.boi_token_id == config.soi_token_id and tokenizer.eoi_token_id == config.eoi_token_id
    check_tokenizer_matches_config(tokenizer, config)


@pytest.mark.parametrize("text", TEXTS)
def test_text_round_trips_and_stays_in_the_text_range(tokenizer, config, text):
    ids = tokenizer(text).input_ids
    assert all(0 <= i < config.text_vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_placeholders_fill_the_text_range_and_ordinary_text_never_produces_them(tokenizer, config):
    # the corpus is far too small for 1000 BPE entries: the top text ids are placeholders (special tokens, so they
    # are atomic and skipped when decoding, like every other reserved token)
    last_text = tokenizer.convert_ids_to_tokens(config.text_vocab_size - 1)
    assert last_text.startswith("<|unused_")
    assert tokenizer(last_text, add_special_tokens=False).input_ids == [config.text_vocab_size - 1]
    placeholder_ids = {i for i in range(config.text_vocab_size)
                       if tokenizer.convert_ids_to_tokens(i).startswith("<|unused_")}
    ordinary = tokenizer("unused <| |> 1234 the quick brown fox, éàü!", add_special_tokens=False).input_ids
    assert placeholder_ids and not placeholder_ids.intersection(ordinary)


def test_special_and_image_tokens_are_atomic(tokenizer, config):
    ids = tokenizer("<|mmu|><|soi|><|img_3|>[MASK]<|eoi|>hello").input_ids
    assert ids[:5] == [config.mmu_token_id, config.soi_token_id, config.image_token_offset + 3, config.mask_token_id,
                       config.eoi_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello"


def test_end_of_text_can_sit_at_any_text_id():
    config = UniF2aceConfig.tiny(bos_token_id=500, eos_token_id=500)
    tokenizer = train_unif2ace_tokenizer(CORPUS, config)
    assert tokenizer.convert_ids_to_tokens(500) == "<|endoftext|>"
    assert tokenizer("<|endoftext|>").input_ids == [500]
    assert tokenizer.vocab_size == 1000
    check_tokenizer_matches_config(tokenizer, config)


def test_save_and_auto_load_round_trip(tokenizer, config, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    check_tokenizer_matches_config(loaded, config)
    assert len(loaded) == len(tokenizer)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    for text in TEXTS + ["<|t2i|>a face<|soi|>[MASK][MASK]<|eoi|>"]:
        assert loaded(text).input_ids == tokenizer(text).input_ids
    assert (loaded.mask_token, loaded.image_token, loaded.pad_token) == ("[MASK]", "[MASK]", "[PAD]")


def test_paper_size_layout_has_58498_entries():
    # SPEC §1: Phi-1.5 text (50,295) + 10 special + 8,192 codes + [MASK] = 58,498; <|endoftext|> at 50256
    config = UniF2aceConfig.tiny(text_vocab_size=50295, bos_token_id=50256, eos_token_id=50256,
                                 vq_config=dict(codebook_bits=13))
    tokenizer = train_unif2ace_tokenizer(CORPUS, config)
    assert len(tokenizer) == 58498
    assert tokenizer.convert_tokens_to_ids("<|soi|>") == 50295
    assert tokenizer.convert_tokens_to_ids("<|img_0|>") == 50305
    assert tokenizer.convert_tokens_to_ids("<|img_8191|>") == 58496
    assert tokenizer.convert_tokens_to_ids("[MASK]") == 58497
    assert tokenizer.convert_ids_to_tokens(50256) == "<|endoftext|>"


def test_training_rejects_bad_layouts():
    with pytest.raises(ValueError, match="at least 257"):
        train_unif2ace_tokenizer(CORPUS, UniF2aceConfig.tiny(text_vocab_size=200))
    with pytest.raises(ValueError, match="must be equal"):
        train_unif2ace_tokenizer(CORPUS, UniF2aceConfig.tiny(bos_token_id=0, eos_token_id=1))


# ----- a pretrained ("Phi-like") text tokenizer -----
PHI_WHITESPACE = ["  ", "   ", "    "]  # Phi-1.5 appends whitespace runs as (non-special) added tokens


@pytest.fixture(scope="module")
def fake_phi(tmp_path_factory):
    """A 300-entry byte-level BPE with <|endoftext|> at 0 and 3 added whitespace tokens, saved as a folder."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    backend.add_tokens([AddedToken(token, normalized=False) for token in PHI_WHITESPACE])
    tokenizer = TokenizersBackend(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    folder = tmp_path_factory.mktemp("fake_phi")
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


def test_pretrained_text_tokenizer_keeps_its_ids_and_is_padded(fake_phi, config):
    folder, base = fake_phi
    base_size = len(base)
    assert base_size == 303
    tokenizer = tokenizer_from_pretrained_text_tokenizer(folder, config)
    check_tokenizer_matches_config(tokenizer, config)
    assert len(tokenizer) == config.vocab_size
    for text in TEXTS:
        assert tokenizer(text).input_ids == base(text).input_ids
        assert tokenizer.decode(tokenizer(text).input_ids) == text
    for token in PHI_WHITESPACE:
        assert tokenizer.convert_tokens_to_ids(token) == base.convert_tokens_to_ids(token)
    padding = tokenizer.convert_ids_to_tokens(list(range(base_size, config.text_vocab_size)))
    assert padding == [f"<|unused_{k}|>" for k in range(config.text_vocab_size - base_size)]
    assert tokenizer.bos_token_id == 0 and tokenizer.pad_token_id == config.pad_token_id


def test_pretrained_text_tokenizer_accepts_objects_and_leaves_them_unchanged(fake_phi, config):
    folder, base = fake_phi
    from_folder = tokenizer_from_pretrained_text_tokenizer(folder, config)
    for source in (base, base.backend_tokenizer):
        built = tokenizer_from_pretrained_text_tokenizer(source, config)
        assert built.get_vocab() == from_folder.get_vocab()
    assert len(base) == 303


def test_pretrained_text_tokenizer_rejects_misfits(fake_phi):
    folder, _ = fake_phi
    with pytest.raises(ValueError, match="303 entries but config.text_vocab_size is 290"):
        tokenizer_from_pretrained_text_tokenizer(folder, UniF2aceConfig.tiny(text_vocab_size=290))
    with pytest.raises(ValueError, match="not a token of the base tokenizer"):
        tokenizer_from_pretrained_text_tokenizer(folder, UniF2aceConfig.tiny(bos_token_id=600, eos_token_id=600))
    with pytest.raises(ValueError, match="must be a folder"):
        tokenizer_from_pretrained_text_tokenizer(42, UniF2aceConfig.tiny())


# ----- the checker -----
def test_check_names_the_first_mismatch(tokenizer):
    swapped = list(SPECIALS)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(ValueError, match=r"'<\|eoi\|>' has id 1001 in the tokenizer but 1000 in the config"):
        check_tokenizer_matches_config(tokenizer, UniF2aceConfig.tiny(special_tokens=swapped))
    with pytest.raises(ValueError, match="1027 tokens but the config's unified vocabulary has 1043"):
        check_tokenizer_matches_config(tokenizer, UniF2aceConfig.tiny(vq_config=dict(codebook_bits=5)))
    with pytest.raises(ValueError, match="bos_token_id is 0 but config.bos_token_id is 3"):
        check_tokenizer_matches_config(tokenizer, UniF2aceConfig.tiny(bos_token_id=3, eos_token_id=3))


def test_placeholder_tokens_are_skipped_when_decoding():
    from transformers_f2ace import UniF2aceConfig
    from transformers_f2ace.tokenization_unif2ace import train_unif2ace_tokenizer

    config = UniF2aceConfig.tiny()
    tokenizer = train_unif2ace_tokenizer(["a tiny corpus"], config)
    placeholder = tokenizer.convert_tokens_to_ids("<|unused_0|>")
    assert 0 < placeholder < config.text_vocab_size
    hello = tokenizer("a tiny", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode([placeholder, *hello, placeholder + 1], skip_special_tokens=True) == "a tiny"
