"""Negative samplers: K memory-bank indices per anchor, drawn with batched tensor ops on the anchors' device.

Why: CRD's NCE loss scores every anchor against K (16384 by default) memory-bank rows. With labels
CRD excludes same-class rows; on an unlabeled target set we approximate that with the frozen
teacher's nearest neighbours (see :mod:`transfer.sampling.neighbours`):

* ``uniform``  - any item but the anchor, with replacement (CRD's default);
* ``debiased`` - any item but the anchor and its ``exclude`` nearest neighbours (likely false negatives);
* ``hard``     - like ``debiased``, but ``round(hard_fraction·K)`` negatives come from the neighbours
  ranked ``[exclude, exclude + hard_pool)``, just outside the excluded set.

Sampling is one ``torch.randint`` (plus one ``searchsorted``) per batch, never a Python loop, numpy
or dataset-worker work, so it costs the same on CPU and CUDA. ``generator=None`` uses torch's global
RNG, which the training engine reseeds every epoch from (seed, epoch), so a resumed run draws the
same negatives.

Distributed training: under torch.distributed each rank samples for its own anchors with its own
generator stream; the neighbour tables are identical on all ranks (built once and cached on disk by
key), so nothing here needs to change for DDP.

Example::

    sampler = build_sampler("debiased", num_items=len(ds), num_negatives=16384, neighbours=table, exclude=32)
    negatives = sampler(batch_indices.to(device))   # [B, 16384] int64 dataset indices
"""

from __future__ import annotations

import torch
from torch import nn

from transfer.errors import CKTFError

MODES: tuple[str, ...] = ("uniform", "debiased", "hard")


