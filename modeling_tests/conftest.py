"""Shared fixtures: tiny UniF²ace configs/models and helpers that build well-formed unified-vocabulary inputs."""

import os
import textwrap

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transformers_f2ace  # noqa: E402, F401  (registers the Auto classes)
from transformers_f2ace import UniF2aceConfig, UniF2aceForConditionalGeneration  # noqa: E402


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The sequence-level options of the embedded model's preset (`UniF2aceConfig.small`), for tiny models.
UNDERSTANDING_OPTIONS = {
    key: UniF2aceConfig.small().moe_config.to_dict()[key]
    for key in ("resampler_type", "mmu_fixed_sequence_route", "feature_gate_bias")
}

# Prepended to scripts run in a subprocess that must behave as if transformers_f2ace were not installed.
BLOCK_PACKAGE = textwrap.dedent(
    """
    import sys, importlib.abc

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "transformers_f2ace":
                raise ImportError("transformers_f2ace is blocked in this interpreter")

    sys.meta_path.insert(0, Block())
    sys.path = [p for p in sys.path if not p.rstrip("/").endswith("src")]
    """
)


@pytest.fixture
def tiny_config() -> UniF2aceConfig:
    return UniF2aceConfig.tiny()


@pytest.fixture
def tiny_model(tiny_config) -> UniF2aceForConditionalGeneration:
    torch.manual_seed(0)
    return UniF2aceForConditionalGeneration(tiny_config).eval()


def mmu_ids(config: UniF2aceConfig, text: list[int], codes: list[int] | None = None, seed: int = 0) -> torch.Tensor:
    """`<|mmu|> <|soi|> img… <|eoi|> text…` as (1, T) ids; random image codes unless given."""
    if codes is None:
        generator = torch.Generator().manual_seed(seed)
        codes = torch.randint(0, config.codebook_size, (config.num_image_tokens,), generator=generator).tolist()
    image = [config.image_token_offset + c for c in codes]
    return torch.tensor([[config.mmu_token_id, config.soi_token_id, *image, config.eoi_token_id, *text]])


def t2i_ids(config: UniF2aceConfig, text: list[int], codes: list[int] | None = None) -> torch.Tensor:
    """`<|t2i|> text… <|soi|> img… <|eoi|>` as (1, T) ids; all-[MASK] image unless codes are given."""
    image = [config.mask_token_id] * config.num_image_tokens if codes is None else [
        config.image_token_offset + c for c in codes
    ]
    return torch.tensor([[config.t2i_token_id, *text, config.soi_token_id, *image, config.eoi_token_id]])


CORPUS = [
    "a smiling woman with long red curly hair and round glasses",
    "a man with a short black beard, a moustache and a blue hat",
    "describe the face. is the person smiling? what colour is the hair?",
    "USER: ASSISTANT: yes no the person has brown eyes and wears earrings",
] * 8


@pytest.fixture
def tiny_processor(tiny_config):
    from transformers_f2ace import UniF2aceImageProcessor, UniF2aceProcessor
    from transformers_f2ace.tokenization_unif2ace import train_unif2ace_tokenizer

    tokenizer = train_unif2ace_tokenizer(CORPUS, tiny_config)
    image_processor = UniF2aceImageProcessor.from_model_config(tiny_config)
    return UniF2aceProcessor(image_processor, tokenizer, num_image_tokens=tiny_config.num_image_tokens)
