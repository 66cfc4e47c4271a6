"""The contract of a loss term, what a term declares it needs, and what the transfer stage hands it.

The transfer objective is a weighted sum ``L = Σ_t w_t · Σ_k L_{t,k}`` of terms. A method is one file under
``transfer/losses/terms/`` holding a :class:`LossTerm` subclass registered by name
(:func:`transfer.losses.terms.registry.register_term`) and its own options dataclass (a :class:`TermOptions`
subclass: ``weight`` plus whatever the method needs), and one YAML naming it under ``loss.terms``. The NCE
settings shared by contrastive terms (d, τ, momentum, heads, banks, stage features) are ``loss.nce``
(:class:`transfer.config.NCEConfig`), handed to every term as ``ctx.nce``.

**What a term declares** (:meth:`LossTerm.declare`, from its options alone, before any network exists) and
what the stage, task and engine then provide — none of them ever looks at a term's name:

- ``taps``: the tapped outputs it reads (``stem``, ``stages``, ``penultimate``, ``logits``); every network is
  tapped for all four, so this is documentation (``cktf methods`` shows it);
- ``teacher_blocks``: the teacher's per-block outputs (``TapOutputs.blocks``, for layer mapping); the
  teacher is traced with blocks only when some term asks;
- ``same_stage_count``: stage-wise pairs, so student and teacher must have as many stages (checked before
  the run starts, naming the term);
- ``negatives``: ``TransferBatch.negatives``, K dataset indices per anchor (or shared by the batch) from the
  negative sampler (``sampler.*``), which is built only when some term asks;
- ``memory_banks``: the term keeps rows for every item of the transfer pool (``ctx.num_items``);
- ``labels``: real class targets in ``TransferBatch.targets``; a transfer split with unlabeled items
  (target −1) is refused before the run starts, with one line naming the term;
- ``init_phase``: :meth:`LossTerm.init_phase` runs once before the first epoch of a fresh run (not on
  ``--resume``: whatever it sets up must be part of the term's state, which the checkpoint holds). It gets an
  :class:`InitPhase`: the networks, the device, the pool in evaluation order and the training loader, so a
  pre-training phase (FitNet's hint stage, AB, FT, FSP) can run its own optimisation there.

**Extra trainable modules** (projection heads, a FitNet regressor, a factor transfer's paraphraser) are plain
submodules created in ``__init__`` from ``ctx`` (tap widths and per-sample shapes): the task's one optimizer
trains them with the student and the checkpoint saves them with the term's buffers (memory banks, counters).
A submodule wrapped in :class:`transfer.engine.frozen.Frozen` is neither trained nor saved.

Example — a whole method in one file, then ``loss: {terms: {l2: {weight: 1.0, normalize: false}}}``::

    @dataclass
    class L2Options(TermOptions):
        normalize: bool = option(True, help="L2-normalise both vectors before comparing them")

    @register_term("l2")
    class L2Term(LossTerm):
        \"\"\"Mean squared distance between projected student and teacher penultimate vectors.\"\"\"

        Options = L2Options
        paper = "FitNets (Romero et al., ICLR 2015), on the penultimate layer"

        @classmethod
        def declare(cls, options: L2Options, nce: NCEConfig) -> Needs:
            return Needs(taps=("penultimate",))

        def __init__(self, options: L2Options, ctx: TermContext) -> None:
            super().__init__(options, ctx)
            self.regressor = nn.Linear(ctx.student_channels["penultimate"], ctx.teacher_channels["penultimate"])

        def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
            s, t = self.regressor(batch.student.penultimate), batch.teacher.penultimate
            if self.options.normalize:
                s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
            return {"l2": F.mse_loss(s, t)}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from transfer.config import NCEConfig
from transfer.config.loader import option
from transfer.models.taps import TapOutputs

TAP_NAMES = ("stem", "stages", "penultimate", "logits")


@dataclass
class TermOptions:
    """Options every term has; a term's own dataclass subclasses this (and may change ``weight``'s default)."""

    weight: float = option(1.0, help="weight of the term in the objective (0: the term is not built)", min=0.0)


@dataclass(frozen=True)
class Needs:
    """What a term needs from the stage; see the module docstring for what each flag makes the stage do."""

    taps: tuple[str, ...] = ()
    teacher_blocks: bool = False
    same_stage_count: bool = False
    negatives: bool = False
    memory_banks: bool = False
    labels: bool = False
    init_phase: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.taps) - set(TAP_NAMES)
        if unknown:
            raise ValueError(f"Needs.taps: unknown tap(s) {sorted(unknown)}; expected some of {TAP_NAMES}")

    def flags(self) -> list[str]:
        """Names of the flags that are set, for listings (``cktf methods``)."""
        return [name for name in ("teacher_blocks", "same_stage_count", "negatives", "memory_banks", "labels",
                                  "init_phase") if getattr(self, name)]


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
    """What building a term may use: tap widths and shapes, the pool size, pooling windows, a seed.

    ``*_channels`` are :meth:`FeatureTaps.channels` (blocks included when the spec names them), ``*_shapes``
    the per-sample tap shapes (:meth:`FeatureTaps.shapes`; ``None`` where not known), ``*_pool`` each model's
    reference pooling window from the model registry (``None``: global pool), ``num_items`` the size of the
    transfer pool (memory-bank rows), ``seed`` the run's seed (for a term's own generators), ``nce`` the
    shared NCE settings (set from ``loss.nce`` by :func:`build_terms`), and ``calibration`` returns the
    untrained student's and the teacher's taps on one seeded batch of the pool (evaluation mode), for
    decisions a term makes before training (e.g. similarity-based layer mapping).
    """

    student_channels: dict
    teacher_channels: dict
    num_items: int
    student_shapes: dict | None = None
    teacher_shapes: dict | None = None
    student_pool: int | None = None
    teacher_pool: int | None = None
    seed: int = 0
    nce: NCEConfig = field(default_factory=NCEConfig)
    calibration: Callable[[], tuple[TapOutputs, TapOutputs]] | None = None


@dataclass
class InitPhase:
    """What :meth:`LossTerm.init_phase` may use before the main loop.

    The task calls every term's phase with itself (student, teacher, all terms) in evaluation mode and
    restores the mode afterwards; a phase that trains something sets the modes it needs. ``eval_loader``
    yields the transfer pool in dataset order with the evaluation transform; ``train_loader`` (with
    ``augment``, the batched training augmentation or ``None``) is the main loop's loader, for a term that
    pre-trains something with its own optimizer.
    """

    student: nn.Module
    teacher: nn.Module
    device: torch.device
    eval_loader: DataLoader
    train_loader: DataLoader | None = None
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None

    def eval_batches(self) -> Iterator[TransferBatch]:
        """One pass over the pool without gradients (no negatives), in the modes the task set (evaluation)."""
        for images, targets, indices in self.eval_loader:
            images, indices = images.to(self.device), indices.to(self.device)
            with torch.no_grad():
                batch = TransferBatch(self.student(images), self.teacher(images), indices, targets, None)
            yield batch


class LossTerm(nn.Module):
    """One weighted term of the transfer objective.

    Subclasses set ``Options`` (a :class:`TermOptions` dataclass) and ``paper`` (the reference shown by
    ``cktf methods``; a companion method also ``repdistiller``: whether it equals RepDistiller's code, the CKTF
    paper's Table 2 implementation, or which ``variant`` does), override :meth:`declare` when they need more
    than the batch's taps, and implement :meth:`forward`. ``forward`` returns *unweighted* named losses; the
    task sums them, multiplies by the term's weight and logs each as ``train/<key>``.

    Args:
        options: the validated options of this term (``loss.terms.<name>``).
        ctx: tap widths/shapes, pool size, seed and the shared NCE settings.
    """

    Options: ClassVar[type[TermOptions]] = TermOptions
    paper: ClassVar[str] = ""
    repdistiller: ClassVar[str] = ""  # how the term relates to RepDistiller's code (shown by cktf methods)
    name: ClassVar[str] = ""  # set by register_term

    def __init__(self, options: TermOptions, ctx: TermContext) -> None:
        super().__init__()
        self.options = options
        self.needs = type(self).declare(options, ctx.nce)

    @classmethod
    def declare(cls, options: TermOptions, nce: NCEConfig) -> Needs:
        """What this term needs, from its options and the shared NCE settings (default: nothing extra)."""
        return Needs()

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Scalars of the last ``forward`` to log next to the losses but never add to them (default: none)."""
        return {}

    def init_phase(self, phase: InitPhase) -> None:
        """Set the term up before the main loop (called only when :meth:`declare` says ``init_phase``)."""

    def metadata(self) -> dict[str, str]:
        """Entries for the transfer checkpoint's metadata (e.g. the layer mapping chosen); default none."""
        return {}
