"""``mckt``: CKTF's intermediate-module terms ``α1·Σ_m L_MCKT(G_m^S, G_m^T)`` — one contrastive objective per
module group (the stem and every stage), CKTF eq. 3.

Stage features follow ``loss.nce.stage_norm``/``stage_pool`` (:mod:`transfer.losses.stage_features`); the stem
is pooled like the stages but never batch-normalised, as in the reference code. Which teacher block pairs with
each student stage follows this term's ``layer_mapping``/``mapping_schedule``
(:mod:`transfer.losses.layer_mapping`): decided once here before training, or on every batch. Under a
per-batch choice each stage keeps one teacher head and one pair of banks, and the chosen block of stage *i* is
logged as ``mapping/stage<i>``. Stages pair one-to-one, so the term declares ``same_stage_count``; any
mapping but ``last`` reads the teacher's blocks (``teacher_blocks``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from transfer.config import NCEConfig
from transfer.config.loader import option
from transfer.errors import CKTFError
from transfer.losses.contrastive import ContrastivePair
from transfer.losses.layer_mapping import LayerMapper, choose_blocks, paired_features, select_teacher_blocks
from transfer.losses.stage_features import StageFeatures
from transfer.losses.terms.base import InitPhase, LossTerm, Needs, TermContext, TermOptions, TransferBatch
from transfer.losses.terms.registry import register_term

KEY = "loss.terms.mckt"


@dataclass
class MCKTOptions(TermOptions):
    """Options of ``loss.terms.mckt`` (the NCE and stage-feature settings are shared: ``loss.nce``)."""

    weight: float = option(0.8, help="α1: weight of the sum of the stem + stage contrastive objectives", min=0.0)
    layer_mapping: Literal["last", "first", "random", "largest", "smallest"] = option(
        "last", help="which teacher block of each stage pairs with the student's last block")
    mapping_schedule: Literal["once", "per_batch"] = option(
        "once", help="when random/largest/smallest choose: once (before training, from one calibration batch "
        "and the untrained student; pooled per-sample cosine) or per_batch (on every training batch with the "
        "current networks, cosine of the whole batch-normalised maps: what the published CKTF code does); the "
        "chosen block of stage i is logged as train/mapping/stage<i>")


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


def initial_mapping(options: MCKTOptions, ctx: TermContext) -> list[int]:
    """The teacher block of each stage to start from (and, for ``mapping_schedule once``, to keep).

    ``-1`` is the teacher stage's output (``last`` without blocks). ``once`` decides here (``largest`` /
    ``smallest`` on ``ctx.calibration``'s batch with the untrained student, ``random`` from a generator seeded
    by ``ctx.seed``). A choice made per batch starts from the stages' last blocks; they only size the heads,
    which fit every block.
    """
    strategy = options.layer_mapping
    if options.mapping_schedule == "per_batch" and strategy in ("random", "largest", "smallest"):
        strategy = "last"
    if strategy == "last" and options.layer_mapping == "last":  # the teacher is tapped without blocks
        return [-1] * len(ctx.student_channels["stages"])
    if strategy in ("largest", "smallest"):
        if ctx.calibration is None:
            raise ValueError(f"layer_mapping {strategy} decided once needs TermContext.calibration")
        student, teacher = ctx.calibration()
        return select_teacher_blocks(strategy, student, teacher)
    counts = [len(blocks) for blocks in ctx.teacher_channels["blocks"]]
    return choose_blocks(strategy, counts, torch.Generator().manual_seed(ctx.seed))


def _check_movable(ctx: TermContext) -> None:
    """A per-batch choice shares one teacher head per stage, so every block of a stage must have one shape."""
    per_stage = ctx.teacher_shapes["blocks"] if ctx.teacher_shapes else ctx.teacher_channels["blocks"]
    if not per_stage:
        raise CKTFError(f"{KEY}.mapping_schedule per_batch needs the teacher's blocks (taps.blocks)")
    for i, blocks in enumerate(per_stage):
        if len(set(blocks)) > 1:
            raise CKTFError(f"{KEY}.mapping_schedule per_batch shares one teacher head per stage, but the blocks of "
                            f"teacher stage {i + 1} differ in shape ({blocks}); use mapping_schedule once")


def _check_per_batch_shapes(strategy: str, ctx: TermContext) -> None:
    """``largest``/``smallest`` per batch compare whole maps, so each stage's maps need one spatial size."""
    if strategy not in ("largest", "smallest") or ctx.student_shapes is None or ctx.teacher_shapes is None:
        return
    for i, (s_shape, blocks) in enumerate(zip(ctx.student_shapes["stages"], ctx.teacher_shapes["blocks"],
                                              strict=True)):
        for t_shape in blocks:
            if tuple(s_shape[1:]) != tuple(t_shape[1:]):
                raise CKTFError(f"{KEY}.mapping_schedule per_batch with layer_mapping {strategy} compares whole "
                                f"maps, but stage {i + 1} has student map {tuple(s_shape)} and teacher block "
                                f"{tuple(t_shape)}; use mapping_schedule once")


