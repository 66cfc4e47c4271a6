"""Hinton et al.'s knowledge distillation term, CKTF's ``θ·L_distill`` (``loss.terms.kd``).

``ρ²·KL(softmax(T/ρ) ‖ softmax(S/ρ))`` averaged over the batch: the ``ρ²`` keeps the gradient scale
independent of the temperature (Hinton et al., 2015, §2), so ``θ`` need not be retuned with ``ρ``.
The teacher is frozen in CKTF, so its logits are detached.

Example::

    kd = KDLoss(temperature=4.0)
    loss = kd(student(x), teacher(x))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfer.errors import CKTFError


class KDLoss(nn.Module):
    """``KL(softmax(teacher/ρ) ‖ softmax(student/ρ)) · ρ²``, "batchmean", in fp32 even under autocast."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise CKTFError(f"loss.terms.kd.temperature must be positive; got {temperature}")
        self.temperature = temperature

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
            raise CKTFError(f"KD needs [B, C] logits over the same classes: student has {student_logits.shape[-1]} "
                            f"classes (shape {tuple(student_logits.shape)}), teacher has "
                            f"{teacher_logits.shape[-1]} (shape {tuple(teacher_logits.shape)})")
        rho = self.temperature
        wide = torch.promote_types(student_logits.dtype, torch.float32)  # fp32, or fp64 kept (parity tests)
        with torch.autocast(device_type=student_logits.device.type, enabled=False):
            log_p_s = F.log_softmax(student_logits.to(wide) / rho, dim=1)
            log_p_t = F.log_softmax(teacher_logits.detach().to(wide) / rho, dim=1)
            return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * rho**2

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
