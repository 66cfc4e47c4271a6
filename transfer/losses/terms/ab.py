"""``ab``: distillation of activation boundaries (Heo et al., AAAI 2019), with its connector pre-training phase.

For every transferred stage i (student map S_i, teacher map T_i of the same spatial size), a connector
r_i (1×1 convolution + BatchNorm, the paper's) maps the student's map to the teacher's width, and the
alternative (squared-hinge) loss asks each connector response to lie on the teacher neuron's side of the
activation boundary with margin μ:

    L_AB = scale · Σ_i w_i · (1/B) Σ_b ‖ ρ(T_i) ⊙ σ(μ − r_i(S_i)) + (1 − ρ(T_i)) ⊙ σ(μ + r_i(S_i)) ‖²₂

with ρ(x) = 1[x > 0], σ(x) = max(0, x), the squared norm summed over channels and positions, and (as the
authors' and RepDistiller's code) w_i = 2^(i − n + 1) over the n transferred stages (the deepest weighs 1) and
scale = 3/1000. Since the two hinge terms are exclusive per element, this equals
``(r + μ)²·[r > −μ ∧ T ≤ 0] + (r − μ)²·[r ≤ μ ∧ T > 0]``.

**Which weights act when.** Init phase (the paper's: AB initialises the student): for ``init_epochs`` epochs
the student and the connectors minimise L_AB alone (its layer weights w_i and ``scale`` act; β does not), SGD lr
``init_lr`` (:func:`transfer.losses.init_training.pretrain`). Main loop: with ``main_loop true`` (the default,
needed when the transfer has no other signal, γ = 0) β·L_AB stays in the objective and the main optimizer keeps
training the connectors; with ``main_loop false`` the term contributes 0 and β multiplies nothing, as in
RepDistiller, whose main loop trains on CE/KD (here: the other terms) alone and never updates the connectors.

**Variants** (``variant``, the connector rule): ``paper`` puts a connector (1×1 convolution without bias +
BatchNorm, He-initialised) on every stage; ``repdistiller`` is RepDistiller's ``Connector``: none (the identity)
where the student and teacher maps have the same shape, else a 1×1 convolution with bias (PyTorch's default
initialisation) + BatchNorm. Both need equal spatial sizes (RepDistiller's strided connectors are not offered).

**Pre-ReLU responses: not offered.** The paper and RepDistiller read pre-ReLU responses on both sides; the taps
here are stage outputs (after the block's ReLU for the ResNets). Tapping the pre-ReLU node instead is not
possible with the feature taps: the blocks apply their ReLU in place, so the tapped sum already holds the
post-ReLU values, and the stage taps are shared with every other term (CKTF's included). On the teacher side
this is the same boundary (ReLU(x) > 0 ⟺ x > 0); on the student side the connector sees post-ReLU maps. A
convolution + BatchNorm connector can still move a response below 0; the identity connector (``repdistiller``,
equal shapes) cannot, so there the margin on the inactive side is never met: the loss stays at μ² per such
element, with zero gradient once the student's pre-activation is ≤ 0.
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
from transfer.losses.terms.map_pairs import check_distinct_stages, fp32
from transfer.losses.terms.registry import register_term

KEY = "loss.terms.ab"



@dataclass
class ABOptions(TermOptions):
    """Options of ``loss.terms.ab``."""

    weight: float = option(1.0, help="β: weight of the activation-boundary loss in the main loop (RepDistiller "
                           "-b 1, which multiplies nothing there: its main loop has no AB loss)", min=0.0)
    margin: float = option(1.0, help="μ: margin of the squared hinge on the connector's response", min=0.0)
    stages: list[int] | None = option(None, help="1-based stage numbers to transfer, paired student i with "
                                      "teacher i (null: every stage, the ends of the paper's layer groups)", min=1)
    scale: float = option(3e-3, help="constant factor on the sum (the AB authors' and RepDistiller's code: 3/1000)",
                          min=0.0)
    main_loop: bool = option(True, help="keep the loss in the main loop (false: only the init phase transfers, "
                             "as RepDistiller, whose main loop then uses the other terms alone)")
    init_epochs: int = option(2, help="epochs of the init phase training the student and the connectors on the "
                              "AB loss alone (RepDistiller: 30 of a 240-epoch schedule; 0: no init phase)", min=0)
    init_lr: float = option(0.05, help="SGD learning rate of the init phase (momentum 0.9, weight decay 5e-4)",
                            min=0.0)
    variant: Literal["paper", "repdistiller"] = option(
        "paper", help="connector rule. paper: 1×1 conv (no bias) + BatchNorm on every stage; repdistiller: none "
        "where student and teacher maps have one shape, else 1×1 conv with bias + BatchNorm (RepDistiller's)")

    def validate(self) -> None:
        check_distinct_stages(self.stages, f"{KEY}.stages")


def chosen_stages(stages: list[int] | None, count: int, key: str, what: str) -> list[int]:
    """0-based indices of the 1-based ``stages`` (all ``count`` when ``None``); one line if one does not exist."""
    if stages is None:
        return list(range(count))
    missing = [s for s in stages if s > count]
    if missing:
        raise CKTFError(f"{key}: stage {missing[0]} does not exist; {what} has {count} stages (1..{count})")
    return [s - 1 for s in stages]


def boundary_loss(response: torch.Tensor, teacher: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-sample ‖ρ(T)⊙σ(μ−r) + (1−ρ(T))⊙σ(μ+r)‖²₂, batch mean (fp32)."""
    r, active = fp32(response), teacher.detach() > 0
    hinge = torch.where(active, F.relu(margin - r), F.relu(margin + r))
    return hinge.pow(2).flatten(1).sum(1).mean()


