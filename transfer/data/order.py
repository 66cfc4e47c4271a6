"""The order in which an epoch visits a dataset, resumable from inside the epoch, and split across ranks."""

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

    Under torchrun every rank draws the *same* permutation (the generator is seeded from ``(seed, epoch)``,
    not from the rank) and takes slice ``rank`` of each global batch of ``batch_size · world_size`` items:
    the ranks' batches of step ``b`` together are exactly the single-process batch ``b``. Only complete
    global batches are visited (the single-process loader drops its last partial batch too), so every rank
    runs the same number of steps. :meth:`skip` counts positions of this rank's own stream.

    Args:
        num_items: dataset size.
        generator: the generator the permutation is drawn from (the DataLoader's, reseeded every epoch).
        rank, world_size: this process's slice of every global batch (default: the whole permutation).
        batch_size: items per rank and step (needed when ``world_size`` > 1).
    """

    def __init__(self, num_items: int, generator: torch.Generator, *, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_items = num_items
        self.generator = generator
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self._skip = 0

    def skip(self, items: int) -> None:
        """Leave out the first ``items`` positions of the next pass only."""
        if not 0 <= items <= len(self):
            raise ValueError(f"cannot skip {items} of {len(self)} items")
        self._skip = items

    def __iter__(self) -> Iterator[int]:
        start, self._skip = self._skip, 0
        order = torch.randperm(self.num_items, generator=self.generator)
        if self.world_size > 1:
            steps = len(self) // self.batch_size
            order = order[:steps * self.batch_size * self.world_size].view(steps, self.world_size, self.batch_size)
            order = order[:, self.rank].reshape(-1)
        yield from order.tolist()[start:]

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.num_items
        return self.num_items // (self.batch_size * self.world_size) * self.batch_size


class ShardSampler(Sampler[int]):
    """Items ``rank, rank + world_size, …`` in order: this rank's share of an evaluation pass.

    Shards differ in size by at most one item and never overlap, so summing per-rank counts across ranks
    gives exactly the single-process totals.
    """

    def __init__(self, num_items: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, num_items, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
