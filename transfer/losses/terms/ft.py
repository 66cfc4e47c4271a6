"""``ft``: factor transfer (Kim, Park, Kwak, NeurIPS 2018), with its paraphraser pre-training phase.

A paraphraser P (three 3×3 convolutions encoding the teacher's stage map T into a factor of k·C_T channels,
then three 3×3 transposed convolutions decoding it back; LeakyReLU 0.1, no BatchNorm) is first trained alone
to reconstruct T, ‖T − P(T)‖² (mean over elements, as RepDistiller's ``MSELoss``). It is then fixed, and a
translator (three 3×3 convolutions + BatchNorm + LeakyReLU 0.1 on the student's stage map, to k·C_T channels)
is trained with the student so that the normalised factors agree:

    L_FT = (1/B) Σ_b ‖ F_T/‖F_T‖₂ − F_S/‖F_S‖₂ ‖_p^p · (1/D if reduction is mean),   p = 1 (the paper's)

with F_T = encoder(T) and F_S = translator(S) each flattened to D = k·C_T·H·W values per sample. When the two
stage maps differ in spatial size, the larger factor is average-pooled to the smaller (as RepDistiller).

**Init phase**: ``init_epochs`` epochs of the reconstruction loss over the training loader, SGD lr ``init_lr``
(RepDistiller: 0.01 for ResNet/WRN students) on the paraphraser only; the paraphraser then stays fixed (its
weights are saved with the term, so ``--resume`` keeps them, but the main optimizer never sees them).

**Variants** (``variant``): ``paper`` normalises the whole flattened factor, as above; ``reduction mean`` (its
default) divides the paper's p-norm by D, ``reduction sum`` is the paper's norm, and with ``p 2`` the loss is
the squared L2 distance. ``repdistiller`` is RepDistiller's ``FactorTransfer``, for which its β = 200 was tuned:
each factor is first reduced to its channel-mean of squares per position, ``a = mean_c F_c²`` (an attention map,
``[B, H·W]``), L2-normalised per sample, and the loss is ``mean_{b,x} |a_T − a_S|^p`` (``reduction`` does not
apply). The two differ by 2.5-64 % on identical factors, not by a constant factor.

**Weights**: the main optimizer trains the translator (with the student); the paraphraser is trained only in
the init phase (on the reconstruction loss, unweighted) and is fixed in the main loop, where β weighs L_FT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from transfer.config import NCEConfig
from transfer.config.loader import option
from transfer.errors import CKTFError
from transfer.losses.init_training import pretrain
from transfer.losses.terms.base import InitPhase, LossTerm, Needs, TermContext, TermOptions, TransferBatch
from transfer.losses.terms.map_pairs import fp32
from transfer.losses.terms.registry import register_term

KEY = "loss.terms.ft"



@dataclass
class FTOptions(TermOptions):
    """Options of ``loss.terms.ft``."""

    weight: float = option(200.0, help="β: weight of the factor loss (RepDistiller's scripts: -b 200, tuned for "
                           "variant repdistiller)", min=0.0)
    rate: float = option(0.5, help="k: paraphrase rate, the factor has int(k·C_T) channels (the paper: 0.5)",
                         min=1e-3)
    p: int = option(1, help="norm of the factor distance: 1 (the paper) or 2 (squared L2)", min=1, max=2)
    reduction: Literal["mean", "sum"] = option(
        "mean", help="variant paper, per sample: mean over the D factor values or sum (the paper's norm)")
    variant: Literal["paper", "repdistiller"] = option(
        "paper", help="paper: the whole flattened factor L2-normalised; repdistiller: each factor reduced to its "
        "normalised channel-mean of squares before the mean |difference|^p, RepDistiller's (its β = 200)")
    stage: int | None = option(None, help="1-based stage of both networks whose maps are paraphrased/translated "
                               "(null: each network's last stage, the paper's)", min=1)
    init_epochs: int = option(2, help="epochs of the init phase training the paraphraser to reconstruct the "
                              "teacher's map (RepDistiller: 30; 0: no init phase, the paraphraser stays random)",
                              min=0)
    init_lr: float = option(0.01, help="SGD learning rate of the paraphraser's init phase (momentum 0.9, weight "
                            "decay 5e-4; RepDistiller: 0.01 for ResNet/WRN students)", min=0.0)


def _act() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.1)


class Paraphraser(nn.Module):
    """Encoder (3 convs, C → C → k·C → k·C) and decoder (3 transposed convs back to C), LeakyReLU 0.1."""

    def __init__(self, channels: int, factor: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), _act(),
                                     nn.Conv2d(channels, factor, 3, padding=1), _act(),
                                     nn.Conv2d(factor, factor, 3, padding=1), _act())
        self.decoder = nn.Sequential(nn.ConvTranspose2d(factor, factor, 3, padding=1), _act(),
                                     nn.ConvTranspose2d(factor, channels, 3, padding=1), _act(),
                                     nn.ConvTranspose2d(channels, channels, 3, padding=1), _act())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction P(x) (the factor is ``encoder(x)``)."""
        return self.decoder(self.encoder(x))