class NegativeSampler(nn.Module):
    """Draws K negative dataset indices per anchor, vectorised on the training device."""

    num_items: int
    num_negatives: int

    def __init__(self, num_items: int, num_negatives: int) -> None:
        super().__init__()
        if num_items < 2:
            raise CKTFError(f"negative sampling needs at least 2 items in the dataset, got N={num_items}")
        if num_negatives < 1:
            raise CKTFError(f"sampler.num_negatives: expected a positive number of negatives, got {num_negatives}")
        self.num_items = num_items
        self.num_negatives = num_negatives

    def forward(self, anchors: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``anchors`` [B] dataset indices -> [B, K] int64 negative indices on ``anchors.device``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"num_items={self.num_items}, num_negatives={self.num_negatives}"


def negatives_that_fit(allowed: int) -> int:
    """A number of negatives to suggest when ``allowed`` items can be drawn: the largest power of two below it."""
    return 1 << max(0, (allowed - 1).bit_length() - 1)


class UniformSampler(NegativeSampler):
    """Uniform over all items but the anchor, with replacement: CRD's sampler without labels."""

    def __init__(self, num_items: int, num_negatives: int) -> None:
        super().__init__(num_items, num_negatives)
        if num_negatives >= num_items:
            raise CKTFError(f"sampler.num_negatives (K={num_negatives}) must be smaller than the number of "
                            f"items N={num_items}; pass e.g. --sampler.num_negatives {negatives_that_fit(num_items)}")

    def forward(self, anchors: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        anchors = _check_anchors(anchors)
        r = torch.randint(0, self.num_items - 1, (anchors.shape[0], self.num_negatives), generator=generator,
                          device=anchors.device)
        return r + (r >= anchors.unsqueeze(1))  # skip the anchor: shift everything at or above it by one


class SharedUniformSampler(UniformSampler):
    """One set of K uniform negatives shared by the whole batch (MoCo-style), returned as [K].

    Scoring then costs one ``[B, d] x [d, K]`` GEMM per side instead of a GEMM against the whole bank, which is
    what makes many contrastive objectives cheap when the bank is much larger than K. The price: negatives are
    no longer independent per anchor, and an anchor's own index can appear among them with probability K/N
    (it then acts as one extra noise sample). Statistically close to per-anchor sampling; measure before
    relying on it.
    """

    def forward(self, anchors: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_anchors(anchors)
        return torch.randint(0, self.num_items, (self.num_negatives,), generator=generator, device=anchors.device)


class DebiasedSampler(NegativeSampler):
    """Uniform over all items but the anchor and its ``exclude`` nearest neighbours (exact, no rejection).

    With the excluded set E of a row sorted and ``e'_j = E_j - j`` (the number of allowed items below
    ``E_j``), the ``r``-th allowed item is ``r + #{j : e'_j <= r}``; so one ``randint`` over
    ``[0, N - |E|)`` and one ``searchsorted`` give exact uniform draws.
    """

    def __init__(self, num_items: int, num_negatives: int, neighbours: torch.Tensor, exclude: int = 32) -> None:
        super().__init__(num_items, num_negatives)
        neighbours = _check_table(neighbours, num_items)
        if exclude < 0:
            raise CKTFError(f"sampler.exclude: expected a non-negative number of neighbours to exclude, got {exclude}")
        if exclude > neighbours.shape[1]:
            raise CKTFError(f"sampler.k: the neighbour table has {neighbours.shape[1]} columns but "
                            f"sampler.exclude={exclude} needs at least {exclude}")
        allowed = num_items - exclude - 1
        if num_negatives >= allowed:
            raise CKTFError(f"sampler.num_negatives (K={num_negatives}) must be smaller than N - exclude - 1 = "
                            f"{allowed} (items left after excluding the anchor and its {exclude} nearest neighbours); "
                            f"pass e.g. --sampler.num_negatives {negatives_that_fit(allowed)}")
        self.exclude = exclude
        self.num_allowed = allowed
        dtype = torch.int32 if num_items <= torch.iinfo(torch.int32).max else torch.int64
        excluded = torch.cat([torch.arange(num_items).unsqueeze(1), neighbours[:, :exclude].cpu()], dim=1)
        excluded = excluded.sort(dim=1).values
        if (excluded.diff(dim=1) <= 0).any():
            raise ValueError("neighbour table rows must hold distinct indices other than the row's own")
        shifted = excluded - torch.arange(exclude + 1)
        self.register_buffer("shifted_excluded", shifted.to(dtype).contiguous(), persistent=False)

    def _draw(self, anchors: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
        shifted = self.shifted_excluded[anchors]
        r = torch.randint(0, self.num_allowed, (anchors.shape[0], count), generator=generator,
                          device=anchors.device, dtype=shifted.dtype)
        return torch.searchsorted(shifted, r, right=True).add_(r)  # int64 result

    def forward(self, anchors: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._draw(_check_anchors(anchors), self.num_negatives, generator)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, exclude={self.exclude}"


class HardSampler(DebiasedSampler):
    """``round(hard_fraction·K)`` negatives from the neighbours ranked ``[exclude, exclude + hard_pool)``,
    the rest as :class:`DebiasedSampler`; output columns are ``[hard..., debiased...]``.

    Why: items just outside the excluded top neighbours are close to the anchor but (hopefully) of
    another class: informative negatives that uniform sampling almost never picks.
    """

    def __init__(self, num_items: int, num_negatives: int, neighbours: torch.Tensor, exclude: int = 32,
                 hard_fraction: float = 0.1, hard_pool: int = 64) -> None:
        super().__init__(num_items, num_negatives, neighbours, exclude)
        if not 0.0 <= hard_fraction <= 1.0:
            raise CKTFError(f"sampler.hard_fraction: expected a fraction in [0, 1], got {hard_fraction}")
        if hard_pool < 1:
            raise CKTFError(f"sampler.hard_pool: expected a positive number of hard candidates, got {hard_pool}")
        if neighbours.shape[1] < exclude + hard_pool:
            raise CKTFError(f"sampler.hard_pool: the neighbour table has {neighbours.shape[1]} columns (sampler.k) "
                            f"but exclude + hard_pool = {exclude} + {hard_pool} needs sampler.k >= "
                            f"{exclude + hard_pool}")
        self.hard_fraction = hard_fraction
        self.hard_pool = hard_pool
        self.num_hard = round(hard_fraction * num_negatives)
        band = neighbours[:, exclude:exclude + hard_pool].cpu().to(self.shifted_excluded.dtype).contiguous()
        self.register_buffer("hard_band", band, persistent=False)

    def forward(self, anchors: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        anchors = _check_anchors(anchors)
        pick = torch.randint(0, self.hard_pool, (anchors.shape[0], self.num_hard), generator=generator,
                             device=anchors.device)
        hard = self.hard_band[anchors].gather(1, pick).long()
        return torch.cat([hard, self._draw(anchors, self.num_negatives - self.num_hard, generator)], dim=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hard_fraction={self.hard_fraction}, hard_pool={self.hard_pool}"


def build_sampler(
    kind: str,
    num_items: int,
    num_negatives: int,
    neighbours: torch.Tensor | None = None,
    *,
    exclude: int = 32,
    hard_fraction: float = 0.1,
    hard_pool: int = 64,
    shared: bool = False,
) -> NegativeSampler:
    """The sampler for mode ``kind`` (``uniform``, ``debiased``, ``hard``); the latter two need ``neighbours``.

    ``shared=True`` (uniform only) draws one set of K negatives for the whole batch.

    Example: ``build_sampler("hard", 100_000, 16384, table, exclude=32, hard_fraction=0.1, hard_pool=64)``
    """
    if kind not in MODES:
        raise CKTFError(f"sampler.kind: unknown mode {kind!r}; expected one of {', '.join(MODES)}")
    if shared and kind != "uniform":
        raise CKTFError(f"sampler.shared needs sampler.kind uniform: {kind} negatives depend on each anchor")
    if kind == "uniform":
        return SharedUniformSampler(num_items, num_negatives) if shared else UniformSampler(num_items, num_negatives)
    if neighbours is None:
        raise ValueError(f"sampler mode {kind!r} needs a neighbour table (see build_neighbour_table)")
    if kind == "debiased":
        return DebiasedSampler(num_items, num_negatives, neighbours, exclude)
    return HardSampler(num_items, num_negatives, neighbours, exclude, hard_fraction, hard_pool)


def _check_table(neighbours: torch.Tensor, num_items: int) -> torch.Tensor:
    if neighbours.dim() != 2 or neighbours.shape[0] != num_items:
        raise CKTFError(f"sampler neighbour table has shape {tuple(neighbours.shape)} but the dataset has "
                        f"{num_items} items (expected [{num_items}, k]); rebuild it for this dataset")
    if neighbours.dtype.is_floating_point or neighbours.dtype == torch.bool:
        raise ValueError(f"neighbour table must hold integer indices, got {neighbours.dtype}")
    if neighbours.numel() and (neighbours.min() < 0 or neighbours.max() >= num_items):
        raise ValueError(f"neighbour table indices must lie in [0, {num_items})")
    return neighbours.long()


def _check_anchors(anchors: torch.Tensor) -> torch.Tensor:
    if anchors.dim() != 1 or anchors.dtype.is_floating_point or anchors.dtype == torch.bool:
        raise ValueError(f"anchors must be a 1-D integer tensor of dataset indices, got {anchors.dtype} "
                         f"{tuple(anchors.shape)}")
    return anchors.long()
