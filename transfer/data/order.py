"""The order in which an epoch visits a dataset, and the seed of every visit: resumable from inside the
epoch, split across ranks, and the same however many loader workers load the items."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from transfer.engine.runtime import derive_seed


class EpochSampler(Sampler[tuple[int, int]]):
    """A random permutation of ``range(num_items)`` per pass, drawn from ``generator``, that can skip a prefix.

    Each pass draws a *pass seed* (one int64) and then the permutation from ``generator``, and yields
    ``(index, pass_seed)`` pairs; :class:`SeededItems` turns a pair into the item, its randomness seeded from
    both. Reseeding the generator from ``(seed, epoch)`` (:meth:`reseed`, by the engine) thus fixes the epoch's
    order and every item's augmentation, whichever process or loader worker reads the item. The pass seed takes
    the place of the base seed that the DataLoader of earlier versions drew from this generator before each
    pass (``torch.randperm`` then drew the permutation, as here), so orders in the main process are unchanged.
    After a checkpoint inside an epoch, :meth:`skip` makes the next pass start where the checkpoint left off —
    the same items in the same batches, without reading the skipped ones.

    Under torchrun every rank draws the *same* permutation and pass seed (the generator is seeded from
    ``(seed, epoch)``, not from the rank) and takes slice ``rank`` of each global batch of
    ``batch_size · world_size`` items: the ranks' batches of step ``b`` together are exactly the
    single-process batch ``b``, each item augmented as in a single process. Only complete global batches are
    visited (the single-process loader drops its last partial batch too), so every rank runs the same number
    of steps. :meth:`skip` counts positions of this rank's own stream.

    Args:
        num_items: dataset size.
        generator: the generator the pass seeds and permutations are drawn from (owned by the sampler: a
            DataLoader must not draw from it).
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

    def reseed(self, seed: int) -> None:
        """Fix the next pass's order and pass seed (the engine calls it with the epoch's seed)."""
        self.generator.manual_seed(seed)

    def skip(self, items: int) -> None:
        """Leave out the first ``items`` positions of the next pass only."""
        if not 0 <= items <= len(self):
            raise ValueError(f"cannot skip {items} of {len(self)} items")
        self._skip = items

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self._skip = self._skip, 0
        pass_seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator))
        order = torch.randperm(self.num_items, generator=self.generator)
        if self.world_size > 1:
            steps = len(self) // self.batch_size
            order = order[:steps * self.batch_size * self.world_size].view(steps, self.world_size, self.batch_size)
            order = order[:, self.rank].reshape(-1)
        for index in order.tolist()[start:]:
            yield index, pass_seed

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.num_items
        return self.num_items // (self.batch_size * self.world_size) * self.batch_size


class SeededItems(Dataset):
    """``dataset[index]`` for the ``(index, pass_seed)`` keys of an :class:`EpochSampler`.

    With ``random_items`` the item is read with torch's CPU generator seeded from ``(pass_seed, index)``
    and put back afterwards: per-image augmentation (torchvision transforms draw from that generator) is a
    function of the epoch's seed and the sample index alone, not of the loader worker that reads the item
    or of what that worker read before, and reading items in the main process leaves its random state (the
    negatives' draws) untouched. Without ``random_items`` (deterministic items: batched augmentation draws
    on the training device) items are read as they are.

    Args:
        dataset: the map-style dataset to read.
        random_items: whether reading an item draws random numbers.
    """

    def __init__(self, dataset: Dataset, random_items: bool = True) -> None:
        self.dataset = dataset
        self.random_items = random_items

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, pass_seed = key
        if not self.random_items:
            return self.dataset[index]
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(derive_seed(pass_seed, index))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


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
