"""Which teacher block pairs with each student stage (CKTF §3.3, "layer mapping").

For every stage, the student's *last* block is paired with one block of the teacher's corresponding stage:

- ``last``: the teacher stage's last block (the default; best in the paper's ablation),
- ``first``: its first block,
- ``random``: a block drawn with a seeded generator,
- ``largest`` / ``smallest``: the block whose pooled output has the largest / smallest mean cosine
  similarity with the student's, measured once on a calibration batch.

Widths usually differ, so for the similarity comparison only, the narrower pooled vector is zero-padded *at
the end* to the wider width. Padding at the end means an odd width difference needs no special case (nothing
is split between two sides), and the zeros add nothing to the dot product, so the cosine is that of the
shared leading channels scaled by the norms of the full vectors.

The stems always pair with each other; stages pair one-to-one, so student and teacher need the same number
of stages.

**When** the choice is made is ``loss.terms.mckt.mapping_schedule``:

- ``once`` (the default): the rule above, on one calibration batch with the untrained student, before
  training; the choice is fixed for the run (and stored in the checkpoint).
- ``per_batch`` (what the published code, kaiqi123/CKTF ``distiller_zoo/ST.py``, does): re-decided on every
  training batch with the current networks. ``random`` draws a block per stage and batch;
  ``largest``/``smallest`` compare *whole* maps, not pooled vectors: both maps are L2-normalised across the
  batch dimension, the narrower one's channels are zero-padded equally on both sides to the wider width
  (an odd difference puts the extra zero channel at the end; the reference would stop there on an
  assertion, and where the student is the wider map it crops the student instead of padding the teacher),
  and the cosine is that of the two flattened ``[B, C, H, W]`` tensors. ``last``/``first`` do not
  depend on the batch, so both schedules give the same pairs.

Under ``per_batch`` each stage objective keeps one teacher head and one pair of memory banks, as the
reference does: every block of a teacher stage has the same shape, so one head reads whichever block was
chosen, and a bank row holds the embedding of the block chosen the last time that item was seen. (One head
per candidate block would leave each head 1/n of the updates while the banks still mixed their outputs.)
``random`` draws come from a generator seeded by ``(train.seed, number of draws so far)``; the counter
is a buffer in the checkpoint, so ``--resume`` continues the same sequence without touching the global
RNG that data order and augmentation use.

Under torchrun (``gather_distributed``, set by the engine) ``largest``/``smallest`` per batch decide on the
mean of the ranks' similarities (each rank measures its own sub-batch; one small all-reduce per step), so
every rank pairs the same blocks; ``random`` draws agree anyway (same seed, same counter). The choice reaches
the host once per step (the teacher's blocks are picked in Python); a fixed choice and the draw counter are
read from the device only after a checkpoint load wrote them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from transfer.engine import distributed
from transfer.errors import CKTFError
from transfer.losses.projection import pool_flatten
from transfer.losses.stage_features import batch_normalise
from transfer.models.taps import TapOutputs

Strategy = Literal["last", "first", "random", "largest", "smallest"]
STRATEGIES: tuple[str, ...] = ("last", "first", "random", "largest", "smallest")
Schedule = Literal["once", "per_batch"]
SCHEDULES: tuple[str, ...] = ("once", "per_batch")


def check_stage_counts(student_stages: int, teacher_stages: int, student: str, teacher: str,
                       terms: str = "loss.terms.mckt") -> None:
    """Stage-wise terms pair stages one-to-one; a mismatch cannot be mapped (``terms`` names who asks)."""
    if student_stages != teacher_stages:
        raise CKTFError(f"cannot map student '{student}' ({student_stages} stages) onto teacher '{teacher}' "
                        f"({teacher_stages} stages): {terms} pairs stages one-to-one; pick models with the same "
                        f"number of stages or leave {terms} out")


def padded_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of cos(a_i, b_i) after zero-padding the narrower of [B, Ca], [B, Cb] at the end."""
    width = max(a.shape[1], b.shape[1])
    a = F.pad(a.float(), (0, width - a.shape[1]))
    b = F.pad(b.float(), (0, width - b.shape[1]))
    return F.cosine_similarity(a, b, dim=1).mean()


