"""CRD's memory bank: one slowly moving embedding per dataset item.

The NCE objectives of CRD (Tian et al., ICLR 2020, §3.2) and CKTF (eq. 3-5) contrast an anchor with K
negatives drawn from the *whole* dataset. Recomputing K embeddings per anchor is unaffordable, so each
item keeps a row in a bank that is refreshed, after the loss of the step, with a momentum average of
its latest embedding and re-normalised to the unit sphere (CRD's ``memory_v1``/``memory_v2``).

The bank is a persistent buffer: it follows ``.to(device)``, is part of ``state_dict()`` and so is
checkpointed and restored on resume, and never receives gradients. Cost: ``N·d·4`` bytes in fp32,
e.g. 100 000 items × 128 dims = 51 MB per bank (an NCE pair holds two); ``dtype`` bf16/fp16 halves that
(``loss.nce.bank_dtype``). The arithmetic of an update is fp32 either way; only the stored rows are rounded
(fp16 keeps 11 significant bits of a unit-norm row, bf16 8), and scoring reads rows back as fp32.

Distributed training (``gather_distributed``, set by the engine under torchrun, like lightly's
``MemoryBankModule(gather_distributed=True)``): :meth:`update` is the only write to a bank, and with the
flag it first all-gathers ``(indices, embeddings)`` from every rank, so every rank applies the same update
in rank order and the banks stay bit-identical. Cost: an all-gather of ``B·d`` floats and ``B`` indices
per bank and step (``B`` the global batch). Without the flag each rank would write only its own part of the
batch and the banks would drift apart (a known bug of the reference CRD code under DDP).

Example::

    bank = MemoryBank(num_items=len(dataset), dim=128)
    rows = bank.rows(indices)            # [B, 128], for scoring
    bank.update(indices, g.detach())     # after the loss, once per step
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfer.engine import distributed
from transfer.errors import CKTFError

BANK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class MemoryBank(nn.Module):
    """``num_items`` rows of size ``dim``, initialised uniformly in ``±1/sqrt(dim/3)``.

    That range gives every coordinate variance ``1/dim``, so an initial row has norm ≈ 1 and initial
    scores sit on the same scale as those of the unit-norm embeddings that replace them (CRD's init).

    Args:
        num_items, dim: rows and row size.
        momentum: weight of the old row in an update.
        generator: draws the initial rows (default: torch's global RNG).
        dtype: storage type of the rows (``torch.float32``, ``bfloat16`` or ``float16``).

    Attributes:
        gather_distributed: all-gather every update across torch.distributed ranks (see the module docstring).
    """

    weight: Tensor
    gather_distributed: bool

    def __init__(self, num_items: int, dim: int, momentum: float = 0.5,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if num_items < 1:
            raise CKTFError(f"the memory bank needs at least one item (number of unlabeled items N={num_items})")
        if dim < 1:
            raise CKTFError(f"loss.nce.embed_dim must be positive; got {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise CKTFError(f"loss.nce.momentum must be in [0, 1]; got {momentum}")
        self.num_items = num_items
        self.dim = dim
        self.momentum = momentum
        bound = 1.0 / math.sqrt(dim / 3.0)
        weight = torch.rand(num_items, dim, generator=generator).mul_(2 * bound).sub_(bound)
        self.register_buffer("weight", weight.to(dtype), persistent=True)
        self.gather_distributed = False

    def rows(self, indices: Tensor) -> Tensor:
        """The bank rows of ``indices`` (a copy), shape ``[*indices.shape, dim]``."""
        return self.weight[indices]

    def written_rows(self, indices: Tensor) -> Tensor:
        """The rows an :meth:`update` at ``indices`` rewrites: every rank's indices under ``gather_distributed``."""
        return distributed.gather_cat(indices) if self.gather_distributed else indices

    @torch.no_grad()
    def update(self, indices: Tensor, embeddings: Tensor, momentum: float | None = None) -> None:
        """``weight[i] <- normalise(m·weight[i] + (1-m)·e)`` for each ``(i, e)``; the only write to the bank.

        ``momentum`` overrides the bank's own (``0.0`` overwrites rows, e.g. to fill the bank before training).

        Duplicate indices in one call: every occurrence is blended with the row as it was *before* the
        call and the last occurrence wins, deterministically (``index_copy_`` alone leaves the winner
        unspecified, so duplicates are dropped first).

        Distributed training: with ``gather_distributed`` every rank's ``(indices, embeddings)`` are
        all-gathered first (rank order) and applied by every rank; all ranks must then call ``update`` together
        with the same batch size.
        """
        if indices.dim() != 1 or embeddings.shape != (indices.shape[0], self.dim):
            raise CKTFError(f"memory-bank update expects indices [B] and embeddings [B, {self.dim}] "
                            f"(loss.nce.embed_dim); got {tuple(indices.shape)} and {tuple(embeddings.shape)}")
        indices, embeddings = indices.long(), embeddings.float()
        if self.gather_distributed:
            indices, embeddings = distributed.gather_cat(indices), distributed.gather_cat(embeddings)
        indices, embeddings = _last_occurrence(indices, embeddings, self.num_items)
        m = self.momentum if momentum is None else momentum
        old = self.weight.index_select(0, indices).float()
        new = old.mul_(m).add_(embeddings, alpha=1.0 - m)
        self.weight.index_copy_(0, indices, F.normalize(new, dim=1).to(self.weight.dtype))

    def extra_repr(self) -> str:
        dtype = "" if self.weight.dtype == torch.float32 else f", dtype={self.weight.dtype}"
        return f"num_items={self.num_items}, dim={self.dim}, momentum={self.momentum}{dtype}"


def _last_occurrence(indices: Tensor, values: Tensor, num_items: int,
                     sync_free: bool | None = None) -> tuple[Tensor, Tensor]:
    """Make the update of repeated indices deterministic: the last ``(index, value)`` pair wins.

    On the CPU the duplicates are dropped. On a GPU that would need a host sync (the number of distinct
    indices), so instead every occurrence gets the last occurrence's value: ``index_copy_`` then writes
    the same row whichever occurrence lands.
    """
    position = torch.arange(indices.numel(), device=indices.device)
    if sync_free is None:
        sync_free = indices.device.type != "cpu"
    if sync_free:
        last = torch.full((num_items,), -1, device=indices.device).scatter_reduce_(0, indices, position, "amax")
        return indices, values[last[indices]]
    unique, inverse = torch.unique(indices, return_inverse=True)
    if unique.numel() == indices.numel():
        return indices, values
    last = torch.full_like(unique, -1).scatter_reduce_(0, inverse, position, reduce="amax")
    return indices[last], values[last]
