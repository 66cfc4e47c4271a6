"""``pkt``: probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018) on the penultimate vectors.

PKT matches the conditional probability distributions of the samples of a batch in the teacher's and the
student's feature spaces, estimated with the cosine-similarity kernel ``K(a, b) = ½(aᵀb / (‖a‖‖b‖) + 1)``,
by the Kullback-Leibler divergence:

    p_{j|i} = K(t_j, t_i) / Σ_{k≠i} K(t_k, t_i),    q_{j|i} = K(s_j, s_i) / Σ_{k≠i} K(s_k, s_i)

    L_PKT = 1/(B(B−1)) · Σ_i Σ_{j≠i} p_{j|i} · log((p_{j|i} + ε) / (q_{j|i} + ε))

i.e. the paper's sum of KL divergences ``KL(p_{·|i} ‖ q_{·|i})`` divided by the number of ordered pairs, the
scale RepDistiller's β = 30000 is tuned for (its code averages over the whole ``B × B`` matrix and keeps the
self-similarity ``K(x_i, x_i) = 1`` in each row's normalisation, which the paper's ``k ≠ i`` leaves out; ε
guards the logarithm as there). The kernel needs no matching widths: student and teacher may differ in size.

**Variants** (``variant``): ``paper`` is the above. ``repdistiller`` is RepDistiller's ``PKT``: vectors divided by
``‖x‖ + ε``, the self-similarity kept in each row's normalisation and in the sum, and the mean taken over all
``B²`` entries; the paper variant is larger than it by 50-80 % at B = 5, ~21 % at B = 16, ~5 % at B = 64 on
random vectors. Its β = 30000 was tuned for this variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from transfer.config import NCEConfig
from transfer.config.loader import option
from transfer.losses.terms.base import LossTerm, Needs, TermContext, TermOptions, TransferBatch
from transfer.losses.terms.map_pairs import check_vector, fp32, full_precision
from transfer.losses.terms.registry import register_term

KEY = "loss.terms.pkt"


@dataclass
class PKTOptions(TermOptions):
    """Options of ``loss.terms.pkt``."""

    weight: float = option(30000.0, help="β: weight of the mean pairwise KL term (RepDistiller: 30000)", min=0.0)
    eps: float = option(1e-7, help="ε added to both probabilities inside the logarithm (and, in variant "
                        "repdistiller, to each vector's norm)", min=0.0)
    variant: Literal["paper", "repdistiller"] = option(
        "paper", help="paper: self-similarity left out (k ≠ i), mean over the B(B−1) pairs; repdistiller: kept, "
        "mean over all B² entries, RepDistiller's (its β = 30000)")


def conditional_probabilities(x: torch.Tensor) -> torch.Tensor:
    """``[B, B]`` matrix of ``p_{j|i}`` (row i, column j) under the cosine kernel; the diagonal is 0."""
    x = F.normalize(x, dim=1)
    kernel = 0.5 * (x @ x.t() + 1.0)
    off = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    kernel = torch.where(off, kernel, torch.zeros_like(kernel))
    return kernel / kernel.sum(1, keepdim=True).clamp_min(1e-12)


def repdistiller_probabilities(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RepDistiller's ``[B, B]`` rows: ``x / (‖x‖ + ε)``, kernel ``½(cos + 1)`` diagonal kept, row-normalised."""
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    kernel = 0.5 * (x @ x.t() + 1.0)
    return kernel / kernel.sum(1, keepdim=True)


@register_term("pkt")
class PKTTerm(LossTerm):
    """PKT: KL between the teacher's and student's cosine-kernel conditional distributions over the batch."""

    Options = PKTOptions
    paper = ("PKT: Passalis, Tefas, Learning Deep Representations with Probabilistic Knowledge Transfer "
             "(ECCV 2018, arXiv 1803.10837)")
    repdistiller = "variant repdistiller (self-similarity kept; the default paper variant leaves it out)"

    @classmethod
    def declare(cls, options: PKTOptions, nce: NCEConfig) -> Needs:
        return Needs(taps=("penultimate",))

    def __init__(self, options: PKTOptions, ctx: TermContext) -> None:
        super().__init__(options, ctx)
        check_vector(ctx.student_shapes, "student", KEY)
        check_vector(ctx.teacher_shapes, "teacher", KEY)

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        s = fp32(batch.student.penultimate).flatten(1)
        t = fp32(batch.teacher.penultimate.detach()).flatten(1)
        n = len(s)
        if n < 2:
            return {"pkt": s.sum() * 0.0}
        eps = self.options.eps
        with full_precision(s):
            if self.options.variant == "repdistiller":
                p, q = repdistiller_probabilities(t, eps), repdistiller_probabilities(s, eps)
                return {"pkt": (p * torch.log((p + eps) / (q + eps))).mean()}
            p, q = conditional_probabilities(t), conditional_probabilities(s)
            off = ~torch.eye(n, dtype=torch.bool, device=s.device)
            return {"pkt": (p * torch.log((p + eps) / (q + eps)))[off].mean()}
