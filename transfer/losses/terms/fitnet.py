"""``fitnet``: FitNets' hint, a student stage regressed onto a teacher stage, with FitNets' hint pre-training.

Romero et al. train in two stages: first the student's layers up to its *guided* layer and a regressor ``r``
minimise the hint loss against the teacher's *hint* layer ``u_h``, ``½‖u_h(x) − r(v_g(x))‖²`` (their eq. 3);
then the whole student is trained. Here the first stage is this term's initialisation phase (``init_epochs``
epochs over the transfer pool, only the guided part of the student and the regressor are optimised, the rest
of the student is not even run), and the hint stays in the main loop with weight β, as in CRD's RepDistiller
(``-b 100``) on which the CKTF code builds. FitNets' second stage trains with KD on labels; add the ``kd`` term
(and ``ce`` on a labeled split) for that.

The loss is the mean squared error over every element (``mean_{b,c,y,x} (r(v_g) − u_h)²``), RepDistiller's
reduction: FitNets' ``½‖·‖²`` per sample is this times ``C·H·W/2``, a constant absorbed by the weight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from transfer.config import NCEConfig
from transfer.config.loader import option
from transfer.errors import CKTFError
from transfer.losses.init_training import pretrain
from transfer.losses.terms.base import InitPhase, LossTerm, Needs, TermContext, TermOptions, TransferBatch
from transfer.losses.terms.registry import register_term

KEY = "loss.terms.fitnet"


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 (fp16/bf16 under autocast are widened; fp64, e.g. a gradient check, is kept)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@dataclass
class FitNetOptions(TermOptions):
    """Options of ``loss.terms.fitnet``."""

    weight: float = option(100.0, help="β: weight of the hint loss in the main loop (RepDistiller: 100)", min=0.0)
    guided_stage: int = option(2, help="the student stage (1 = first) regressed onto the hint (FitNets' guided "
                               "layer; RepDistiller's hint_layer 2)", min=1)
    hint_stage: int = option(2, help="the teacher stage (1 = first) giving the hint", min=1)
    init_epochs: int = option(2, help="epochs of hint pre-training (FitNets' stage 1: guided part of the student "
                              "+ regressor) before the main loop; 0 skips it (RepDistiller: no pre-training)",
                              min=0)
    init_lr: float = option(0.05, help="SGD learning rate of the hint pre-training (momentum 0.9, weight decay "
                            "5e-4, as RepDistiller's init phases)", min=0.0)


def _stage_shape(shapes: dict | None, side: str, stage: int, option_name: str) -> tuple[int, ...]:
    """The per-sample ``(C, H, W)`` of stage ``stage`` (1-based) on ``side``, or one line naming the option."""
    if shapes is None:
        raise ValueError("the fitnet term needs TermContext.student_shapes and teacher_shapes to size its regressor")
    stages = shapes["stages"]
    if stage > len(stages):
        raise CKTFError(f"{KEY}.{option_name} is {stage}, but the {side} has {len(stages)} stage(s); choose "
                        f"1..{len(stages)}")
    shape = tuple(stages[stage - 1])
    if len(shape) != 3:
        raise CKTFError(f"{KEY}.{option_name}: {side} stage {stage} has per-sample shape {shape}, but a hint "
                        "needs a [C, H, W] feature map")
    return shape


def hint_regressor(student: tuple[int, int, int], teacher: tuple[int, int, int]) -> nn.Module:
    """Conv regressor from a ``student`` (C, H, W) map to the ``teacher``'s, then BatchNorm and ReLU.

    Equal sizes: 1×1 conv; student twice as large: 3×3 conv stride 2; half as large: 4×4 transposed conv
    stride 2 (both RepDistiller's ``ConvReg``); otherwise larger: FitNets' valid conv with kernel
    ``(H_s − H_t + 1, W_s − W_t + 1)``. The ReLU gives the regressor the teacher stage's non-linearity, as
    FitNets requires. Raises ``CKTFError`` when the student map is smaller and not exactly half.
    """
    (cs, hs, ws), (ct, ht, wt) = student, teacher
    if (hs, ws) == (2 * ht, 2 * wt):
        conv = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
    elif (2 * hs, 2 * ws) == (ht, wt):
        conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, kernel_size=(hs - ht + 1, ws - wt + 1))
    else:
        raise CKTFError(f"{KEY}: the guided student map {student} cannot be regressed onto the teacher's hint map "
                        f"{teacher} (the student map must be as large, twice as large, exactly half, or larger); "
                        f"choose another {KEY}.guided_stage or {KEY}.hint_stage")
    return nn.Sequential(conv, nn.BatchNorm2d(ct), nn.ReLU())


@register_term("fitnet")
class FitNetTerm(LossTerm):
    """FitNets' hint: ``mean (r(S_g) − T_h)²`` between the regressed student stage and the teacher stage.

    ``S_g`` is student stage ``guided_stage``, ``T_h`` teacher stage ``hint_stage`` and ``r`` a conv regressor
    (:func:`hint_regressor`) trained with the student. The initialisation phase pre-trains the student up to
    ``S_g`` and ``r`` on the same loss for ``init_epochs`` epochs (FitNets' stage 1).
    """

    Options = FitNetOptions
    paper = ("FitNets: Hints for Thin Deep Nets (Romero, Ballas, Kahou, Chassang, Gatta, Bengio, ICLR 2015, "
             "arXiv 1412.6550)")
    repdistiller = "equal (HintLoss through ConvReg); no variant. RepDistiller has no hint pre-training: init_epochs 0"

    @classmethod
    def declare(cls, options: FitNetOptions, nce: NCEConfig) -> Needs:
        return Needs(taps=("stages",), init_phase=options.init_epochs > 0)

    def __init__(self, options: FitNetOptions, ctx: TermContext) -> None:
        super().__init__(options, ctx)
        student = _stage_shape(ctx.student_shapes, "student", options.guided_stage, "guided_stage")
        teacher = _stage_shape(ctx.teacher_shapes, "teacher", options.hint_stage, "hint_stage")
        self.regressor = hint_regressor(student, teacher)  # type: ignore[arg-type]
        self.init_losses: list[float] = []  # mean hint loss of each pre-training epoch (not checkpointed)

    def hint_loss(self, guided: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        """``mean (r(guided) − hint)²`` in fp32; the teacher's hint is detached."""
        return F.mse_loss(self.regressor(_wide(guided)), _wide(hint.detach()))

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        o = self.options
        return {"fitnet": self.hint_loss(batch.student.stages[o.guided_stage - 1],
                                         batch.teacher.stages[o.hint_stage - 1])}

    def init_phase(self, phase: InitPhase) -> None:
        """FitNets' stage 1: SGD on the hint loss over the student up to its guided stage and the regressor.

        Only the student's guided part is run (a graph pruned at the guided stage), so layers after it keep
        their weights and BatchNorm statistics; the teacher stays frozen in evaluation mode.
        """
        o = self.options
        taps = phase.student
        guided = _truncated(taps, taps.spec.stages[o.guided_stage - 1])
        if phase.train_loader is None:
            phase = replace(phase, train_loader=phase.eval_loader, augment=None)
        guided.train()
        self.regressor.train()

        def hint_loss(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                hint = phase.teacher(images).stages[o.hint_stage - 1]
            return self.hint_loss(guided(images)["guided"], hint)

        self.init_losses = pretrain(phase, [*guided.parameters(), *self.regressor.parameters()], hint_loss,
                                    epochs=o.init_epochs, lr=o.init_lr, key=KEY)


def _truncated(taps: nn.Module, node: str) -> nn.Module:
    """The tapped student's model pruned at ``node`` (a node or module path): returns ``{"guided": map}``.

    The pruned graph holds only the modules the guided stage depends on (FitNets' ``W_Guided``), sharing their
    parameters and buffers with the student.
    """
    model = taps.model
    saved = [(m, m.training) for m in model.modules()]
    try:  # tracing toggles train/eval on every module
        return create_feature_extractor(model, return_nodes={node: "guided"})
    finally:
        for module, mode in saved:
            module.training = mode