@register_term("mckt")
class ModuleContrastTerm(LossTerm):
    """L_MCKT: one contrastive objective per module group (stem and every stage), CKTF eq. 3."""

    Options = MCKTOptions
    paper = "CKTF (Zhao, Chen, Zhao, ICASSP 2023, arXiv 2303.07599), L_MCKT, eq. 2-3, layer mapping §3.3"

    @classmethod
    def declare(cls, options: MCKTOptions, nce: NCEConfig) -> Needs:
        return Needs(taps=("stem", "stages"), teacher_blocks=options.layer_mapping != "last", same_stage_count=True,
                     negatives=True, memory_banks=True, init_phase=nce.bank_init == "embed")

    def __init__(self, options: MCKTOptions, ctx: TermContext) -> None:
        super().__init__(options, ctx)
        nce = ctx.nce
        s, t = ctx.student_channels, ctx.teacher_channels
        reference = nce.stage_pool == "reference"
        window_s = ctx.student_pool if reference else None
        window_t = ctx.teacher_pool if reference else None
        batch_norm = nce.stage_norm == "batch"
        self.mapper = LayerMapper(options.layer_mapping, options.mapping_schedule, ctx.seed)
        if self.mapper.moves:
            _check_movable(ctx)
            _check_per_batch_shapes(options.layer_mapping, ctx)
        mapping = initial_mapping(options, ctx)
        pairs = {}
        stem_s, stem_t = StageFeatures(False, window_s), StageFeatures(False, window_t)
        pairs["stem"] = ContrastivePair(_feature_dim(stem_s, ctx.student_shapes, s, "stem"),
                                        _feature_dim(stem_t, ctx.teacher_shapes, t, "stem"), nce, ctx.num_items,
                                        stem_s, stem_t)
        for i, block in enumerate(mapping):
            red_s, red_t = StageFeatures(batch_norm, window_s), StageFeatures(batch_norm, window_t)
            teacher_path = ("stages", i) if block == -1 else ("blocks", i, block)
            pairs[f"stage{i + 1}"] = ContrastivePair(
                _feature_dim(red_s, ctx.student_shapes, s, "stages", i),
                _feature_dim(red_t, ctx.teacher_shapes, t, *teacher_path), nce, ctx.num_items, red_s, red_t)
        self.pairs = nn.ModuleDict(pairs)
        self.register_buffer("mapping", torch.tensor(mapping, dtype=torch.long))
        self._last: list[int] = []
        self._fixed: list[int] | None = None  # a mapping that never moves, read once (not once per step)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._fixed = None

    def _pairs(self, batch: TransferBatch) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        if self.mapper.moves:
            self._last = self.mapper(batch.student, batch.teacher, self.mapping)
        else:
            if self._fixed is None:
                self._fixed = self.mapping.tolist()
            self._last = self._fixed
        return paired_features(batch.student, batch.teacher, self._last)

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        losses = {}
        for name, fs, ft in self._pairs(batch):
            losses[f"mckt/{name}"] = self.pairs[name](fs, ft, batch.indices, batch.negatives)
        return losses

    def diagnostics(self) -> dict[str, torch.Tensor]:
        if not self.mapper.moves:
            return {}
        device = self.mapping.device  # the losses' device: the engine stacks diagnostics with them
        return {f"mapping/stage{i + 1}": torch.tensor(float(block), device=device)
                for i, block in enumerate(self._last)}

    @torch.no_grad()
    def fill_banks(self, batch: TransferBatch) -> None:
        """Write this batch's current embeddings into every pair's banks (``loss.nce.bank_init embed``)."""
        for name, fs, ft in self._pairs(batch):
            self.pairs[name].fill_banks(fs, ft, batch.indices)

    def init_phase(self, phase: InitPhase) -> None:
        for batch in phase.eval_batches():
            self.fill_banks(batch)

    def metadata(self) -> dict[str, str]:
        schedule = self.options.mapping_schedule
        return {"layer_mapping": json.dumps(self.mapping.tolist() if schedule == "once" else schedule)}
