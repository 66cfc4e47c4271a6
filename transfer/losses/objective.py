"""Building the transfer objective for a tapped (student, teacher) pair: layer mapping, head sizes, terms.

``cktf transfer`` and the Python API (:class:`transfer.api.CKTFLoss`) both build their loss terms here, from
one calibration batch of real inputs, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from transfer.config import LossConfig
from transfer.errors import CKTFError
from transfer.losses.layer_mapping import check_stage_counts, select_teacher_blocks
from transfer.losses.terms import TermContext, build_terms
from transfer.models.taps import FeatureTaps


@dataclass
class Objective:
    """The weighted terms of a transfer objective and the teacher block paired with each student stage."""

    terms: nn.ModuleDict
    weights: dict[str, float]
    mapping: list[int]


def tap_shapes(taps: FeatureTaps, shape: tuple[int, ...], role: str, name: str) -> dict:
    """Per-sample tap shapes of ``taps`` on ``shape`` inputs; a network that cannot take them is one line."""
    try:
        return taps.shapes(tuple(shape))
    except RuntimeError as err:
        size = "x".join(str(s) for s in shape)
        raise CKTFError(f"{role} {name} cannot run on {size} images (check data.image_size and the channels): "
                        f"{' '.join(str(err).split())[:200]}") from None


def initial_mapping(cfg: LossConfig, student: FeatureTaps, teacher: FeatureTaps, calibration: torch.Tensor,
                    seed: int) -> list[int]:
    """The teacher block of each stage to start from (and, for ``mapping_schedule once``, to keep).

    ``once`` decides here, on ``calibration`` with the untrained student. A choice made per batch starts from
    the stages' last blocks; they only size the heads, which fit every block.
    """
    strategy = cfg.layer_mapping
    if cfg.mapping_schedule == "per_batch" and strategy in ("random", "largest", "smallest"):
        strategy = "last"
    student.eval()
    with torch.no_grad():
        return select_teacher_blocks(strategy, student(calibration), teacher(calibration),
                                     torch.Generator().manual_seed(seed))


def _check_per_batch_shapes(strategy: str, student: dict, teacher: dict) -> None:
    """``largest``/``smallest`` per batch compare whole maps, so each stage's maps need one spatial size."""
    if strategy not in ("largest", "smallest") or not teacher["blocks"]:
        return
    for i, (s_shape, blocks) in enumerate(zip(student["stages"], teacher["blocks"], strict=True)):
        for t_shape in blocks:
            if tuple(s_shape[1:]) != tuple(t_shape[1:]):
                raise CKTFError(f"loss.mapping_schedule per_batch with loss.layer_mapping {strategy} compares whole "
                                f"maps, but stage {i + 1} has student map {tuple(s_shape)} and teacher block "
                                f"{tuple(t_shape)}; use mapping_schedule once")


def build_objective(cfg: LossConfig, student: FeatureTaps, teacher: FeatureTaps, num_items: int,
                    calibration: torch.Tensor, *, seed: int = 0, pools: tuple[int | None, int | None] = (None, None),
                    names: tuple[str, str] = ("student", "teacher")) -> Objective:
    """The terms with a non-zero weight in ``cfg``, sized for ``student``/``teacher`` on ``calibration``'s inputs.

    Args:
        cfg: loss weights and options (``LossConfig``).
        student: the tapped student (trainable).
        teacher: the tapped, frozen teacher; with blocks unless ``cfg.layer_mapping`` is ``last``.
        num_items: dataset size (rows of every memory bank; batches must carry indices below it).
        calibration: a ``[B, C, H, W]`` batch of real inputs (what the networks will see) that sizes the heads
            and decides the layer mapping.
        seed: seeds the layer mapping's random choices.
        pools: each side's reference pooling window (``loss.stage_pool reference``), ``None`` for global.
        names: the networks' names in error messages.

    Returns:
        The :class:`Objective` (terms, weights, layer mapping).
    """
    if calibration.dim() != 4 or len(calibration) == 0:
        raise ValueError(f"calibration must be a non-empty [B, C, H, W] batch, got shape {tuple(calibration.shape)}")
    if cfg.mckt > 0:
        check_stage_counts(len(student.spec.stages), len(teacher.spec.stages), *names)
    shape = tuple(calibration.shape[1:])
    student_shapes = tap_shapes(student, shape, "student", names[0])
    teacher_shapes = tap_shapes(teacher, shape, "teacher", names[1])
    mapping = initial_mapping(cfg, student, teacher, calibration, seed)
    if cfg.mckt > 0 and cfg.mapping_schedule == "per_batch":
        _check_per_batch_shapes(cfg.layer_mapping, student_shapes, teacher_shapes)
    ctx = TermContext(student.channels(shape), teacher.channels(shape), num_items, mapping,
                      student_shapes=student_shapes, teacher_shapes=teacher_shapes, student_pool=pools[0],
                      teacher_pool=pools[1], seed=seed)
    terms, weights = build_terms(cfg, ctx)
    return Objective(terms, weights, mapping)
