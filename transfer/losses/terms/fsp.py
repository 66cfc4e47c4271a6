"""``fsp``: flow of solution procedure (Yim, Joo, Bae, Kim, CVPR 2017), with its pre-training phase.

The FSP matrix of a section joins the map entering it, F1 (h×w×m), and the map leaving it, F2 (h×w×n):

    G_{i,j} = Σ_{s=1..h} Σ_{t=1..w} F1_{s,t,i} · F2_{s,t,j} / (h·w)

and the loss is L_FSP = (1/B) Σ_b Σ_k λ_k ‖G_k^T − G_k^S‖²₂ over the sections k, with equal λ_k = 1 (the
paper's). A section here is a stage: its entering map is the previous stage's output (the stem's for stage 1)
and its leaving map is its output, so student and teacher must have the same widths at both ends of every
transferred stage. When the two ends differ in spatial size (a stride-2 stage), the larger map is average-pooled
to the smaller (as RepDistiller).

**Which weights act when.** Init phase (the paper's stage 1): for ``init_epochs`` epochs the student minimises
L_FSP alone, unweighted (β does not act), SGD lr ``init_lr``. The paper then trains on the main task only
(stage 2), as RepDistiller, whose main loop has no FSP loss: its β = 50 (``-b 50``) multiplies nothing, so
RepDistiller's FSP is this term with ``main_loop false``. Here the term keeps β·L_FSP in the main loop by default
(``main_loop true``: the transfer has no labels, γ = 0, and needs a signal), and ``main_loop false`` contributes
0 after the init phase.

``reduction mean`` (the default) averages over the m·n entries of each matrix, as RepDistiller (equal to it
within float64 rounding); ``reduction sum`` is the paper's squared norm. The matrices are computed in fp32 with
autocast off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from transfer.config import NCEConfig
from transfer.config.loader import option
from transfer.errors import CKTFError
from transfer.losses.init_training import pretrain
from transfer.losses.terms.base import InitPhase, LossTerm, Needs, TermContext, TermOptions, TransferBatch
from transfer.losses.terms.map_pairs import check_distinct_stages, fp32, full_precision
from transfer.losses.terms.registry import register_term
from transfer.models.taps import TapOutputs

KEY = "loss.terms.fsp"



@dataclass
class FSPOptions(TermOptions):
    """Options of ``loss.terms.fsp``."""

    weight: float = option(50.0, help="β: weight of the FSP loss in the main loop (RepDistiller's scripts: -b 50, "
                           "which multiplies nothing there: its main loop has no FSP loss)", min=0.0)
    stages: list[int] | None = option(None, help="1-based stages whose FSP matrix (stage input × stage output) "
                                      "is matched (null: every stage)", min=1)
    reduction: Literal["mean", "sum"] = option(
        "mean", help="per matrix: mean over its entries (RepDistiller) or sum (the paper's squared norm)")
    main_loop: bool = option(True, help="keep the loss in the main loop (false: only the init phase transfers, "
                             "the paper's two stages)")
    init_epochs: int = option(2, help="epochs of the init phase training the student on the FSP loss alone "
                              "(RepDistiller: 30 of a 240-epoch schedule; 0: no init phase)", min=0)
    init_lr: float = option(0.05, help="SGD learning rate of the init phase (momentum 0.9, weight decay 5e-4)",
                            min=0.0)

    def validate(self) -> None:
        check_distinct_stages(self.stages, f"{KEY}.stages")


def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """``[B, m, n]`` FSP matrices of ``bottom`` [B, m, h, w] and ``top`` [B, n, h', w'] (larger map pooled), fp32.

    Autocast is off: the sum over h·w can overflow fp16 before the division.
    """
    bottom, top = fp32(bottom), fp32(top)
    with full_precision(bottom):
        if bottom.shape[2:] != top.shape[2:]:
            size = min(bottom.shape[2], top.shape[2]), min(bottom.shape[3], top.shape[3])
            bottom, top = F.adaptive_avg_pool2d(bottom, size), F.adaptive_avg_pool2d(top, size)
        return torch.einsum("bihw,bjhw->bij", bottom, top) / (bottom.shape[2] * bottom.shape[3])


def _section(taps: TapOutputs, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (taps.stem if i == 0 else taps.stages[i - 1]), taps.stages[i]


@register_term("fsp")
class FSPTerm(LossTerm):
    """FSP: squared distance between student and teacher FSP matrices of every stage (Yim et al.)."""

    Options = FSPOptions
    paper = ("Yim, Joo, Bae, Kim, A Gift from Knowledge Distillation: Fast Optimization, Network Minimization "
             "and Transfer Learning (CVPR 2017)")
    repdistiller = "equal with main_loop false (FSP acts in the init phase only; β multiplies nothing)"

    @classmethod
    def declare(cls, options: FSPOptions, nce: NCEConfig) -> Needs:
        return Needs(taps=("stem", "stages"), same_stage_count=True, init_phase=options.init_epochs > 0)

    def __init__(self, options: FSPOptions, ctx: TermContext) -> None:
        super().__init__(options, ctx)
        s, t = ctx.student_channels, ctx.teacher_channels
        count = min(len(s["stages"]), len(t["stages"]))
        if options.stages is None:
            self.stages = list(range(count))
        else:
            missing = [k for k in options.stages if k > count]
            if missing:
                raise CKTFError(f"{KEY}.stages: stage {missing[0]} does not exist; the student/teacher pair has "
                                f"{count} stages (1..{count})")
            self.stages = [k - 1 for k in options.stages]
        for i in self.stages:
            s_ends = (s["stem"] if i == 0 else s["stages"][i - 1], s["stages"][i])
            t_ends = (t["stem"] if i == 0 else t["stages"][i - 1], t["stages"][i])
            if s_ends != t_ends:
                raise CKTFError(f"{KEY}.stages: stage {i + 1} maps {s_ends[0]} → {s_ends[1]} channels in the student "
                                f"but {t_ends[0]} → {t_ends[1]} in the teacher; FSP matrices need equal widths, "
                                "choose other stages")
        self.register_buffer("init_loss", torch.zeros(options.init_epochs))

    def losses(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        """The loss of every transferred stage (``fsp/stage<i>``)."""
        out = {}
        for i in self.stages:
            g_s = fsp_matrix(*_section(batch.student, i))
            g_t = fsp_matrix(*(x.detach() for x in _section(batch.teacher, i)))
            sq = (g_t - g_s).pow(2)
            out[f"fsp/stage{i + 1}"] = sq.mean() if self.options.reduction == "mean" else sq.sum((1, 2)).mean()
        return out

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        if not self.options.main_loop:  # a zero on the graph: the step still runs when fsp is the only term
            return {"fsp": batch.student.stages[self.stages[-1]].float().sum() * 0.0}
        return self.losses(batch)

    def init_phase(self, phase: InitPhase) -> None:
        phase.student.train()

        def objective(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                teacher = phase.teacher(images)
            batch = TransferBatch(phase.student(images), teacher, torch.empty(0), torch.empty(0), None)
            return sum(self.losses(batch).values())

        means = pretrain(phase, phase.student.parameters(), objective, epochs=self.options.init_epochs,
                         lr=self.options.init_lr, key=KEY)
        self.init_loss.copy_(torch.tensor(means, dtype=self.init_loss.dtype))
