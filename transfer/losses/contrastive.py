"""One (student, teacher) feature pair under CRD's contrastive objective: reduction, two heads, NCE with banks.

The building block of every contrastive term (``pckt`` holds one pair, ``mckt`` one per module group). Its
settings are the shared ``loss.nce`` section, so all pairs of a run agree on d, τ, momentum and heads.

Example::

    pair = ContrastivePair(64, 128, NCEConfig(), num_items=30_000)
    loss = pair(student_feature, teacher_feature, indices, negatives)   # scalar, fp32
"""

from __future__ import annotations

import torch
from torch import nn

from transfer.config import NCEConfig
from transfer.losses.memory_bank import BANK_DTYPES
from transfer.losses.nce import NCEObjective
from transfer.losses.projection import ProjectionHead
from transfer.losses.stage_features import StageFeatures


class ContrastivePair(nn.Module):
    """Feature reduction, projection heads for one (student, teacher) feature pair, and their NCE objective.

    Args:
        student_dim: size of the student's reduced feature (the student head's input).
        teacher_dim: size of the teacher's reduced feature.
        nce: the shared NCE settings (embedding size, temperature, bank momentum, head kind).
        num_items: rows of each memory bank (the transfer pool's size).
        reduce_student: turns the student's tapped map into a vector (default: global average pooling,
            which the heads would apply anyway); ``student_dim`` must be the size it produces.
        reduce_teacher: the same for the teacher.
    """

    def __init__(self, student_dim: int, teacher_dim: int, nce: NCEConfig, num_items: int,
                 reduce_student: nn.Module | None = None, reduce_teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.reduce_student = reduce_student or StageFeatures()
        self.reduce_teacher = reduce_teacher or StageFeatures()
        self.head_student = ProjectionHead(student_dim, nce.embed_dim, nce.projection)
        self.head_teacher = ProjectionHead(teacher_dim, nce.embed_dim, nce.projection)
        self.objective = NCEObjective(num_items, nce.embed_dim, nce.temperature, nce.momentum,
                                      bank_dtype=BANK_DTYPES[nce.bank_dtype])

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
        """Overwrite the bank rows of ``indices`` with the heads' current embeddings (``loss.nce.bank_init embed``)."""
        g_student, g_teacher = self.embed(student, teacher)
        self.objective.bank_student.update(indices, g_student.float(), momentum=0.0)
        self.objective.bank_teacher.update(indices, g_teacher.float(), momentum=0.0)
