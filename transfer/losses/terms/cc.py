"""``cc``: correlation congruence (Peng et al.): the student's correlation matrix between the samples of a batch
matched to the teacher's.

On the penultimate vectors ``f_i`` (optionally through a linear embedding on each side), L2-normalised, the
correlation matrix is ``ψ(F)_{ij} = k(f_i, f_j)`` with the Gaussian RBF kernel ``k(x, y) = exp(−γ‖x − y‖²)``
approximated by its ``P``-order Taylor expansion (paper §3.3; for unit vectors ``‖x − y‖² = 2 − 2·x·y``)::

    k(x, y) ≈ Σ_{p=0..P} exp(−2γ) · (2γ)^p / p! · (x·y)^p
    L_CC = 1/n² · ‖ψ(F_T) − ψ(F_S)‖²   (sum of the n² squared entry differences)

Defaults γ = 0.4, P = 2 (the paper's ablation setting). Not taken from the paper: its class-aware batch
sampler (it needs labels; the transfer pool has none). The paper's loss weight is not reproduced either; the
default weight is 1.

**Variants** (``variant``): ``paper`` is the above. ``repdistiller`` is what RepDistiller's ``Correlation`` (CRD's
code, on which the CKTF code builds, and so the paper's Table 2) computes instead, a different quantity: with
``e_i = |E_S(s_i) − E_T(t_i)|`` the elementwise absolute difference of the two linear embeddings (``embed_dim``,
RepDistiller's 128, both trained with the student), the mean over consecutive samples of ``Σ_d e_i,d · e_i+1,d``,
``L = 1/(B−1) Σ_{i<B−1} ⟨e_i, e_{i+1}⟩``. Its β = 0.02 (``-b 0.02``) is tuned for this variant only.
Both variants compute in fp32 under autocast (embeddings included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from transfer.config import NCEConfig
from transfer.config.loader import option
from transfer.errors import CKTFError
from transfer.losses.terms.base import LossTerm, Needs, TermContext, TermOptions, TransferBatch
from transfer.losses.terms.map_pairs import full_precision
from transfer.losses.terms.registry import register_term

KEY = "loss.terms.cc"


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 (fp16/bf16 under autocast are widened; fp64, e.g. a gradient check, is kept)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@dataclass
class CCOptions(TermOptions):
    """Options of ``loss.terms.cc``."""

    weight: float = option(1.0, help="β: weight of L_CC (RepDistiller's 0.02 is for variant repdistiller)", min=0.0)
    variant: Literal["paper", "repdistiller"] = option(
        "paper", help="paper: Taylor-RBF correlation matrices (γ, order); repdistiller: RepDistiller's Correlation, "
        "mean over consecutive samples of the product of |embedded student − embedded teacher| (set embed_dim "
        "128 and weight 0.02 for its Table 2 setting)")
    gamma: float = option(0.4, help="γ of the Gaussian RBF kernel exp(−γ‖x − y‖²)", min=0.0)
    order: int = option(2, help="P: order of the kernel's Taylor expansion", min=0, max=32)
    embed_dim: int = option(0, help="0: correlate the penultimate vectors themselves; d > 0: through a linear "
                            "embedding (with bias) to d on each side, trained with the student (RepDistiller's 128)",
                            min=0)


def correlation_matrix(features: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """``[n, d]`` → ``[n, n]`` Taylor-approximated Gaussian RBF kernel of the L2-normalised rows, fp32."""
    f = F.normalize(_wide(features).flatten(1), dim=1)
    with full_precision(f):
        sim = f @ f.t()
        out = torch.zeros_like(sim)
        for p in range(order + 1):
            out = out + math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim.pow(p)
    return out


def neighbour_correlation(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """RepDistiller's ``Correlation``: ``mean_{i<n−1} Σ_d |s_i − t_i|_d · |s_{i+1} − t_{i+1}|_d`` of ``[n, d]`` rows."""
    delta = (s - t).abs()
    if len(delta) < 2:
        return delta.sum() * 0.0
    return (delta[:-1] * delta[1:]).sum(1).mean()


@register_term("cc")
class CorrelationCongruenceTerm(LossTerm):
    """CC: ``1/n² ‖ψ(F_T) − ψ(F_S)‖²``, ψ the Taylor-approximated RBF correlation matrix of the batch."""

    Options = CCOptions
    paper = ("Correlation Congruence for Knowledge Distillation (Peng, Jin, Liu, Zhou, Wu, Liu, Li, Zhang, "
             "ICCV 2019, arXiv 1904.01802)")
    repdistiller = ("variant repdistiller with embed_dim 128 (Correlation through LinearEmbed, a different quantity "
                    "from the default paper variant; its β = 0.02)")

    @classmethod
    def declare(cls, options: CCOptions, nce: NCEConfig) -> Needs:
        return Needs(taps=("penultimate",))

    def __init__(self, options: CCOptions, ctx: TermContext) -> None:
        super().__init__(options, ctx)
        d = options.embed_dim
        widths = ctx.student_channels["penultimate"], ctx.teacher_channels["penultimate"]
        if options.variant == "repdistiller" and d == 0 and widths[0] != widths[1]:
            raise CKTFError(f"{KEY}.variant repdistiller compares student and teacher vectors elementwise, but their "
                            f"widths differ ({widths[0]} vs {widths[1]}); set {KEY}.embed_dim (RepDistiller: 128)")
        self.embed_s: nn.Module = nn.Identity()
        self.embed_t: nn.Module = nn.Identity()
        if d > 0:
            self.embed_s = nn.Linear(ctx.student_channels["penultimate"], d)
            self.embed_t = nn.Linear(ctx.teacher_channels["penultimate"], d)

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        o = self.options
        s = _wide(batch.student.penultimate).flatten(1)
        with full_precision(s):
            s = self.embed_s(s)
            t = self.embed_t(_wide(batch.teacher.penultimate.detach()).flatten(1))
            if o.variant == "repdistiller":
                return {"cc": neighbour_correlation(s, t)}
            n = s.shape[0]
            diff = correlation_matrix(t, o.gamma, o.order) - correlation_matrix(s, o.gamma, o.order)
            return {"cc": diff.pow(2).sum() / (n * n)}
