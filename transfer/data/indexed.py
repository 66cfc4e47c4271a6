"""Subsets that keep the ``(image, target, index)`` contract, and a deterministic holdout split.

``torch.utils.data.Subset`` would pass the parent's index through, but a memory bank sized for the
subset must be addressed by the position *inside* the subset, so :class:`IndexedSubset` rewrites it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from transfer.errors import CKTFError


class IndexedSubset(Dataset):
    """The items ``indices`` of ``dataset``, returned as ``(image, target, i)`` with ``i`` in ``0..len-1``.

    ``targets``, ``classes``, ``num_classes``, ``in_channels`` and ``root`` mirror the parent,
    with ``targets`` restricted to the subset.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int] | torch.Tensor) -> None:
        self.dataset = dataset
        self.indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        n = len(dataset)  # type: ignore[arg-type]
        if len(self.indices) and (int(self.indices.min()) < 0 or int(self.indices.max()) >= n):
            raise ValueError(f"IndexedSubset indices must lie in 0..{n - 1}")
        self.targets = torch.as_tensor(dataset.targets, dtype=torch.long)[self.indices]
        self.classes = list(dataset.classes)
        self.num_classes = int(dataset.num_classes)
        self.in_channels = int(dataset.in_channels)
        self.root = getattr(dataset, "root", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        image, target, _ = self.dataset[int(self.indices[i])]
        return image, target, i


def holdout_split(num_items: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(num_items)`` into ``(kept, holdout)`` with ``round(fraction * num_items)`` held out.

    Uses ``random.Random(seed)`` (stable across Python versions and machines) so a validation
    split carved from a train set is the same on every run. Both lists are sorted.
    """
    if not isinstance(num_items, int) or num_items < 2:
        raise CKTFError(f"holdout split needs at least 2 items; got num_items={num_items!r}")
    if not 0.0 < fraction < 1.0:
        raise CKTFError(f"holdout fraction must be in (0, 1); got {fraction!r}")
    n_holdout = min(max(round(fraction * num_items), 1), num_items - 1)
    order = list(range(num_items))
    random.Random(seed).shuffle(order)
    return sorted(order[n_holdout:]), sorted(order[:n_holdout])
