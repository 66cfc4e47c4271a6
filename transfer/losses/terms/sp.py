"""``sp``: similarity-preserving distillation (Tung & Mori): the student's batch similarity matrix matched to the
teacher's.

For a batch of ``b`` activation maps of one stage, flattened to ``Q ∈ R^{b×(C·H·W)}``, the similarity matrix is
``G = Q·Qᵀ ∈ R^{b×b}`` with every row L2-normalised, ``G̃_[i,:] = G_[i,:] / ‖G_[i,:]‖₂`` (paper eq. 1-2), and::

    L_SP = 1/b² · Σ_{(l, l')} ‖G̃_T^(l) − G̃_S^(l')‖_F²          (paper eq. 3-4)

over the chosen stage pairs. The paper's CIFAR experiments and RepDistiller pair the last stage only (the
default, ``stages: last``); ``stages: all`` pairs every student stage with the same teacher stage. Because
``G`` is ``b×b`` the two sides may differ in width and resolution. Default weight γ = 3000 (paper, and
RepDistiller's ``-b 3000``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from transfer.config import NCEConfig
from transfer.config.loader import option
from transfer.errors import CKTFError
from transfer.losses.terms.base import LossTerm, Needs, TermContext, TermOptions, TransferBatch
from transfer.losses.terms.map_pairs import fp32, full_precision
from transfer.losses.terms.registry import register_term

KEY = "loss.terms.sp"



@dataclass
class SPOptions(TermOptions):
    """Options of ``loss.terms.sp``."""

    weight: float = option(3000.0, help="γ: weight of L_SP (the paper and RepDistiller: 3000)", min=0.0)
    stages: Literal["last", "all"] = option(
        "last", help="which stage pairs: last (the last stage of each side, the paper's CIFAR setting and "
        "RepDistiller) or all (student stage i with teacher stage i)")


def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """``[b, …]`` → the row-normalised ``[b, b]`` Gram matrix ``G̃`` of the flattened features, fp32.

    Autocast is off for the product: in fp16 a Gram entry overflows beyond 65504 (e.g. 1000 values of 300).
    """
    q = fp32(features).flatten(1)
    with full_precision(q):
        return F.normalize(q @ q.t(), dim=1)


def similarity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``‖G̃_T − G̃_S‖_F² / b²`` for one pair of ``[b, …]`` feature tensors (teacher detached)."""
    b = student.shape[0]
    return (similarity_matrix(teacher.detach()) - similarity_matrix(student)).pow(2).sum() / (b * b)


@register_term("sp")
class SimilarityPreservingTerm(LossTerm):
    """SP: ``1/b² Σ ‖G̃_T − G̃_S‖_F²``, ``G̃`` the row-normalised batch Gram matrix of a stage's maps."""

    Options = SPOptions
    paper = "Similarity-Preserving Knowledge Distillation (Tung, Mori, ICCV 2019, arXiv 1907.09682)"
    repdistiller = "equal (Similarity, last stage); no variant"

    @classmethod
    def declare(cls, options: SPOptions, nce: NCEConfig) -> Needs:
        return Needs(taps=("stages",), same_stage_count=options.stages == "all")

    def __init__(self, options: SPOptions, ctx: TermContext) -> None:
        super().__init__(options, ctx)
        n_s, n_t = len(ctx.student_channels["stages"]), len(ctx.teacher_channels["stages"])
        if options.stages == "all" and n_s != n_t:
            raise CKTFError(f"{KEY}.stages all pairs stages one to one, but the student has {n_s} stages and the "
                            f"teacher {n_t}; use {KEY}.stages last")

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        s, t = batch.student.stages, batch.teacher.stages
        if self.options.stages == "last":
            return {"sp": similarity_loss(s[-1], t[-1])}
        return {f"sp/stage{i + 1}": similarity_loss(fs, ft) for i, (fs, ft) in enumerate(zip(s, t, strict=True))}
