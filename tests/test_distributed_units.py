"""The single-process pieces of multi-rank training: how ranks split the data, batch checks, bank storage types."""

import pytest
import torch

from transfer.data.order import EpochSampler, ShardSampler
from transfer.engine.distributed import RankError, per_rank_batch
from transfer.losses.memory_bank import MemoryBank
from transfer.losses.nce import NCEObjective


@pytest.mark.parametrize("num_items,world", [(50, 2), (50, 4), (64, 2)])
def test_ranks_take_slices_of_the_single_process_batches(num_items, world):
    batch = 8
    one = list(EpochSampler(num_items, torch.Generator().manual_seed(3)))
    streams = [list(EpochSampler(num_items, torch.Generator().manual_seed(3), rank=r, world_size=world,
                                 batch_size=batch // world)) for r in range(world)]
    steps = num_items // batch
    assert all(len(s) == steps * batch // world for s in streams)
    for b in range(steps):
        together = [i for s in streams for i in s[b * batch // world:(b + 1) * batch // world]]
        assert together == one[b * batch:(b + 1) * batch]


def test_rank_skip_resumes_its_own_stream():
    sampler = EpochSampler(40, torch.Generator().manual_seed(1), rank=1, world_size=2, batch_size=4)
    full = list(sampler)
    sampler.generator.manual_seed(1)
    sampler.skip(8)
    assert list(sampler) == full[8:]
    with pytest.raises(ValueError):
        sampler.skip(len(full) + 1)


def test_shards_cover_an_evaluation_split_once():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))


def test_batch_must_split_evenly_across_ranks():
    assert per_rank_batch(64, 8) == 8
    with pytest.raises(RankError, match="train.batch_size 15 is not divisible by the 2"):
        per_rank_batch(15, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_banks_store_half_and_score_close_to_fp32(dtype):
    def loss(bank_dtype):
        torch.manual_seed(0)
        nce = NCEObjective(200, 32, 0.1, bank_dtype=bank_dtype)
        g = torch.nn.functional.normalize(torch.randn(2, 8, 32), dim=2)
        indices = torch.arange(8)
        first = nce(g[0], g[1], indices, torch.randint(0, 200, (8, 16))).loss
        second = nce(g[1].requires_grad_(), g[0], indices + 8, torch.randint(0, 200, (16,))).loss
        second.backward()
        return first.item(), second.item(), nce.bank_student.weight
    reference, half = loss(torch.float32), loss(dtype)
    assert half[2].dtype == dtype and reference[2].dtype == torch.float32
    assert half[0] == pytest.approx(reference[0], rel=1e-2) and half[1] == pytest.approx(reference[1], rel=1e-2)
    assert torch.allclose(half[2].float(), reference[2], atol=1e-2)


def test_half_precision_bank_update_is_normalised_in_fp32():
    bank = MemoryBank(10, 16, dtype=torch.float16)
    bank.update(torch.tensor([1, 2]), torch.randn(2, 16))
    assert bank.weight.dtype == torch.float16
    assert torch.allclose(bank.weight[1:3].float().norm(dim=1), torch.ones(2), atol=1e-3)
