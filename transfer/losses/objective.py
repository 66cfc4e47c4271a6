"""The loss terms for a tapped (student, teacher) pair: the steps ``cktf transfer`` and the Python API
(:class:`transfer.api.CKTFLoss`) both take, so the two cannot drift apart.

1. :func:`resolve_objective`: validate ``loss.terms`` against the term registry (no network yet), record every
   term's resolved options and collect what the terms declare they need;
2. :func:`tap_pair`: the tapped student and the frozen tapped teacher (with its per-block taps when a term
   declares ``teacher_blocks``; stage counts checked when one declares ``same_stage_count``);
3. :func:`term_context`: tap widths and shapes at the input size (a network that cannot run at it is one
   line), the reference pooling windows, the seed and a lazy calibration batch;
4. :func:`~transfer.losses.terms.build_terms` (``loss.nce`` handed to every term): the terms with a positive
   weight.

Nothing here looks at a term's name; every decision follows the declared needs. Decisions a term makes before
training (e.g. ``mckt``'s layer mapping) are the term's own, from the context.

Example::

    needs = resolve_objective(loss)
    student, teacher = tap_pair(student_model, s_spec, teacher_model, t_spec, needs)
    ctx = term_context(student, teacher, (3, 32, 32), num_items, lambda: images[:64], seed=0)
    terms, weights = build_terms(loss, ctx)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from transfer.config import LossConfig
from transfer.engine.frozen import Frozen, freeze
from transfer.errors import CKTFError
from transfer.losses.layer_mapping import check_stage_counts
from transfer.losses.terms import TermContext, combined_needs, options_dict, resolve_terms
from transfer.models.taps import FeatureTaps, TapOutputs, TapSpec


def resolve_objective(loss: LossConfig) -> dict[str, list[str]]:
    """Validate ``loss.terms`` and replace each entry by the term's full resolved options (what ``config.yaml``
    records); returns each declared need with the terms declaring it (e.g. ``{"negatives": ["mckt", "pckt"]}``).

    Raises:
        CKTFError: an unknown term or option, a bad value, or no term with a positive weight (one line).
    """
    specs = resolve_terms(loss)
    loss.terms = {spec.name: options_dict(spec.options) for spec in specs}
    return combined_needs(specs)


def tap_pair(student: nn.Module, student_spec: TapSpec, teacher: nn.Module, teacher_spec: TapSpec,
             needs: dict[str, list[str]],
             names: tuple[str, str] = ("student", "teacher")) -> tuple[FeatureTaps, Frozen]:
    """The tapped student and the frozen tapped teacher (the teacher's parameters are frozen in place).

    The teacher is traced with its per-block outputs only when a term needs them; when a term pairs stages
    one-to-one, the two networks must have as many stages (one line naming the terms and ``names``).
    """
    tapped = FeatureTaps(student, student_spec)
    frozen = freeze(FeatureTaps(teacher, teacher_spec, with_blocks="teacher_blocks" in needs))
    if "same_stage_count" in needs:
        terms = ", ".join(f"loss.terms.{name}" for name in needs["same_stage_count"])
        check_stage_counts(len(student_spec.stages), len(teacher_spec.stages), *names, terms)
    return tapped, frozen


def tap_shapes(taps: FeatureTaps, shape: tuple[int, ...], role: str, name: str) -> dict:
    """Per-sample tap shapes of ``taps`` on ``shape`` inputs; a network that cannot take them is one line."""
    try:
        return taps.shapes(tuple(shape))
    except RuntimeError as err:
        size = "x".join(str(s) for s in shape)
        raise CKTFError(f"{role} {name} cannot run on {size} images (check data.image_size and the channels): "
                        f"{' '.join(str(err).split())[:200]}") from None


def term_context(student: FeatureTaps, teacher: Frozen, shape: tuple[int, ...], num_items: int,
                 calibration: Callable[[], torch.Tensor], *, seed: int = 0,
                 pools: tuple[int | None, int | None] = (None, None),
                 names: tuple[str, str] = ("student", "teacher")) -> TermContext:
    """What building the terms may use: tap widths and per-sample shapes of both networks on ``shape``
    (C, H, W) inputs, the pool size, pooling windows, the seed and a calibration batch.

    Args:
        student: the tapped student (untrained).
        teacher: the frozen tapped teacher.
        shape: the input shape every item has (C, H, W).
        num_items: the dataset size (memory-bank rows; batch indices must lie below it).
        calibration: returns a ``[B, C, H, W]`` batch of real inputs; called at most once, and only when a term
            decides something on it (``ctx.calibration()``: both networks' taps, the student in eval mode).
        seed: the run's seed (for the terms' own generators).
        pools: each side's reference pooling window (``loss.nce.stage_pool reference``), ``None`` for global.
        names: the networks' names in error messages.
    """
    taps = teacher.module
    student_shapes = tap_shapes(student, shape, "student", names[0])
    teacher_shapes = tap_shapes(taps, shape, "teacher", names[1])
    cache: list[tuple[TapOutputs, TapOutputs]] = []

    def calibrate() -> tuple[TapOutputs, TapOutputs]:
        if not cache:
            batch = calibration()
            was_training = student.training
            student.eval()
            with torch.no_grad():
                cache.append((student(batch), teacher(batch)))
            student.train(was_training)
        return cache[0]

    return TermContext(student.channels(shape), taps.channels(shape), num_items, student_shapes=student_shapes,
                       teacher_shapes=teacher_shapes, student_pool=pools[0], teacher_pool=pools[1], seed=seed,
                       calibration=calibrate)