def connector(s_channels: int, t_channels: int) -> nn.Sequential:
    """The paper's connector: 1×1 convolution without bias + BatchNorm, He-initialised (fan-out) as its code."""
    conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(t_channels))


def repdistiller_connector(s_channels: int, t_channels: int) -> nn.Module:
    """RepDistiller's rule for maps of one spatial size: the identity for equal widths, else 1×1 conv (bias) + BN."""
    if s_channels == t_channels:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(s_channels, t_channels, kernel_size=1), nn.BatchNorm2d(t_channels))


@register_term("ab")
class ActivationBoundaryTerm(LossTerm):
    """AB: squared hinge on connector(student stage) against the teacher's activation boundaries (Heo et al.)."""

    Options = ABOptions
    paper = ("Heo, Lee, Yun, Choi, Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden "
             "Neurons (AAAI 2019, arXiv 1811.03233)")
    repdistiller = ("variant repdistiller (its connector rule) with main_loop false (AB acts in the init phase only); "
                    "its pre-ReLU taps are not offered")

    @classmethod
    def declare(cls, options: ABOptions, nce: NCEConfig) -> Needs:
        return Needs(taps=("stages",), same_stage_count=True, init_phase=options.init_epochs > 0)

    def __init__(self, options: ABOptions, ctx: TermContext) -> None:
        super().__init__(options, ctx)
        s_channels, t_channels = ctx.student_channels["stages"], ctx.teacher_channels["stages"]
        count = min(len(s_channels), len(t_channels))
        self.stages = chosen_stages(options.stages, count, f"{KEY}.stages", "the student/teacher pair")
        if ctx.student_shapes is not None and ctx.teacher_shapes is not None:
            for i in self.stages:
                s, t = ctx.student_shapes["stages"][i], ctx.teacher_shapes["stages"][i]
                if tuple(s[1:]) != tuple(t[1:]):
                    raise CKTFError(f"{KEY}.stages: stage {i + 1} has student map {tuple(s)} and teacher map "
                                    f"{tuple(t)}; AB's 1×1 connector needs one spatial size, choose other stages")
        n = len(self.stages)
        self.layer_weights = [2.0 ** (k - n + 1) for k in range(n)]
        make = repdistiller_connector if options.variant == "repdistiller" else connector
        self.connectors = nn.ModuleList(make(s_channels[i], t_channels[i]) for i in self.stages)
        self.register_buffer("init_loss", torch.zeros(options.init_epochs))

    def losses(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        """The weighted, scaled loss of every transferred stage (``ab/stage<i>``)."""
        out = {}
        for k, (i, conn) in enumerate(zip(self.stages, self.connectors, strict=True)):
            loss = boundary_loss(conn(batch.student.stages[i]), batch.teacher.stages[i], self.options.margin)
            out[f"ab/stage{i + 1}"] = self.options.scale * self.layer_weights[k] * loss
        return out

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        if not self.options.main_loop:  # a zero on the graph: the step still runs when ab is the only term
            return {"ab": batch.student.stages[self.stages[-1]].float().sum() * 0.0}
        return self.losses(batch)

    def init_phase(self, phase: InitPhase) -> None:
        phase.student.train()
        self.train()

        def objective(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                teacher = phase.teacher(images)
            batch = TransferBatch(phase.student(images), teacher, torch.empty(0), torch.empty(0), None)
            return sum(self.losses(batch).values())

        params = [*phase.student.parameters(), *self.connectors.parameters()]
        means = pretrain(phase, params, objective, epochs=self.options.init_epochs, lr=self.options.init_lr, key=KEY)
        self.init_loss.copy_(torch.tensor(means, dtype=self.init_loss.dtype))
