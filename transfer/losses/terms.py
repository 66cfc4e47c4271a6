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
from transfer.losses.layer_mapping import LayerMapper, paired_features
from transfer.losses.memory_bank import BANK_DTYPES
from transfer.losses.nce import NCEObjective
from transfer.losses.projection import ProjectionHead
from transfer.losses.stage_features import StageFeatures
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
    """What building a term needs to know: tap widths, the dataset size and the layer mapping.

    ``*_shapes`` (per-sample tap shapes, :meth:`FeatureTaps.shapes`) are needed when a stage feature keeps
    a spatial grid (``loss.stage_pool reference`` with a windowed family); ``*_pool`` is each model's
    reference pooling window from the registry (``None``: global); ``seed`` seeds per-batch random mapping.
    """

    student_channels: dict
    teacher_channels: dict
    num_items: int
    mapping: list[int]
    student_shapes: dict | None = None
    teacher_shapes: dict | None = None
    student_pool: int | None = None
    teacher_pool: int | None = None
    seed: int = 0


class LossTerm(nn.Module):
    """One weighted term; ``forward`` returns unweighted named losses (summed, then weighted, by the task)."""

    needs_negatives = False

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Scalars of the last ``forward`` to log next to the losses but not to add to them (default: none)."""
        return {}

    @torch.no_grad()
    def fill_banks(self, batch: TransferBatch) -> None:
        """Write this batch's current embeddings into the term's memory banks (no-op without banks)."""


class ContrastivePair(nn.Module):
    """Feature reduction, projection heads for one (student, teacher) feature pair, and their NCE objective.

    ``reduce_*`` turn a tapped map into the head's input vector (default: global average pooling, which
    the heads would apply anyway); ``*_dim`` must be the size they produce.
    """

    def __init__(self, student_dim: int, teacher_dim: int, cfg: LossConfig, num_items: int,
                 reduce_student: nn.Module | None = None, reduce_teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.reduce_student = reduce_student or StageFeatures()
        self.reduce_teacher = reduce_teacher or StageFeatures()
        self.head_student = ProjectionHead(student_dim, cfg.embed_dim, cfg.projection)
        self.head_teacher = ProjectionHead(teacher_dim, cfg.embed_dim, cfg.projection)
        self.objective = NCEObjective(num_items, cfg.embed_dim, cfg.temperature, cfg.nce_momentum,
                                      bank_dtype=BANK_DTYPES[cfg.bank_dtype])

    def embed(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm ``[B, d]`` embeddings of both sides."""
        return (self.head_student(self.reduce_student(student)),
                self.head_teacher(self.reduce_teacher(teacher)))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, indices: torch.Tensor,
                negatives: torch.Tensor) -> torch.Tensor:
        out = self.objective(*self.embed(student, teacher), indices, negatives)
        return out.loss

    @torch.no_grad()
    def fill_banks(self, student: torch.Tensor, teacher: torch.Tensor, indices: torch.Tensor) -> None:
        """Overwrite the bank rows of ``indices`` with the heads' current embeddings (``loss.bank_init embed``)."""
        g_student, g_teacher = self.embed(student, teacher)
        self.objective.bank_student.update(indices, g_student.float(), momentum=0.0)
        self.objective.bank_teacher.update(indices, g_teacher.float(), momentum=0.0)


def _feature_dim(reduce: StageFeatures, shapes: dict | None, channels: dict, *path: int | str) -> int:
    """Input size of a head reading the tap at ``path`` (e.g. ``"stages", 2``) through ``reduce``."""
    if reduce.window is None:
        value = channels
        for key in path:
            value = value[key]
        return int(value)
    if shapes is None:
        raise ValueError("TermContext needs student_shapes/teacher_shapes when stage features keep a spatial grid")
    value = shapes
    for key in path:
        value = value[key]
    return reduce.out_dim(tuple(value))


def _check_movable(ctx: TermContext) -> None:
    """A per-batch choice shares one teacher head per stage, so every block of a stage must have one shape."""
    per_stage = ctx.teacher_shapes["blocks"] if ctx.teacher_shapes else ctx.teacher_channels["blocks"]
    if not per_stage:
        raise CKTFError("loss.mapping_schedule per_batch needs the teacher's blocks (taps.blocks)")
    for i, blocks in enumerate(per_stage):
        if len(set(blocks)) > 1:
            raise CKTFError(f"loss.mapping_schedule per_batch shares one teacher head per stage, but the blocks of "
                            f"teacher stage {i + 1} differ in shape ({blocks}); use mapping_schedule once")


class ModuleContrastTerm(LossTerm):
    """L_MCKT: one contrastive objective per module group (stem and every stage), CKTF eq. 3.

    Stage features follow ``loss.stage_norm``/``loss.stage_pool`` (see :mod:`transfer.losses.stage_features`);
    the stem is pooled like the stages but never batch-normalised, as in the reference code. Which teacher
    block pairs with each stage follows ``loss.layer_mapping``/``loss.mapping_schedule`` (see
    :mod:`transfer.losses.layer_mapping`); under a per-batch choice each stage keeps one teacher head and
    one pair of banks, and the chosen block of stage *i* is logged as ``mapping/stage<i>``.
    """

    needs_negatives = True

    def __init__(self, cfg: LossConfig, ctx: TermContext) -> None:
        super().__init__()
        s, t = ctx.student_channels, ctx.teacher_channels
        reference = cfg.stage_pool == "reference"
        window_s = ctx.student_pool if reference else None
        window_t = ctx.teacher_pool if reference else None
        batch_norm = cfg.stage_norm == "batch"
        self.mapper = LayerMapper(cfg.layer_mapping, cfg.mapping_schedule, ctx.seed)
        if self.mapper.moves:
            _check_movable(ctx)
        pairs = {}
        stem_s, stem_t = StageFeatures(False, window_s), StageFeatures(False, window_t)
        pairs["stem"] = ContrastivePair(_feature_dim(stem_s, ctx.student_shapes, s, "stem"),
                                        _feature_dim(stem_t, ctx.teacher_shapes, t, "stem"), cfg, ctx.num_items,
                                        stem_s, stem_t)
        for i, block in enumerate(ctx.mapping):
            red_s, red_t = StageFeatures(batch_norm, window_s), StageFeatures(batch_norm, window_t)
            teacher_path = ("stages", i) if block == -1 else ("blocks", i, block)
            pairs[f"stage{i + 1}"] = ContrastivePair(
                _feature_dim(red_s, ctx.student_shapes, s, "stages", i),
                _feature_dim(red_t, ctx.teacher_shapes, t, *teacher_path), cfg, ctx.num_items, red_s, red_t)
        self.pairs = nn.ModuleDict(pairs)
        self.register_buffer("mapping", torch.tensor(ctx.mapping, dtype=torch.long))
        self._last: list[int] = []

    def _pairs(self, batch: TransferBatch) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        self._last = self.mapper(batch.student, batch.teacher, self.mapping)
        return paired_features(batch.student, batch.teacher, self._last)

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        losses = {}
        for name, fs, ft in self._pairs(batch):
            losses[f"mckt/{name}"] = self.pairs[name](fs, ft, batch.indices, batch.negatives)
        return losses

    def diagnostics(self) -> dict[str, torch.Tensor]:
        if not self.mapper.moves:
            return {}
        return {f"mapping/stage{i + 1}": torch.tensor(float(block)) for i, block in enumerate(self._last)}

    @torch.no_grad()
    def fill_banks(self, batch: TransferBatch) -> None:
        for name, fs, ft in self._pairs(batch):
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
