"""``pckt``: the contrastive objective on the penultimate vectors, CKTF's ``α2·L_PCKT`` — exactly CRD alone.

One :class:`ContrastivePair` (heads + NCE with memory banks, settings from ``loss.nce``) on the student's and
teacher's penultimate vectors; negatives come from the sampler (``sampler.*``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transfer.config import NCEConfig
from transfer.config.loader import option
from transfer.losses.contrastive import ContrastivePair
from transfer.losses.terms.base import InitPhase, LossTerm, Needs, TermContext, TermOptions, TransferBatch
from transfer.losses.terms.registry import register_term


@dataclass
class PCKTOptions(TermOptions):
    """Options of ``loss.terms.pckt`` (the NCE settings are shared: ``loss.nce``)."""

    weight: float = option(0.2, help="α2: weight of the penultimate contrastive objective (CRD when alone)",
                           min=0.0)


@register_term("pckt")
class PenultimateContrastTerm(LossTerm):
    """L_PCKT: CRD's contrastive objective between the penultimate vectors (CKTF eq. 4)."""

    Options = PCKTOptions
    paper = ("CRD (Tian, Krishnan, Isola, ICLR 2020, arXiv 1910.10699); CKTF's L_PCKT (arXiv 2303.07599, "
             "eq. 4)")

    @classmethod
    def declare(cls, options: PCKTOptions, nce: NCEConfig) -> Needs:
        return Needs(taps=("penultimate",), negatives=True, memory_banks=True, init_phase=nce.bank_init == "embed")

    def __init__(self, options: PCKTOptions, ctx: TermContext) -> None:
        super().__init__(options, ctx)
        self.pair = ContrastivePair(ctx.student_channels["penultimate"], ctx.teacher_channels["penultimate"],
                                    ctx.nce, ctx.num_items)

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        return {"pckt": self.pair(batch.student.penultimate, batch.teacher.penultimate, batch.indices,
                                  batch.negatives)}

    @torch.no_grad()
    def fill_banks(self, batch: TransferBatch) -> None:
        """Write this batch's current embeddings into the banks (``loss.nce.bank_init embed``)."""
        self.pair.fill_banks(batch.student.penultimate, batch.teacher.penultimate, batch.indices)

    def init_phase(self, phase: InitPhase) -> None:
        for batch in phase.eval_batches():
            self.fill_banks(batch)
