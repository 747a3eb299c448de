"""Training utilities: the mixed MMU + T2I collator and Trainer, the VQ tokenizer's training loop, the semantic
encoder's attribute pretraining.

Exports load lazily, so that importing one utility does not import `transformers.Trainer`.
"""

import importlib


_EXPORTS = {
    "UniF2aceDataCollator": ".collator",
    "StepSeededCollator": ".collator",
    "UniF2aceTrainer": ".trainer",
    "StepSeedCallback": ".trainer",
    "ShuffledLengthGroupedSampler": ".sampler",
    "train_semantic_encoder": ".semantic",
    "probe_accuracy": ".semantic",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