def translator(channels: int, factor: int) -> nn.Sequential:
    """Three 3×3 convolutions (C_S → C_S → k·C_T → k·C_T), each with BatchNorm and LeakyReLU 0.1."""
    layers: list[nn.Module] = []
    for c_in, c_out in ((channels, channels), (channels, factor), (factor, factor)):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), _act()]
    return nn.Sequential(*layers)


def factor_distance(f_s: torch.Tensor, f_t: torch.Tensor, p: int, reduction: str,
                    variant: str = "paper") -> torch.Tensor:
    """Batch mean of ‖F_T/‖F_T‖ − F_S/‖F_S‖‖_p^p per sample (÷ D for ``mean``); the larger map is pooled.

    ``variant repdistiller``: ``mean_{b,x} |a_T − a_S|^p`` of the normalised channel-means of squares ``a``.
    """
    f_s, f_t = fp32(f_s), fp32(f_t)
    if f_s.shape[2:] != f_t.shape[2:]:
        size = min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3])
        f_s, f_t = F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size)
    if variant == "repdistiller":
        a_s, a_t = (F.normalize(f.pow(2).mean(1).flatten(1), dim=1) for f in (f_s, f_t))
        return (a_t - a_s).abs().pow(p).mean()
    diff = F.normalize(f_t.flatten(1), dim=1) - F.normalize(f_s.flatten(1), dim=1)
    per_sample = diff.abs().pow(p).sum(1)
    if reduction == "mean":
        per_sample = per_sample / diff.shape[1]
    return per_sample.mean()


@register_term("ft")
class FactorTransferTerm(LossTerm):
    """FT: normalised translator(student) factor against the fixed paraphraser's teacher factor (Kim et al.)."""

    Options = FTOptions
    paper = ("Kim, Park, Kwak, Paraphrasing Complex Network: Network Compression via Factor Transfer "
             "(NeurIPS 2018, arXiv 1802.04977)")
    repdistiller = ("variant repdistiller (channel-mean-of-squares factors; the default paper variant normalises the "
                    "whole factor)")

    @classmethod
    def declare(cls, options: FTOptions, nce: NCEConfig) -> Needs:
        return Needs(taps=("stages",), init_phase=options.init_epochs > 0)

    def __init__(self, options: FTOptions, ctx: TermContext) -> None:
        super().__init__(options, ctx)
        s_channels, t_channels = ctx.student_channels["stages"], ctx.teacher_channels["stages"]
        if options.stage is None:
            self.s_index, self.t_index = len(s_channels) - 1, len(t_channels) - 1
        else:
            count = min(len(s_channels), len(t_channels))
            if options.stage > count:
                raise CKTFError(f"{KEY}.stage: stage {options.stage} does not exist; the student has "
                                f"{len(s_channels)} stages and the teacher {len(t_channels)}")
            self.s_index = self.t_index = options.stage - 1
        factor = int(t_channels[self.t_index] * options.rate)
        if factor < 1:
            raise CKTFError(f"{KEY}.rate: {options.rate} × {t_channels[self.t_index]} teacher channels leaves no "
                            "factor channel; raise it")
        self.paraphraser = Paraphraser(t_channels[self.t_index], factor)
        self.paraphraser.requires_grad_(False)  # trained in the init phase only, never by the main optimizer
        self.translator = translator(s_channels[self.s_index], factor)
        self.register_buffer("init_loss", torch.zeros(options.init_epochs))

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            f_t = self.paraphraser.encoder(batch.teacher.stages[self.t_index].detach())
        f_s = self.translator(batch.student.stages[self.s_index])
        o = self.options
        return {"ft": factor_distance(f_s, f_t, o.p, o.reduction, o.variant)}

    def init_phase(self, phase: InitPhase) -> None:
        self.paraphraser.train()
        self.paraphraser.requires_grad_(True)

        def reconstruction(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                t = fp32(phase.teacher(images).stages[self.t_index])
            return F.mse_loss(self.paraphraser(t), t)

        try:
            means = pretrain(phase, self.paraphraser.parameters(), reconstruction, epochs=self.options.init_epochs,
                             lr=self.options.init_lr, key=KEY)
        finally:
            self.paraphraser.requires_grad_(False)
        self.init_loss.copy_(torch.tensor(means, dtype=self.init_loss.dtype))
