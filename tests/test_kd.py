"""KDLoss: ρ²·KL(teacher ‖ student) at temperature ρ, batch mean, fp32, teacher detached."""

from __future__ import annotations

import pytest
import torch

from transfer.errors import CKTFError
from transfer.losses import KDLoss


def test_zero_when_logits_are_equal():
    logits = torch.randn(4, 10)
    assert KDLoss(4.0)(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_matches_the_formula_by_hand():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=gen, dtype=torch.float64), torch.randn(5, 7, generator=gen, dtype=torch.float64)
    rho = 3.0
    p_t, p_s = torch.softmax(t / rho, 1), torch.softmax(s / rho, 1)
    by_hand = (p_t * (p_t.log() - p_s.log())).sum(1).mean() * rho**2
    assert KDLoss(rho)(s.float(), t.float()).item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_gradient_reaches_only_the_student():
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5, requires_grad=True)
    KDLoss()(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_fp32_under_autocast():
    s, t = torch.randn(3, 5).bfloat16(), torch.randn(3, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = KDLoss()(s, t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, KDLoss()(s.float(), t.float()))


def test_class_count_mismatch_names_both_sizes():
    with pytest.raises(CKTFError, match="student has 10 classes.*teacher has 200"):
        KDLoss()(torch.randn(2, 10), torch.randn(2, 200))
    with pytest.raises(CKTFError, match="loss.terms.kd.temperature"):
        KDLoss(0.0)
