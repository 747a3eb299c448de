"""Text tokenizers whose ids line up with a [`UniF2aceConfig`]'s unified vocabulary.

The model embeds one vocabulary (see `configuration_unif2ace.py`):

    [0, text_vocab_size)                          byte-level BPE text tokens (`<|endoftext|>` at `bos_token_id`)
    text_vocab_size + i                           config.special_tokens[i]  (<|soi|> <|eoi|> ... [PAD])
    image_token_offset + c                        `<|img_c|>`, image code c of the VQ tokenizer
    vocab_size - 1                                `[MASK]` (also the image placeholder of MMU prompts)

The builders below return a plain `transformers` fast tokenizer ([`~transformers.TokenizersBackend`], which
`AutoTokenizer` saves and loads without custom code) holding all of these as tokens, so that
`tokenizer.convert_tokens_to_ids("<|img_5|>") == config.image_token_offset + 5` and `len(tokenizer) ==
config.vocab_size`. Every special, image-code, mask and placeholder token is a *special* added token: it is never
split, and `decode(..., skip_special_tokens=True)` drops it.

Placeholders: when the text tokenizer has fewer than `text_vocab_size` entries (a small training corpus, or a base
tokenizer smaller than the reserved range), the gap is filled with `<|unused_k|>` tokens that text never encodes to,
so that the ids of everything after the text range stay where the config puts them.
"""

import json
import os
from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TokenizersBackend

from .configuration_unif2ace import MASK_TOKEN, UniF2aceConfig


END_OF_TEXT_TOKEN = "<|endoftext|>"
IMAGE_TOKEN_TEMPLATE = "<|img_{}|>"
PLACEHOLDER_TOKEN_TEMPLATE = "<|unused_{}|>"


def image_code_token(code: int) -> str:
    """The token string of image code `code` (`<|img_{code}|>`)."""
    return IMAGE_TOKEN_TEMPLATE.format(code)


def expected_token_ids(config: UniF2aceConfig) -> dict[str, int]:
    """Every token above the text range with the id the config gives it: special tokens, image codes, `[MASK]`."""
    expected = {token: config.special_token_id(token) for token in config.special_tokens}
    expected.update(
        {image_code_token(code): config.image_token_offset + code for code in range(config.codebook_size)}
    )
    expected[MASK_TOKEN] = config.mask_token_id
    return expected


def _check_text_token_ids(config: UniF2aceConfig) -> None:
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(config, name)
        if value is None or not 0 <= value < config.text_vocab_size:
            raise ValueError(
                f"config.{name} must be a text token id in [0, {config.text_vocab_size}) (the id of "
                f"{END_OF_TEXT_TOKEN}), got {value!r}"
            )
    if config.bos_token_id != config.eos_token_id:
        raise ValueError(
            f"config.bos_token_id ({config.bos_token_id}) and eos_token_id ({config.eos_token_id}) must be equal: "
            f"both are {END_OF_TEXT_TOKEN}, as in Phi-1.5 / Show-o"
        )


def _add_unified_tokens(backend: Tokenizer, config: UniF2aceConfig) -> Tokenizer:
    """Append the special tokens, image-code tokens and `[MASK]` (in id order) to a text tokenizer that already has
    exactly `text_vocab_size` entries."""
    tokens = [token for token, _ in sorted(expected_token_ids(config).items(), key=lambda item: item[1])]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in tokens])
    return backend


def _wrap(backend: Tokenizer, config: UniF2aceConfig) -> TokenizersBackend:
    """Wrap the complete backend tokenizer with the named special tokens the config implies and check it."""
    named = {
        "bos_token": backend.id_to_token(config.bos_token_id),
        "eos_token": backend.id_to_token(config.eos_token_id),
        "pad_token": backend.id_to_token(config.pad_token_id),
        "mask_token": MASK_TOKEN,
        "image_token": backend.id_to_token(config.image_token_id),
        "boi_token": backend.id_to_token(config.soi_token_id),
        "eoi_token": backend.id_to_token(config.eoi_token_id),
    }
    tokenizer = TokenizersBackend(
        tokenizer_object=backend, model_max_length=config.text_config.max_position_embeddings, **named
    )
    check_tokenizer_matches_config(tokenizer, config)
    return tokenizer


def train_unif2ace_tokenizer(
    corpus: Iterable[str], config: UniF2aceConfig, min_frequency: int = 2
) -> TokenizersBackend:
    """
    Train a byte-level BPE on `corpus` and add the UniF²ace tokens, with ids matching `config`.

    The BPE vocabulary has exactly `config.text_vocab_size` entries: `<|endoftext|>` at `config.bos_token_id`
    (= `eos_token_id`), the 256 byte symbols and the learned merges in training order, and, if the corpus yields
    fewer merges than needed, `<|unused_k|>` placeholders (never produced by encoding) up to the last text id.

    Args:
        corpus: texts to learn merges from.
        config: gives `text_vocab_size`, the special tokens, the codebook size and the named token ids.
        min_frequency: minimum pair count for a merge.

    Returns:
        A `TokenizersBackend` with `len(tokenizer) == config.vocab_size`; bos/eos `<|endoftext|>`, pad at
        `config.pad_token_id` (`[PAD]`), mask and image token `[MASK]`.
    """
    _check_text_token_ids(config)
    num_bytes = len(pre_tokenizers.ByteLevel.alphabet())
    if config.text_vocab_size < num_bytes + 1:
        raise ValueError(
            f"config.text_vocab_size ({config.text_vocab_size}) must be at least {num_bytes + 1} for a byte-level BPE "
            f"({num_bytes} byte symbols + {END_OF_TEXT_TOKEN})"
        )
    trainer = trainers.BpeTrainer(
        vocab_size=config.text_vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator(corpus, trainer)

    # Re-lay the vocabulary: learned tokens in id order, placeholders to fill the text range, <|endoftext|> at bos.
    learned = sorted(trained.get_vocab(with_added_tokens=False).items(), key=lambda item: item[1])
    ordered = [token for token, _ in learned if token != END_OF_TEXT_TOKEN]
    placeholders = [PLACEHOLDER_TOKEN_TEMPLATE.format(k) for k in range(config.text_vocab_size - 1 - len(ordered))]
    ordered += placeholders
    ordered.insert(config.bos_token_id, END_OF_TEXT_TOKEN)
    merges = [tuple(pair) for pair in json.loads(trained.to_str())["model"]["merges"]]

    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(ordered)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # <|endoftext|> and the placeholders keep their vocabulary ids; as special tokens they are skipped when decoding
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in [END_OF_TEXT_TOKEN, *placeholders]]
    )
    return _wrap(_add_unified_tokens(backend, config), config)


