"""SP, FSP and CC compute their matrices in fp32 under autocast, as their docstrings say (issue 18, finding 8).

Under autocast a matrix product runs in the low-precision dtype even on fp32 inputs: SP's Gram matrix and
FSP's sum over h·w then overflow fp16 (65504) on large activations, and every matrix loses precision in bf16.
CPU autocast lowers matmul/einsum the way CUDA autocast does, so these run without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from transfer.config import LossConfig
from transfer.losses.terms import TermContext, TransferBatch, build_terms
from transfer.losses.terms.cc import correlation_matrix
from transfer.losses.terms.fsp import fsp_matrix
from transfer.losses.terms.sp import similarity_matrix
from transfer.models import TapOutputs

LOW = (torch.float16, torch.bfloat16)


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def context(width: int = 8) -> TermContext:
    """Stem [4, 8, 8], stages [4, 8, 8] and [6, 4, 4], penultimate ``width`` on both sides."""
    channels = {"stem": 4, "stages": [4, 6], "blocks": [], "penultimate": width, "logits": 3}
    shapes = {"stem": (4, 8, 8), "stages": [(4, 8, 8), (6, 4, 4)], "blocks": [], "penultimate": (width,),
              "logits": (3,)}
    return TermContext(channels, dict(channels), num_items=10, student_shapes=shapes, teacher_shapes=dict(shapes))


def taps(seed: int, scale: float, width: int = 8) -> TapOutputs:
    return TapOutputs(stem=rand(6, 4, 8, 8, seed=seed, scale=scale),
                      stages=[rand(6, 4, 8, 8, seed=seed + 1, scale=scale),
                              rand(6, 6, 4, 4, seed=seed + 2, scale=scale)],
                      penultimate=rand(6, width, seed=seed + 3, scale=scale), logits=rand(6, 3, seed=seed + 4))


def loss(name: str, options: dict, scale: float, dtype: torch.dtype | None) -> torch.Tensor:
    """The term's total loss on a seeded batch, under CPU autocast to ``dtype`` (None: no autocast)."""
    torch.manual_seed(0)
    terms, _ = build_terms(LossConfig(terms={name: options}), context())
    batch = TransferBatch(taps(0, scale), taps(10, scale), torch.arange(6), torch.full((6,), -1), None)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        return sum(terms[name](batch).values())


@pytest.mark.parametrize("dtype", LOW)
def test_the_matrices_are_fp32_under_autocast(dtype):
    x = rand(5, 4, 3, 3)
    with torch.autocast("cpu", dtype=dtype):
        assert similarity_matrix(x).dtype == torch.float32
        assert fsp_matrix(x, rand(5, 6, 3, 3, seed=1)).dtype == torch.float32
        assert correlation_matrix(x.flatten(1), 0.4, 2).dtype == torch.float32


@pytest.mark.parametrize("name,options", [("sp", {}), ("fsp", {"init_epochs": 0}), ("cc", {}),
                                          ("cc", {"embed_dim": 5})])
@pytest.mark.parametrize("dtype", LOW)
def test_the_loss_under_autocast_is_the_fp32_loss(name, options, dtype):
    plain = loss(name, options, 1.0, None)
    mixed = loss(name, options, 1.0, dtype)
    assert mixed.dtype == torch.float32
    assert torch.allclose(mixed, plain, rtol=1e-5, atol=0), (mixed.item(), plain.item())


@pytest.mark.parametrize("name,options", [("sp", {}), ("fsp", {"init_epochs": 0})])
def test_activations_beyond_the_fp16_range_give_a_finite_loss(name, options):
    """Maps of ±300: a Gram entry over 256 values, or an FSP sum over 64 positions, is far beyond 65504."""
    plain = loss(name, options, 300.0, None)
    mixed = loss(name, options, 300.0, torch.float16)
    assert torch.isfinite(plain) and torch.isfinite(mixed)
    assert torch.allclose(mixed, plain, rtol=1e-5, atol=0)
