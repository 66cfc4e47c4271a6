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
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from transfer.errors import CKTFError
from transfer.losses.projection import pool_flatten
from transfer.models.taps import TapOutputs

Strategy = Literal["last", "first", "random", "largest", "smallest"]
STRATEGIES: tuple[str, ...] = ("last", "first", "random", "largest", "smallest")


def check_stage_counts(student_stages: int, teacher_stages: int, student: str, teacher: str) -> None:
    """CKTF pairs stages one-to-one; a mismatch cannot be mapped."""
    if student_stages != teacher_stages:
        raise CKTFError(f"cannot map student '{student}' ({student_stages} stages) onto teacher '{teacher}' "
                        f"({teacher_stages} stages): CKTF pairs stages one-to-one; pick models with the same number "
                        "of stages or set loss.mckt 0")


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
        raise CKTFError(f"unknown loss.layer_mapping '{strategy}'; choose one of: {', '.join(STRATEGIES)}")
    num_stages = len(teacher.stages)
    if strategy == "last" and teacher.blocks is None:
        return [-1] * num_stages
    if teacher.blocks is None:
        raise ValueError("teacher taps need with_blocks=True for this layer mapping")
    counts = [len(blocks) for blocks in teacher.blocks]
    if strategy == "last":
        return [n - 1 for n in counts]
    if strategy == "first":
        return [0] * num_stages
    if strategy == "random":
        return [int(torch.randint(n, (1,), generator=generator)) for n in counts]
    choice: list[int] = []
    for stage, blocks in enumerate(teacher.blocks):
        s = pool_flatten(student.stages[stage])
        sims = torch.stack([padded_cosine(s, pool_flatten(block)) for block in blocks])
        choice.append(int(sims.argmax() if strategy == "largest" else sims.argmin()))
    return choice


def paired_features(student: TapOutputs, teacher: TapOutputs, blocks: list[int]
                    ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, student_feature, teacher_feature)`` for the stem and every stage under mapping ``blocks``."""
    pairs = [("stem", student.stem, teacher.stem)]
    for i, (s, block) in enumerate(zip(student.stages, blocks, strict=True)):
        t = teacher.stages[i] if block == -1 or teacher.blocks is None else teacher.blocks[i][block]
        pairs.append((f"stage{i + 1}", s, t))
    return pairs
