"""``ce``: cross-entropy with the transfer split's own labels, CKTF's ``γ·CE(Y, S)``.

Only meaningful when the transfer data is labeled (compression: teacher and student see the same labeled
data); for unsupervised transfer γ = 0, i.e. the term is left out. It declares ``labels``, so a run on an
unlabeled split (targets −1) is refused before it starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from transfer.config import NCEConfig
from transfer.config.loader import option
from transfer.losses.terms.base import LossTerm, Needs, TermOptions, TransferBatch
from transfer.losses.terms.registry import register_term


@dataclass
class CrossEntropyOptions(TermOptions):
    """Options of ``loss.terms.ce``."""

    weight: float = option(1.0, help="γ: cross-entropy weight (needs a labeled transfer split)", min=0.0)


@register_term("ce")
class CrossEntropyTerm(LossTerm):
    """Cross-entropy of the student's logits against the transfer split's labels (supervised part of eq. 1)."""

    Options = CrossEntropyOptions
    paper = "CKTF (Zhao, Chen, Zhao, ICASSP 2023, arXiv 2303.07599), eq. 1, the γ·CE term"

    @classmethod
    def declare(cls, options: CrossEntropyOptions, nce: NCEConfig) -> Needs:
        return Needs(taps=("logits",), labels=True)

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(batch.student.logits.float(), batch.targets)}
