"""Length-grouped batches in random order for the Trainer: records of similar length share a batch, and the batches
come shuffled.

transformers' `LengthGroupedSampler` sorts each mega-batch (50 batches) by length and keeps that order, so with two
kinds of records of different lengths — T2I captions (~290 tokens with the image) and 10-question conversations
(~450) — training sees a run of ~15 steps of one kind, then ~35 of the other (the embedded model's recipe, README).
This sampler groups the same way, then shuffles the batches.
"""

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class ShuffledLengthGroupedSampler(Sampler[int]):
    """Indices for batches of `batch_size` records of similar length, in random batch order.

    A random permutation of the records is cut into mega-batches of `mega_batch_mult * batch_size`, each sorted by
    `lengths` (longest first) and cut into batches; the full batches of the epoch are then shuffled and the one
    partial batch (when `len(lengths)` is not a multiple of `batch_size`) comes last, so that consecutive slices of
    `batch_size` indices are exactly the grouped batches. The order depends only on `seed` and the epoch the Trainer
    sets (`set_epoch`), not on the global RNG: a run resumed mid-epoch, in any epoch, sees the batches of an
    uninterrupted one.
    """

    def __init__(self, batch_size: int, lengths: Sequence[int], mega_batch_mult: int = 50, seed: int = 0):
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError(f"batch_size and mega_batch_mult must be >= 1, got {batch_size} and {mega_batch_mult}")
        self.batch_size = batch_size
        self.lengths = list(lengths)
        self.mega_batch_mult = mega_batch_mult
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at every epoch start."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        permutation = torch.randperm(len(self.lengths), generator=generator).tolist()
        mega_size = self.mega_batch_mult * self.batch_size
        batches = []
        for start in range(0, len(permutation), mega_size):
            mega = sorted(permutation[start:start + mega_size], key=self.lengths.__getitem__, reverse=True)
            batches += [mega[i:i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
        partial = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        order = torch.randperm(len(batches), generator=generator).tolist()
        return iter([index for batch in [batches[i] for i in order] + partial for index in batch])


__all__ = ["ShuffledLengthGroupedSampler"]
