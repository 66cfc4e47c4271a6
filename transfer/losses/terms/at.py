"""``at``: attention transfer (Zagoruyko & Komodakis), the student's spatial attention maps matched to the teacher's.

For an activation map ``A ∈ R^{C×H×W}`` the attention map is ``Q = Σ_c |A_c|^p`` (the paper's ``F^p_sum``,
eq. 1, p = 2), flattened and L2-normalised: ``q = Q / ‖Q‖₂``. For every stage pair ``j`` the loss is the mean
squared difference of the normalised maps over the batch and the positions::

    L_AT = Σ_j mean_{b, x} (q_S^j(b, x) − q_T^j(b, x))²

which is the paper's eq. 2 term as its authors' code computes it (squared distance, "β divided by the number
of elements in the attention map and the batch size"); the paper's ``β/2`` with β = 1000 is weight 500, and
RepDistiller (CRD's code, on which the CKTF code builds) uses weight 1000 on this sum, the default here. The
channel sum is taken as a mean (the normalisation cancels the factor C). Every student stage pairs with the
same teacher stage (``same_stage_count``); when their spatial sizes differ the larger map is average-pooled to
the smaller size first, as RepDistiller does (the paper pairs maps of one size).

**Variants** (``variant``): ``paper`` raises the absolute value, ``|A_c|^p``; ``repdistiller`` the signed value,
``A_c^p``, as RepDistiller's ``Attention``. They agree for even p (the default p = 2, for which its β = 1000 was
tuned) and on non-negative (post-ReLU) maps; for odd p on signed maps they differ, and for a non-integer p the
signed power of a negative activation is NaN (as in RepDistiller).
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
from transfer.losses.terms.map_pairs import fp32
from transfer.losses.terms.registry import register_term

KEY = "loss.terms.at"



@dataclass
class ATOptions(TermOptions):
    """Options of ``loss.terms.at``."""

    weight: float = option(1000.0, help="β: weight of the sum over stages (RepDistiller: 1000; the paper's β/2 "
                           "with β = 1000 is 500)", min=0.0)
    p: float = option(2.0, help="exponent of the attention map Σ_c |A_c|^p (the paper uses 2; below 1 the "
                      "gradient at the zeros of ReLU maps is infinite)", min=1.0)
    variant: Literal["paper", "repdistiller"] = option(
        "paper", help="paper: Σ_c |A_c|^p; repdistiller: the signed Σ_c A_c^p of RepDistiller (equal for even p "
        "and for non-negative maps)")


def attention_map(features: torch.Tensor, p: float, signed: bool = False) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, H·W]``: ``mean_c |A_c|^p`` (``signed``: ``mean_c A_c^p``) per position,
    L2-normalised per sample, fp32."""
    x = fp32(features)
    q = (x if signed else x.abs()).pow(p).mean(dim=1).flatten(1)
    return F.normalize(q, dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float, signed: bool = False) -> torch.Tensor:
    """``mean (q_S − q_T)²`` of one stage pair, the larger map average-pooled to the smaller spatial size."""
    hs, ws = student.shape[-2:]
    ht, wt = teacher.shape[-2:]
    size = (min(hs, ht), min(ws, wt))
    if (hs, ws) != size:
        student = F.adaptive_avg_pool2d(student, size)
    if (ht, wt) != size:
        teacher = F.adaptive_avg_pool2d(teacher, size)
    return (attention_map(student, p, signed) - attention_map(teacher.detach(), p, signed)).pow(2).mean()


def _check_maps(ctx: TermContext) -> None:
    """Every stage of both sides must be a ``[C, H, W]`` map, and the two sides must have as many stages."""
    for side, shapes in (("student", ctx.student_shapes), ("teacher", ctx.teacher_shapes)):
        for i, shape in enumerate((shapes or {}).get("stages", [])):
            if len(shape) != 3:
                raise CKTFError(f"{KEY}: {side} stage {i + 1} has per-sample shape {tuple(shape)}, but attention "
                                "transfer needs [C, H, W] feature maps")
    n_s, n_t = len(ctx.student_channels["stages"]), len(ctx.teacher_channels["stages"])
    if n_s != n_t:
        raise CKTFError(f"{KEY} pairs stages one to one, but the student has {n_s} stages and the teacher {n_t}")


@register_term("at")
class AttentionTransferTerm(LossTerm):
    """AT: ``Σ_j mean (Q_S^j/‖Q_S^j‖ − Q_T^j/‖Q_T^j‖)²`` with ``Q = Σ_c |A_c|^p`` over every stage pair ``j``."""

    Options = ATOptions
    paper = ("Paying More Attention to Attention: Improving the Performance of Convolutional Neural Networks via "
             "Attention Transfer (Zagoruyko, Komodakis, ICLR 2017, arXiv 1612.03928)")
    repdistiller = "variant repdistiller (the signed power); the default paper variant equals it for even p"

    @classmethod
    def declare(cls, options: ATOptions, nce: NCEConfig) -> Needs:
        return Needs(taps=("stages",), same_stage_count=True)

    def __init__(self, options: ATOptions, ctx: TermContext) -> None:
        super().__init__(options, ctx)
        _check_maps(ctx)

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        p, signed = self.options.p, self.options.variant == "repdistiller"
        return {f"at/stage{i + 1}": attention_loss(s, t, p, signed)
                for i, (s, t) in enumerate(zip(batch.student.stages, batch.teacher.stages, strict=True))}