def select_teacher_blocks(strategy: str, student: TapOutputs, teacher: TapOutputs,
                          generator: torch.Generator | None = None) -> list[int]:
    """Index of the teacher block paired with each student stage's last block.

    ``teacher`` must carry ``blocks`` unless the strategy is ``last``; ``student`` is only used by the
    similarity strategies.
    """
    if strategy not in STRATEGIES:
        raise CKTFError(f"unknown layer_mapping '{strategy}'; choose one of: {', '.join(STRATEGIES)}")
    num_stages = len(teacher.stages)
    if strategy == "last" and teacher.blocks is None:
        return [-1] * num_stages
    if teacher.blocks is None:
        raise ValueError("teacher taps need with_blocks=True for this layer mapping")
    if strategy in ("last", "first", "random"):
        return choose_blocks(strategy, [len(blocks) for blocks in teacher.blocks], generator)
    choice: list[int] = []
    for stage, blocks in enumerate(teacher.blocks):
        s = pool_flatten(student.stages[stage])
        sims = torch.stack([padded_cosine(s, pool_flatten(block)) for block in blocks])
        choice.append(int(sims.argmax() if strategy == "largest" else sims.argmin()))
    return choice


def choose_blocks(strategy: str, counts: list[int], generator: torch.Generator | None = None) -> list[int]:
    """Block index per stage for the strategies that need no features: ``last``, ``first`` or ``random``.

    ``counts`` is the number of blocks of each teacher stage; ``random`` draws with ``generator``.
    """
    if strategy == "last":
        return [n - 1 for n in counts]
    if strategy == "first":
        return [0] * len(counts)
    if strategy == "random":
        device = generator.device if generator is not None else None  # not the default device: the generator's
        return [int(torch.randint(n, (1,), generator=generator, device=device)) for n in counts]
    raise ValueError(f"choose_blocks decides last, first or random, not {strategy!r}")


def paired_features(student: TapOutputs, teacher: TapOutputs, blocks: list[int]
                    ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, student_feature, teacher_feature)`` for the stem and every stage under mapping ``blocks``."""
    pairs = [("stem", student.stem, teacher.stem)]
    for i, (s, block) in enumerate(zip(student.stages, blocks, strict=True)):
        t = teacher.stages[i] if block == -1 or teacher.blocks is None else teacher.blocks[i][block]
        pairs.append((f"stage{i + 1}", s, t))
    return pairs


def pad_channels(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the channel dimension (dim 1) of ``x`` to ``width``: half before, the rest after."""
    extra = width - x.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad {x.shape[1]} channels down to {width}")
    before = extra // 2
    padding = [0, 0] * (x.dim() - 2) + [before, extra - before]
    return F.pad(x, padding)


def batch_map_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The reference's per-batch similarity: cosine of the whole batch-normalised maps, channels padded.

    Both maps are L2-normalised over the batch dimension, the narrower is zero-padded (:func:`pad_channels`)
    to the wider channel count, and the result is ``<s, t> / max(|s|·|t|, 1e-8)`` over all entries.
    """
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"per-batch layer mapping compares maps of equal batch and spatial size; got student "
                         f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    width = max(student.shape[1], teacher.shape[1])
    s = pad_channels(batch_normalise(student), width)
    t = pad_channels(batch_normalise(teacher), width)
    return (s * t).sum() / torch.clamp(s.norm() * t.norm(), min=1e-8)


def per_batch_choice(strategy: str, student: TapOutputs, teacher: TapOutputs,
                     combine: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``largest``/``smallest`` per batch: the chosen block of every stage as a long tensor on the maps' device.

    ``combine`` maps every stage's similarities, concatenated, to the ones to decide on (under torchrun: their
    mean over the ranks); nothing leaves the device.
    """
    if strategy not in ("largest", "smallest"):
        raise ValueError(f"per_batch_choice decides largest or smallest, not {strategy!r}")
    if teacher.blocks is None:
        raise ValueError("teacher taps need with_blocks=True for this layer mapping")
    sims = [torch.stack([batch_map_cosine(student.stages[stage], block) for block in blocks])
            for stage, blocks in enumerate(teacher.blocks)]
    flat = torch.cat(sims)
    if combine is not None:
        flat = combine(flat)
    pick = torch.argmax if strategy == "largest" else torch.argmin
    return torch.stack([pick(part) for part in flat.split([len(s) for s in sims])])


