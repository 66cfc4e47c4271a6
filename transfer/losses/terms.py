"""The terms of the transfer objective, each a module plugged into :class:`TransferTask`.

``L = γ·CE(Y, S) + α1·Σ_m L_MCKT(G_m^S, G_m^T) + α2·L_PCKT(S_h, T_h) + θ·L_KD``  (CKTF eq. 1 and 5)

A method is nothing but its non-zero weights: KD is ``kd`` alone, CRD is ``pckt`` alone, CKTF is
``mckt + pckt``, CKTF+KD adds ``kd``. Terms are looked up in :data:`TERMS` by the weight's name, so adding a
method means adding a term, never an ``if`` on the method name in the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transfer.config import LossConfig
from transfer.errors import CKTFError
from transfer.losses.kd import KDLoss
from transfer.losses.layer_mapping import paired_features
from transfer.losses.nce import NCEObjective
from transfer.losses.projection import ProjectionHead
from transfer.models.taps import TapOutputs


@dataclass
class TransferBatch:
    """Everything a term may look at for one batch."""

    student: TapOutputs
    teacher: TapOutputs
    indices: torch.Tensor
    targets: torch.Tensor
    negatives: torch.Tensor | None


@dataclass
class TermContext:
    """What building a term needs to know: tap widths, the dataset size and the layer mapping."""

    student_channels: dict
    teacher_channels: dict
    num_items: int
    mapping: list[int]


class LossTerm(nn.Module):
    """One weighted term; ``forward`` returns unweighted named losses (summed, then weighted, by the task)."""

    needs_negatives = False

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def fill_banks(self, batch: TransferBatch) -> None:
        """Write this batch's current embeddings into the term's memory banks (no-op without banks)."""


class ContrastivePair(nn.Module):
    """Projection heads for one (student, teacher) feature pair and their NCE objective."""

    def __init__(self, student_dim: int, teacher_dim: int, cfg: LossConfig, num_items: int) -> None:
        super().__init__()
        self.head_student = ProjectionHead(student_dim, cfg.embed_dim, cfg.projection)
        self.head_teacher = ProjectionHead(teacher_dim, cfg.embed_dim, cfg.projection)
        self.objective = NCEObjective(num_items, cfg.embed_dim, cfg.temperature, cfg.nce_momentum)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, indices: torch.Tensor,
                negatives: torch.Tensor) -> torch.Tensor:
        out = self.objective(self.head_student(student), self.head_teacher(teacher), indices, negatives)
        return out.loss

    @torch.no_grad()
    def fill_banks(self, student: torch.Tensor, teacher: torch.Tensor, indices: torch.Tensor) -> None:
        """Overwrite the bank rows of ``indices`` with the heads' current embeddings (``loss.bank_init embed``)."""
        self.objective.bank_student.update(indices, self.head_student(student).float(), momentum=0.0)
        self.objective.bank_teacher.update(indices, self.head_teacher(teacher).float(), momentum=0.0)


class ModuleContrastTerm(LossTerm):
    """L_MCKT: one contrastive objective per module group (stem and every stage), CKTF eq. 3."""

    needs_negatives = True

    def __init__(self, cfg: LossConfig, ctx: TermContext) -> None:
        super().__init__()
        s, t = ctx.student_channels, ctx.teacher_channels
        widths = [("stem", s["stem"], t["stem"])]
        for i, block in enumerate(ctx.mapping):
            teacher_width = t["stages"][i] if block == -1 else t["blocks"][i][block]
            widths.append((f"stage{i + 1}", s["stages"][i], teacher_width))
        self.pairs = nn.ModuleDict({name: ContrastivePair(cs, ct, cfg, ctx.num_items) for name, cs, ct in widths})
        self.register_buffer("mapping", torch.tensor(ctx.mapping, dtype=torch.long))

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        losses = {}
        for name, fs, ft in paired_features(batch.student, batch.teacher, self.mapping.tolist()):
            losses[f"mckt/{name}"] = self.pairs[name](fs, ft, batch.indices, batch.negatives)
        return losses

    @torch.no_grad()
    def fill_banks(self, batch: TransferBatch) -> None:
        for name, fs, ft in paired_features(batch.student, batch.teacher, self.mapping.tolist()):
            self.pairs[name].fill_banks(fs, ft, batch.indices)


class PenultimateContrastTerm(LossTerm):
    """L_PCKT: the contrastive objective on the penultimate vectors (exactly CRD when used alone), eq. 4."""

    needs_negatives = True

    def __init__(self, cfg: LossConfig, ctx: TermContext) -> None:
        super().__init__()
        self.pair = ContrastivePair(ctx.student_channels["penultimate"], ctx.teacher_channels["penultimate"], cfg,
                                    ctx.num_items)

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        return {"pckt": self.pair(batch.student.penultimate, batch.teacher.penultimate, batch.indices,
                                  batch.negatives)}

    @torch.no_grad()
    def fill_banks(self, batch: TransferBatch) -> None:
        self.pair.fill_banks(batch.student.penultimate, batch.teacher.penultimate, batch.indices)


class KDTerm(LossTerm):
    """L_distill = KD on the logits; the student's head has the teacher's (source) classes during transfer."""

    def __init__(self, cfg: LossConfig, ctx: TermContext) -> None:
        super().__init__()
        self.kd = KDLoss(cfg.kd_temperature)

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        return {"kd": self.kd(batch.student.logits, batch.teacher.logits)}


class CrossEntropyTerm(LossTerm):
    """γ·CE with target labels — only when the transfer split is labeled (γ = 0 for unsupervised transfer)."""

    def __init__(self, cfg: LossConfig, ctx: TermContext) -> None:
        super().__init__()

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        if bool((batch.targets < 0).any()):
            raise CKTFError("loss.ce > 0 needs labels, but the transfer split has unlabeled samples (target -1); "
                            "set loss.ce 0")
        return {"ce": F.cross_entropy(batch.student.logits.float(), batch.targets)}


TERMS: dict[str, Callable[[LossConfig, TermContext], LossTerm]] = {
    "ce": CrossEntropyTerm,
    "mckt": ModuleContrastTerm,
    "pckt": PenultimateContrastTerm,
    "kd": KDTerm,
}


def build_terms(cfg: LossConfig, ctx: TermContext) -> tuple[nn.ModuleDict, dict[str, float]]:
    """The terms with a non-zero weight in ``cfg``, and their weights."""
    weights = {name: float(getattr(cfg, name)) for name in TERMS if getattr(cfg, name) > 0}
    return nn.ModuleDict({name: TERMS[name](cfg, ctx) for name in weights}), weights
