"""``nst``: neuron selectivity transfer (Huang & Wang, arXiv 1707.01219) on paired stage maps.

NST treats each channel of a map as one sample of a distribution over spatial activation patterns: channel
``c`` of sample ``b`` is the vector ``f^c ∈ R^{HW}``, l2-normalised over the positions. It matches the
student's and teacher's distributions by the squared maximum mean discrepancy, per sample,

    MMD² = 1/C_T² Σ_{i,i'} k(f_T^i, f_T^{i'}) + 1/C_S² Σ_{j,j'} k(f_S^j, f_S^{j'}) − 2/(C_T C_S) Σ_{i,j} k(f_T^i, f_S^j)

with the polynomial kernel ``k(x, y) = (xᵀy + c)^d`` (the paper's best: d = 2, c = 0; d = 1, c = 0 is its
linear kernel), averaged over the batch and summed over the selected stages (logged as ``nst/stage<i>``). The
paper's objective is ``λ/2 · MMD²``; this term's ``weight`` is that λ/2 (RepDistiller's β = 50). Channel
counts may differ; when the maps differ in size the larger is average-pooled to the smaller first. The
teacher-only sum is a constant (no gradient) but kept, so the value is the MMD² itself (≥ 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from transfer.config import NCEConfig
from transfer.config.loader import option
from transfer.errors import CKTFError
from transfer.losses.terms.base import LossTerm, Needs, TermContext, TermOptions, TransferBatch
from transfer.losses.terms.map_pairs import check_maps, common_size, fp32, full_precision, selected_stages
from transfer.losses.terms.registry import register_term

KEY = "loss.terms.nst"


@dataclass
class NSTOptions(TermOptions):
    """Options of ``loss.terms.nst``."""

    weight: float = option(50.0, help="λ/2: weight of the summed stage MMD² (RepDistiller: 50)", min=0.0)
    stages: list[int] | None = option(None, help="1-based stages to pair (null: every stage, as RepDistiller's "
                                      "feat[1:-1])")
    degree: int = option(2, help="d of the polynomial kernel (xᵀy + c)^d (1 with coef 0: the linear kernel)",
                         min=1)
    coef: float = option(0.0, help="c of the polynomial kernel (xᵀy + c)^d", min=0.0)


def mmd2(fs: torch.Tensor, ft: torch.Tensor, degree: int, coef: float) -> torch.Tensor:
    """Batch mean of the per-sample MMD² between the channels of ``[B, C, H, W]`` maps of one spatial size."""
    fs = F.normalize(fs.flatten(2), dim=2)
    ft = F.normalize(ft.flatten(2), dim=2)

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.transpose(1, 2) + coef).pow(degree).mean(dim=(1, 2))

    return (k(ft, ft) + k(fs, fs) - 2 * k(fs, ft)).mean()


@register_term("nst")
class NSTTerm(LossTerm):
    """NST: squared MMD (polynomial kernel) between the student's and teacher's channel activation patterns."""

    Options = NSTOptions
    paper = ("NST: Huang, Wang, Like What You Like: Knowledge Distill via Neuron Selectivity Transfer "
             "(arXiv 1707.01219, 2017)")
    repdistiller = "equal (NSTLoss, polynomial kernel d = 2, c = 0); no variant"

    @classmethod
    def declare(cls, options: NSTOptions, nce: NCEConfig) -> Needs:
        return Needs(taps=("stages",), same_stage_count=True)

    def __init__(self, options: NSTOptions, ctx: TermContext) -> None:
        super().__init__(options, ctx)
        s_count, t_count = len(ctx.student_channels["stages"]), len(ctx.teacher_channels["stages"])
        if s_count != t_count:
            raise CKTFError(f"{KEY} pairs stages one to one, but the student has {s_count} stages and the "
                            f"teacher {t_count}")
        self.indices = selected_stages(options.stages, s_count, f"{KEY}.stages")
        check_maps(ctx.student_shapes, "student", self.indices, KEY)
        check_maps(ctx.teacher_shapes, "teacher", self.indices, KEY)

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        losses = {}
        for i in self.indices:
            fs = fp32(batch.student.stages[i])
            with full_precision(fs):
                fs, ft = common_size(fs, fp32(batch.teacher.stages[i].detach()))
                losses[f"nst/stage{i + 1}"] = mmd2(fs, ft, self.options.degree, self.options.coef)
        return losses