def tokenizer_from_pretrained_text_tokenizer(
    path_or_tokenizer: str | os.PathLike | PreTrainedTokenizerBase | Tokenizer, config: UniF2aceConfig
) -> TokenizersBackend:
    """
    Extend a pretrained text tokenizer (e.g. the Phi-1.5 / Show-o folder with its `tokenizer.json`) with the
    UniF²ace tokens, with ids matching `config`.

    The base tokenizer keeps its ids (Phi-1.5: 50,257 BPE entries + 38 whitespace added tokens = 50,295 =
    `text_vocab_size`). A smaller base is padded with `<|unused_k|>` placeholders up to `text_vocab_size`.

    Args:
        path_or_tokenizer: a local folder loadable by `AutoTokenizer` (needs a fast tokenizer), a fast
            transformers tokenizer, or a `tokenizers.Tokenizer`. It is copied, never modified.
        config: gives `text_vocab_size`, the special tokens, the codebook size and the named token ids.

    Raises:
        ValueError: the base has more than `text_vocab_size` entries, has no fast backend, or the config's
            bos/eos ids fall outside its real tokens.
    """
    _check_text_token_ids(config)
    if isinstance(path_or_tokenizer, (str, os.PathLike)):
        path_or_tokenizer = AutoTokenizer.from_pretrained(path_or_tokenizer)
    if isinstance(path_or_tokenizer, Tokenizer):
        backend = Tokenizer.from_str(path_or_tokenizer.to_str())
    elif isinstance(path_or_tokenizer, PreTrainedTokenizerBase) and hasattr(path_or_tokenizer, "backend_tokenizer"):
        backend = Tokenizer.from_str(path_or_tokenizer.backend_tokenizer.to_str())
    else:
        raise ValueError(
            "path_or_tokenizer must be a folder with a tokenizer.json, a fast transformers tokenizer or a "
            f"tokenizers.Tokenizer, got {type(path_or_tokenizer).__name__}"
        )
    base_size = backend.get_vocab_size(with_added_tokens=True)
    if base_size > config.text_vocab_size:
        raise ValueError(
            f"the base tokenizer has {base_size} entries but config.text_vocab_size is {config.text_vocab_size}; "
            "raise text_vocab_size to at least the base size. (A folder that already holds a UniF2ace tokenizer "
            "loads with AutoTokenizer.from_pretrained; verify it with check_tokenizer_matches_config.)"
        )
    if backend.id_to_token(config.bos_token_id) is None or config.bos_token_id >= base_size:
        raise ValueError(
            f"config.bos_token_id / eos_token_id ({config.bos_token_id}) is not a token of the base tokenizer "
            f"({base_size} entries); set them to the id of its end-of-text token"
        )
    placeholders = [PLACEHOLDER_TOKEN_TEMPLATE.format(k) for k in range(config.text_vocab_size - base_size)]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in placeholders])
    return _wrap(_add_unified_tokens(backend, config), config)


def check_tokenizer_matches_config(tokenizer: PreTrainedTokenizerBase, config: UniF2aceConfig) -> None:
    """
    Check that `tokenizer` encodes the unified vocabulary exactly as `config` lays it out.

    Checks `len(tokenizer) == config.vocab_size`; every special token, image-code token and `[MASK]` maps to its
    config id and back; and the tokenizer's bos / eos / pad / mask ids equal the config's.

    Raises:
        ValueError: naming the first token whose id disagrees (or the size mismatch).
    """
    if len(tokenizer) != config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the config's unified vocabulary has {config.vocab_size} "
            f"(text {config.text_vocab_size} + special {len(config.special_tokens)} + image codes "
            f"{config.codebook_size} + [MASK])"
        )
    expected = expected_token_ids(config)
    tokens = list(expected)
    for token, token_id in zip(tokens, tokenizer.convert_tokens_to_ids(tokens)):
        if token_id != expected[token]:
            raise ValueError(f"token {token!r} has id {token_id} in the tokenizer but {expected[token]} in the config")
    by_id = {token_id: token for token, token_id in expected.items()}
    ids = list(by_id)
    for token_id, token in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        if token != by_id[token_id]:
            raise ValueError(f"id {token_id} is {token!r} in the tokenizer but {by_id[token_id]!r} in the config")
    named = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "mask_token_id": config.mask_token_id,
    }
    for name, config_id in named.items():
        if getattr(tokenizer, name) != config_id:
            raise ValueError(f"tokenizer.{name} is {getattr(tokenizer, name)} but config.{name} is {config_id}")


__all__ = [
    "check_tokenizer_matches_config",
    "expected_token_ids",
    "image_code_token",
    "tokenizer_from_pretrained_text_tokenizer",
    "train_unif2ace_tokenizer",
]
