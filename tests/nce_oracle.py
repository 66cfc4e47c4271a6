"""Reference NCE algorithm, for tests only.

A deliberately literal transcription of the published CRD/CKTF algorithm (Tian et al., ICLR 2020,
eq. 10-19; CKTF eq. 3-5): gather the ``[B, K+1, d]`` bank rows of every anchor (positive in column 0),
``bmm`` with the anchor, ``P = exp(s/τ)/Z`` and the literal ``log(P/(P+c))``, ``log(c/(P+c))`` terms,
with ``Z = N·mean(exp(s/τ))`` estimated on the first call. It is slow and memory hungry on purpose and
exists only to check the fast path in ``transfer.losses.nce``; it differs from CRD's code only in
omitting the ``eps = 1e-7`` CRD adds inside the logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def oracle_scores(bank: Tensor, g: Tensor, indices: Tensor, negatives: Tensor) -> Tensor:
    """``[B, K+1]``: ``<bank[j], g_i>`` for the positive ``indices[i]`` then the negatives of ``i``."""
    if negatives.dim() == 1:
        negatives = negatives.expand(g.shape[0], -1)
    columns = torch.cat([indices[:, None], negatives], dim=1)
    rows = bank[columns]  # [B, K+1, d]
    return torch.bmm(rows, g[:, :, None]).squeeze(2)


def oracle_z(scores: Tensor, temperature: float, num_items: int) -> Tensor:
    """CRD's normaliser: ``N · mean(exp(s/τ))`` over the whole batch, a constant (detached)."""
    return torch.exp(scores.detach() / temperature).mean() * num_items


def oracle_side_loss(scores: Tensor, z: Tensor, temperature: float, num_items: int) -> Tensor:
    """``-(1/B) Σ_i [log(P_pos/(P_pos+c)) + Σ_k log(c/(P_k+c))]`` with ``c = K/N``."""
    c = (scores.shape[1] - 1) / num_items
    p = torch.exp(scores / temperature) / z
    p_pos, p_neg = p[:, 0], p[:, 1:]
    log_d1 = torch.log(p_pos / (p_pos + c))
    log_d0 = torch.log(c / (p_neg + c)).sum(dim=1)
    return -(log_d1 + log_d0).mean()


def oracle_update(bank: Tensor, indices: Tensor, embeddings: Tensor, momentum: float) -> Tensor:
    """A new bank: each row blended with its pre-update value, in batch order (so the last duplicate wins)."""
    new = bank.clone()
    for i, j in enumerate(indices.tolist()):
        new[j] = F.normalize(momentum * bank[j] + (1 - momentum) * embeddings[i], dim=0)
    return new


@dataclass
class OracleResult:
    loss: Tensor
    teacher_anchored: Tensor
    student_anchored: Tensor
    z_student: Tensor
    z_teacher: Tensor
    bank_student: Tensor  # after the update
    bank_teacher: Tensor


def oracle_objective(bank_student: Tensor, bank_teacher: Tensor, g_s: Tensor, g_t: Tensor, indices: Tensor,
                     negatives: Tensor, temperature: float, z_student: Tensor | None = None,
                     z_teacher: Tensor | None = None, momentum: float = 0.5) -> OracleResult:
    """Both sides of the CRD objective and the bank updates a training step would make.

    ``z_*=None`` means "first call": the normaliser is estimated from this batch.
    """
    num_items = bank_student.shape[0]
    s_t = oracle_scores(bank_student, g_t, indices, negatives)  # teacher anchor vs student memory
    s_s = oracle_scores(bank_teacher, g_s, indices, negatives)
    if z_student is None:
        z_student = oracle_z(s_t, temperature, num_items)
    if z_teacher is None:
        z_teacher = oracle_z(s_s, temperature, num_items)
    teacher_anchored = oracle_side_loss(s_t, z_student, temperature, num_items)
    student_anchored = oracle_side_loss(s_s, z_teacher, temperature, num_items)
    return OracleResult(
        loss=teacher_anchored + student_anchored,
        teacher_anchored=teacher_anchored,
        student_anchored=student_anchored,
        z_student=z_student,
        z_teacher=z_teacher,
        bank_student=oracle_update(bank_student, indices, g_s.detach(), momentum),
        bank_teacher=oracle_update(bank_teacher, indices, g_t.detach(), momentum),
    )