def select_per_batch(strategy: str, student: TapOutputs, teacher: TapOutputs,
                     generator: torch.Generator | None = None,
                     combine: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[int]:
    """Index of the teacher block for each stage under ``mapping_schedule per_batch`` (see module docstring;
    ``combine`` as in :func:`per_batch_choice`)."""
    if strategy not in ("largest", "smallest"):
        return select_teacher_blocks(strategy, student, teacher, generator)
    return per_batch_choice(strategy, student, teacher, combine).tolist()


class _HostCopy:
    """A small buffer's value on the host, read from the device again only when something else wrote the
    buffer in place (a checkpoint load) or it was replaced (moved to another device)."""

    def __init__(self) -> None:
        self._tensor: weakref.ref | None = None
        self._version = -1
        self.value: Any = None

    def read(self, tensor: torch.Tensor) -> Any:
        if self._tensor is None or self._tensor() is not tensor or tensor._version != self._version:
            self.wrote(tensor, tensor.tolist())
        return self.value

    def wrote(self, tensor: torch.Tensor, value: Any) -> None:
        """Record that ``tensor`` now holds ``value`` (after writing it ourselves)."""
        self._tensor, self._version, self.value = weakref.ref(tensor), tensor._version, value


class LayerMapper(nn.Module):
    """Decides the teacher block of every stage: keeps a fixed choice (``once``) or re-decides it per batch.

    The blocks in use live in the owner's ``mapping`` buffer (in the checkpoint: the fixed choice, or the
    latest per-batch one), which :meth:`forward` reads and, when the choice moves, overwrites. For
    per-batch ``random`` the mapper keeps a ``draws`` counter buffer, so a resumed run continues the same
    sequence of draws.

    Example::

        mapper = LayerMapper("largest", "per_batch", seed=0)
        blocks = mapper(student_taps, teacher_taps, mapping)    # e.g. [1, 3, 0, 3], recomputed per call
    """

    def __init__(self, strategy: str, schedule: str, seed: int = 0) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown layer mapping strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown mapping schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        self.strategy, self.schedule, self.seed = strategy, schedule, int(seed)
        self.gather_distributed = False
        self._mapping, self._draws = _HostCopy(), _HostCopy()
        if self.moves and strategy == "random":
            self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    @property
    def moves(self) -> bool:
        """Whether the choice can change from batch to batch (and is worth logging)."""
        return self.schedule == "per_batch" and self.strategy in ("random", "largest", "smallest")

    def _generator(self) -> torch.Generator:
        draw = int(self._draws.read(self.draws))
        self.draws += 1
        self._draws.wrote(self.draws, draw + 1)
        return torch.Generator().manual_seed((self.seed * 1_000_003 + draw) % (2**63))

    @torch.no_grad()
    def forward(self, student: TapOutputs, teacher: TapOutputs, mapping: torch.Tensor) -> list[int]:
        if not self.moves:
            return list(self._mapping.read(mapping))
        if self.strategy == "random":
            choice = select_teacher_blocks(self.strategy, student, teacher, self._generator())
            mapping.copy_(torch.tensor(choice, dtype=mapping.dtype), non_blocking=True)
        else:
            combine = (lambda sims: distributed.all_reduce_(sims, "mean")) if self.gather_distributed else None
            picked = per_batch_choice(self.strategy, student, teacher, combine)
            mapping.copy_(picked)
            choice = picked.tolist()
        self._mapping.wrote(mapping, choice)
        return choice

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, schedule={self.schedule!r}"
