"""``kd``: Hinton et al.'s knowledge distillation on the logits, CKTF's ``θ·L_distill``.

During transfer the student's classifier has the teacher's (source) classes, so the two logit vectors are
comparable even on target images. The loss itself is :class:`transfer.losses.kd.KDLoss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transfer.config import NCEConfig
from transfer.config.loader import option
from transfer.losses.kd import KDLoss
from transfer.losses.terms.base import LossTerm, Needs, TermContext, TermOptions, TransferBatch
from transfer.losses.terms.registry import register_term


@dataclass
class KDOptions(TermOptions):
    """Options of ``loss.terms.kd``."""

    weight: float = option(1.0, help="θ: weight of KL(softmax(T/ρ)‖softmax(S/ρ))·ρ²", min=0.0)
    temperature: float = option(4.0, help="ρ: softening temperature of both logit vectors", min=1e-4)


@register_term("kd")
class KDTerm(LossTerm):
    """KD on the logits: ρ²·KL(softmax(T/ρ) ‖ softmax(S/ρ)), batch mean, fp32."""

    Options = KDOptions
    paper = "Hinton, Vinyals, Dean, Distilling the Knowledge in a Neural Network (arXiv 1503.02531)"
    repdistiller = "equal (DistillKL); no variant"

    @classmethod
    def declare(cls, options: KDOptions, nce: NCEConfig) -> Needs:
        return Needs(taps=("logits",))

    def __init__(self, options: KDOptions, ctx: TermContext) -> None:
        super().__init__(options, ctx)
        self.kd = KDLoss(options.temperature)

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        return {"kd": self.kd(batch.student.logits, batch.teacher.logits)}
