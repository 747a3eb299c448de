"""Length-grouped batches in random order for the Trainer: records of similar length share a batch, and the batches
come shuffled.

transformers' `LengthGroupedSampler` sorts each mega-batch (50 batches) by length and keeps that order, so with two
kinds of records of different lengths — T2I captions (~290 tokens with the image) and 10-question conversations
(~450) — training sees a run of ~15 steps of one kind, then ~35 of the other (the embedded model's recipe, README).
This sampler groups the same way, then shuffles the batches. Given the records' kinds it groups each kind apart and
interleaves the kinds' batches evenly, so that consecutive micro-batches (one optimizer step under gradient
accumulation) hold different tasks (SPEC §4: MMU and T2I mixed in one step) without padding captions to the length of
conversations.
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

    With `kinds` (a label per record, e.g. "t2i" / "mmu"), every batch holds one kind: each kind is grouped and
    shuffled as above, and the kinds' full batches are interleaved evenly in proportion to their numbers (equal
    numbers alternate, in sorted label order); the partial batches' records come last.
    """

    def __init__(self, batch_size: int, lengths: Sequence[int], mega_batch_mult: int = 50, seed: int = 0,
                 kinds: Sequence[str] | None = None):
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError(f"batch_size and mega_batch_mult must be >= 1, got {batch_size} and {mega_batch_mult}")
        if kinds is not None and len(kinds) != len(lengths):
            raise ValueError(f"kinds has {len(kinds)} labels for {len(lengths)} records")
        self.batch_size = batch_size
        self.lengths = list(lengths)
        self.kinds = None if kinds is None else list(kinds)
        self.mega_batch_mult = mega_batch_mult
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at every epoch start."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def _shuffled_batches(self, indices: list[int], generator: torch.Generator) -> tuple[list[list[int]], list[int]]:
        """`indices` as shuffled length-grouped full batches, and the leftover partial batch (maybe empty)."""
        permutation = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        mega_size = self.mega_batch_mult * self.batch_size
        batches = []
        for start in range(0, len(permutation), mega_size):
            mega = sorted(permutation[start:start + mega_size], key=self.lengths.__getitem__, reverse=True)
            batches += [mega[i:i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
        partial = batches.pop() if batches and len(batches[-1]) < self.batch_size else []
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order], partial

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.kinds is None:
            groups = [list(range(len(self.lengths)))]
        else:
            groups = [[i for i, kind in enumerate(self.kinds) if kind == label] for label in sorted(set(self.kinds))]
        batches, partial = [], []
        for group_index, group in enumerate(groups):
            full, rest = self._shuffled_batches(group, generator)
            # batch j of a kind with n batches sits at (j + 0.5) / n of the epoch: the kinds spread evenly
            batches += [((j + 0.5) / len(full), group_index, batch) for j, batch in enumerate(full)]
            partial += rest
        return iter([index for *_, batch in sorted(batches, key=lambda item: item[:2]) for index in batch] + partial)


__all__ = ["ShuffledLengthGroupedSampler"]
