"""The order in which an epoch visits a dataset, resumable from inside the epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """A random permutation of ``range(num_items)`` per epoch, drawn from ``generator``, that can skip a prefix.

    The permutation is the one ``torch.utils.data.RandomSampler`` draws from the same generator state, so
    reseeding the generator from ``(seed, epoch)`` fixes the epoch's order. After a checkpoint inside an epoch,
    :meth:`skip` makes the next pass start where the checkpoint left off — the same items in the same
    batches, without reading the skipped ones.

    Args:
        num_items: dataset size.
        generator: the generator the permutation is drawn from (the DataLoader's, reseeded every epoch).
    """

    def __init__(self, num_items: int, generator: torch.Generator) -> None:
        self.num_items = num_items
        self.generator = generator
        self._skip = 0

    def skip(self, items: int) -> None:
        """Leave out the first ``items`` positions of the next pass only."""
        if not 0 <= items <= self.num_items:
            raise ValueError(f"cannot skip {items} of {self.num_items} items")
        self._skip = items

    def __iter__(self) -> Iterator[int]:
        start, self._skip = self._skip, 0
        yield from torch.randperm(self.num_items, generator=self.generator).tolist()[start:]

    def __len__(self) -> int:
        return self.num_items
