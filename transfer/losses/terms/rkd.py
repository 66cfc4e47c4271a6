"""``rkd``: relational knowledge distillation (Park et al., CVPR 2019), distance + angle, penultimate vectors.

RKD transfers the *relations* between the samples of a batch instead of each sample's output. With ``t_i``,
``s_i`` the teacher's and student's penultimate vectors and ``l_δ`` the Huber loss (δ = 1: ``½x²`` for
``|x| ≤ 1``, ``|x| − ½`` beyond):

- distance-wise: ``ψ_D(t_i, t_j) = ‖t_i − t_j‖₂ / μ_t`` with ``μ_t`` the mean distance over
  the distinct pairs of the batch (likewise for the student with its own ``μ_s``);
  ``L_D = mean_{i≠j} l_δ(ψ_D(t_i, t_j), ψ_D(s_i, s_j))``;
- angle-wise: ``ψ_A(t_i, t_j, t_k) = ⟨e_ij, e_kj⟩``, ``e_ij = (t_i − t_j)/‖t_i − t_j‖₂``, the cosine
  of the angle at ``t_j``; ``L_A = mean_{i,j,k distinct} l_δ(ψ_A(t_i, t_j, t_k), ψ_A(s_i, s_j, s_k))``;

``L_RKD = λ_D·L_D + λ_A·L_A`` (logged as ``rkd/distance`` and ``rkd/angle``, each already multiplied by its λ).
The paper sums over the sets of distinct pairs and triplets; this term averages over them (a rescaling of
the λ). The authors' code averages over all ``B²`` pairs and ``B³`` triplets instead, the degenerate ones
(repeated indices) adding zeros, i.e. ``(B−1)/B`` and ``(B−1)(B−2)/B²`` times the values here (0.98 and 0.95
at B = 64). Student and teacher vectors may differ in width (only distances and angles are compared).

**Variants** (``variant``): ``paper`` averages over the distinct pairs and triplets as above; ``repdistiller``
averages over all ``B²`` pairs and ``B³`` triplets as RepDistiller's ``RKDLoss`` (for which its λ_D = 25,
λ_A = 50 and β = 1 were tuned): exactly ``(B−1)/B`` times the paper variant's distance loss and
``(B−1)(B−2)/B²`` times its angle loss.
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
from transfer.losses.terms.map_pairs import check_vector, fp32, full_precision
from transfer.losses.terms.registry import register_term

KEY = "loss.terms.rkd"


@dataclass
class RKDOptions(TermOptions):
    """Options of ``loss.terms.rkd``."""

    weight: float = option(1.0, help="β: weight of λ_D·L_D + λ_A·L_A (RepDistiller: 1)", min=0.0)
    distance_weight: float = option(25.0, help="λ_D: weight of the distance-wise loss "
                                    "(RepDistiller: 25; 0 leaves it out)", min=0.0)
    angle_weight: float = option(50.0, help="λ_A: weight of the angle-wise loss "
                                 "(RepDistiller: 50; 0 leaves it out)", min=0.0)
    variant: Literal["paper", "repdistiller"] = option(
        "paper", help="paper: mean over the distinct pairs/triplets; repdistiller: mean over all B² pairs and B³ "
        "triplets, RepDistiller's ((B−1)/B and (B−1)(B−2)/B² times the paper's)")

    def validate(self) -> None:
        if self.distance_weight == 0 and self.angle_weight == 0:
            raise CKTFError(f"{KEY}.distance_weight and {KEY}.angle_weight are both 0; give one a positive weight "
                            f"(or leave the term out with {KEY}.weight 0)")


def pair_distances(x: torch.Tensor) -> torch.Tensor:
    """``[B, B]`` Euclidean distances between the rows of ``x`` (the diagonal is exactly 0, with zero gradient)."""
    diff = x.unsqueeze(1) - x.unsqueeze(0)
    squared = diff.pow(2).sum(-1)
    off = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    return torch.where(off, squared.clamp_min(1e-12), torch.zeros_like(squared)).sqrt()


def distance_potential(x: torch.Tensor) -> torch.Tensor:
    """``ψ_D``: pairwise distances divided by their mean over the distinct pairs, ``[B, B]``."""
    d = pair_distances(x)
    n = len(x)
    return d / (d.sum() / (n * (n - 1))).clamp_min(1e-12)


def angle_potential(x: torch.Tensor) -> torch.Tensor:
    """``ψ_A``: ``[B, B, B]`` with entry ``[j, i, k] = ⟨e_ij, e_kj⟩``, the cosine of the angle at ``x_j``."""
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=2)  # e[j, i] = unit vector from x_j to x_i
    return torch.bmm(e, e.transpose(1, 2))


def huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise Huber loss with δ = 1."""
    return F.smooth_l1_loss(a, b, reduction="none", beta=1.0)


@register_term("rkd")
class RKDTerm(LossTerm):
    """RKD: Huber losses between the batch's distance (λ_D = 25) and angle (λ_A = 50) structures."""

    Options = RKDOptions
    paper = "RKD: Park, Kim, Lu, Cho, Relational Knowledge Distillation (CVPR 2019, arXiv 1904.05068)"
    repdistiller = ("variant repdistiller (means over all pairs/triplets; the default paper variant is B/(B−1) and "
                    "B²/((B−1)(B−2)) times it)")

    @classmethod
    def declare(cls, options: RKDOptions, nce: NCEConfig) -> Needs:
        return Needs(taps=("penultimate",))

    def __init__(self, options: RKDOptions, ctx: TermContext) -> None:
        super().__init__(options, ctx)
        check_vector(ctx.student_shapes, "student", KEY)
        check_vector(ctx.teacher_shapes, "teacher", KEY)

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        s = fp32(batch.student.penultimate).flatten(1)
        with full_precision(s):
            return self._losses(s, fp32(batch.teacher.penultimate.detach()).flatten(1))

    def _losses(self, s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(s)
        every = self.options.variant == "repdistiller"  # degenerate pairs/triplets add zeros to the mean
        losses = {}
        if self.options.distance_weight > 0:
            if n < 2:
                losses["rkd/distance"] = s.sum() * 0.0
            else:
                off = ~torch.eye(n, dtype=torch.bool, device=s.device)
                pairs = huber(distance_potential(s), distance_potential(t))
                loss = pairs.mean() if every else pairs[off].mean()
                losses["rkd/distance"] = self.options.distance_weight * loss
        if self.options.angle_weight > 0:
            if n < 3:
                losses["rkd/angle"] = s.sum() * 0.0
            else:
                eye = torch.eye(n, dtype=torch.bool, device=s.device)
                distinct = ~(eye.unsqueeze(2) | eye.unsqueeze(1) | eye.unsqueeze(0))  # j≠i, j≠k, i≠k
                triplets = huber(angle_potential(s), angle_potential(t))
                loss = triplets.mean() if every else triplets[distinct].mean()
                losses["rkd/angle"] = self.options.angle_weight * loss
        return losses
