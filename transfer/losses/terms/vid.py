"""``vid``: variational information distillation (Ahn et al., CVPR 2019) on paired stage maps.

VID maximises a variational lower bound of the mutual information between a teacher map ``t`` and the student
map ``s`` of the same stage: a Gaussian ``q(t | s)`` whose mean ``μ(s)`` is a small network of 1×1 convolutions
on the student map and whose variance is one learned value per teacher channel,
``σ_c² = log(1 + exp(α_c)) + ε``. The term is the negative log-likelihood (constant dropped)

    L_VID = Σ_k  1/(B·C·H·W) · Σ_{b,c,h,w} [ log σ_c + (t_{b,c,h,w} − μ_{c,h,w}(s_b))² / (2 σ_c²) ]

summed over the selected stages k (one regressor μ and one α per stage), each averaged over its elements (the
paper sums them; the average, as in RepDistiller, only rescales the per-stage λ_k, which are all 1 here). When
the two maps differ in size the larger is average-pooled to the smaller first. The loss can be negative: the
likelihood of a continuous variable is a density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transfer.config import NCEConfig
from transfer.config.loader import option
from transfer.errors import CKTFError
from transfer.losses.terms.base import LossTerm, Needs, TermContext, TermOptions, TransferBatch
from transfer.losses.terms.map_pairs import check_maps, common_size, fp32, full_precision, selected_stages
from transfer.losses.terms.registry import register_term

KEY = "loss.terms.vid"


@dataclass
class VIDOptions(TermOptions):
    """Options of ``loss.terms.vid``."""

    weight: float = option(1.0, help="β: weight of the summed stage negative log-likelihoods (RepDistiller: 1)",
                           min=0.0)
    stages: list[int] | None = option(None, help="1-based stages to pair (null: every stage, as RepDistiller's "
                                      "feat[1:-1])")
    mid_channels: int | None = option(None, help="width of the two hidden 1x1 convolutions of μ(s) (null: the "
                                      "teacher stage's width, as the reference code)", min=1)
    init_variance: float = option(5.0, help="initial σ_c² of every teacher channel", min=1e-3)
    eps: float = option(1e-5, help="ε: floor of σ_c² = softplus(α_c) + ε", min=0.0)

    def validate(self) -> None:
        if self.init_variance <= self.eps:
            raise CKTFError(f"{KEY}.init_variance ({self.init_variance}) must exceed {KEY}.eps ({self.eps})")


class VariationalRegressor(nn.Module):
    """``μ(s)``: conv1x1 → ReLU → conv1x1 → ReLU → conv1x1 (no biases), and the per-channel variance ``σ_c²``."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, init_variance: float,
                 eps: float) -> None:
        super().__init__()
        self.mean = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, 1, bias=False))
        # α_c with softplus(α_c) + ε = init_variance: α = log(exp(v − ε) − 1)
        alpha = math.log(math.expm1(init_variance - eps))
        self.alpha = nn.Parameter(torch.full((out_channels,), alpha))
        self.eps = eps

    def variance(self) -> torch.Tensor:
        """``σ_c² = log(1 + exp(α_c)) + ε``, shape ``[C_t]``."""
        return F.softplus(fp32(self.alpha)) + self.eps

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood (constant dropped) of the teacher map ``t`` given the student map ``s``."""
        mu = fp32(self.mean(s))  # the 1x1 convolutions may run under autocast; the likelihood does not
        with full_precision(mu):
            var = self.variance().view(1, -1, 1, 1)
            return (0.5 * ((mu - fp32(t)) ** 2 / var + var.log())).mean()


@register_term("vid")
class VIDTerm(LossTerm):
    """VID: Gaussian negative log-likelihood of each teacher stage map given the student's (1x1-conv mean)."""

    Options = VIDOptions
    paper = ("VID: Ahn, Hu, Damianou, Lawrence, Dai, Variational Information Distillation for Knowledge "
             "Transfer (CVPR 2019, arXiv 1904.05835)")
    repdistiller = "equal (VIDLoss on every stage); no variant"

    @classmethod
    def declare(cls, options: VIDOptions, nce: NCEConfig) -> Needs:
        return Needs(taps=("stages",), same_stage_count=True)

    def __init__(self, options: VIDOptions, ctx: TermContext) -> None:
        super().__init__(options, ctx)
        s_ch, t_ch = ctx.student_channels["stages"], ctx.teacher_channels["stages"]
        if len(s_ch) != len(t_ch):
            raise CKTFError(f"{KEY} pairs stages one to one, but the student has {len(s_ch)} stages and the "
                            f"teacher {len(t_ch)}")
        self.indices = selected_stages(options.stages, len(s_ch), f"{KEY}.stages")
        check_maps(ctx.student_shapes, "student", self.indices, KEY)
        check_maps(ctx.teacher_shapes, "teacher", self.indices, KEY)
        self.regressors = nn.ModuleDict({
            f"stage{i + 1}": VariationalRegressor(s_ch[i], options.mid_channels or t_ch[i], t_ch[i],
                                                  options.init_variance, options.eps)
            for i in self.indices})

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        losses = {}
        for i in self.indices:
            fs, ft = common_size(batch.student.stages[i], batch.teacher.stages[i].detach())
            losses[f"vid/stage{i + 1}"] = self.regressors[f"stage{i + 1}"](fs, fp32(ft))
        return losses
