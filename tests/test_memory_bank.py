"""MemoryBank: CRD's init range, the momentum update (deterministic with duplicates), buffers and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.nce_oracle import oracle_update
from transfer.errors import CKTFError
from transfer.losses import MemoryBank


def test_init_is_uniform_in_crd_range():
    bank = MemoryBank(2000, 48, generator=torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(48 / 3)
    w = bank.weight
    assert w.shape == (2000, 48) and w.dtype == torch.float32
    assert w.abs().max() <= bound
    assert w.min() < -0.99 * bound and w.max() > 0.99 * bound  # spans the range, not a narrower one
    assert abs(w.var().item() - 1 / 48) < 0.05 / 48  # variance 1/d, so rows start with norm ≈ 1


def test_same_generator_seed_gives_the_same_bank():
    a = MemoryBank(20, 4, generator=torch.Generator().manual_seed(3))
    b = MemoryBank(20, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.weight, b.weight)


def test_weight_is_a_persistent_buffer_not_a_parameter():
    bank = MemoryBank(10, 4)
    assert list(bank.parameters()) == [] and not bank.weight.requires_grad
    assert set(bank.state_dict()) == {"weight"}
    other = MemoryBank(10, 4)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.weight, bank.weight)
    assert bank.to("meta").weight.device.type == "meta"  # follows .to(device)


def test_rows_returns_the_indexed_rows():
    bank = MemoryBank(10, 4)
    idx = torch.tensor([[3, 1], [0, 9]])
    assert torch.equal(bank.rows(idx), bank.weight[idx])


def test_update_blends_normalises_and_leaves_other_rows():
    bank = MemoryBank(10, 4, momentum=0.3, generator=torch.Generator().manual_seed(1))
    old = bank.weight.clone()
    idx = torch.tensor([7, 2])
    emb = F.normalize(torch.randn(2, 4), dim=1)
    bank.update(idx, emb)
    torch.testing.assert_close(bank.weight[idx], F.normalize(0.3 * old[idx] + 0.7 * emb, dim=1))
    torch.testing.assert_close(bank.weight[idx].norm(dim=1), torch.ones(2))
    keep = torch.tensor([i not in (2, 7) for i in range(10)])
    assert torch.equal(bank.weight[keep], old[keep])


def test_update_is_fp32_for_half_embeddings():
    bank = MemoryBank(5, 4)
    bank.update(torch.tensor([1]), torch.ones(1, 4, dtype=torch.bfloat16))
    assert bank.weight.dtype == torch.float32


def test_duplicate_indices_last_write_wins_deterministically():
    results = []
    for _ in range(3):
        bank = MemoryBank(6, 4, generator=torch.Generator().manual_seed(2))
        old = bank.weight.clone()
        idx = torch.tensor([3, 5, 3, 0, 3])
        emb = F.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(4)), dim=1)
        bank.update(idx, emb)
        results.append(bank.weight.clone())
        torch.testing.assert_close(bank.weight[3], F.normalize(0.5 * old[3] + 0.5 * emb[4], dim=0))
        torch.testing.assert_close(bank.weight, oracle_update(old, idx, emb, 0.5))
    assert all(torch.equal(r, results[0]) for r in results)


def test_bad_options_and_shapes_raise():
    with pytest.raises(CKTFError, match="loss.nce.momentum"):
        MemoryBank(10, 4, momentum=-0.1)
    with pytest.raises(CKTFError, match="loss.nce.embed_dim"):
        MemoryBank(10, 0)
    bank = MemoryBank(10, 4)
    with pytest.raises(CKTFError, match=r"embeddings \[B, 4\].*\(2, 3\)"):
        bank.update(torch.tensor([0, 1]), torch.randn(2, 3))


def test_sync_free_duplicate_handling_writes_the_same_rows_as_dropping_duplicates():
    from transfer.losses.memory_bank import _last_occurrence

    indices = torch.tensor([3, 1, 3, 0, 1, 3])
    values = torch.arange(6.0)[:, None].expand(6, 2)
    kept_i, kept_v = _last_occurrence(indices, values, 5, sync_free=False)
    all_i, all_v = _last_occurrence(indices, values, 5, sync_free=True)
    assert all_i.tolist() == indices.tolist()
    assert all_v[:, 0].tolist() == [5, 4, 5, 3, 4, 5]  # every occurrence carries its index's last value
    dropped = torch.zeros(5, 2).index_copy_(0, kept_i, kept_v)
    torch.testing.assert_close(torch.zeros(5, 2).index_copy_(0, all_i, all_v), dropped)
