"""Negative samplers: excluded sets are never drawn, the allowed sets are hit uniformly, draws are reproducible."""

import pytest
import torch

from transfer.errors import CKTFError
from transfer.sampling import DebiasedSampler, HardSampler, UniformSampler, build_sampler


def _random_table(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Row i: k distinct random indices other than i (a stand-in for a neighbour table)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(n, n, generator=g).argsort(dim=1)
    order = order[order != torch.arange(n).unsqueeze(1)].view(n, n - 1)
    return order[:, :k]


def _chi_square(draws: torch.Tensor, allowed: torch.Tensor, num_items: int) -> float:
    counts = torch.bincount(draws.flatten(), minlength=num_items)[allowed].double()
    expected = draws.numel() / allowed.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def test_uniform_never_returns_the_anchor_and_is_uniform():
    n, g = 20, torch.Generator().manual_seed(1)
    sampler = UniformSampler(n, 19 - 1)
    everyone = sampler(torch.arange(n).repeat(500), g)
    assert not (everyone == torch.arange(n).repeat(500).unsqueeze(1)).any()
    assert everyone.min() >= 0 and everyone.max() < n
    # 200k draws for anchor 7 over the 19 other items: dof 18, critical value 42.31 at alpha = 1e-3
    draws = sampler(torch.full((11_112,), 7), g)
    assert not (draws == 7).any()
    allowed = torch.tensor([i for i in range(n) if i != 7])
    assert _chi_square(draws, allowed, n) < 42.31


def test_debiased_never_returns_excluded_items_and_is_uniform_over_the_rest():
    n, exclude = 40, 10
    table = _random_table(n, 12)
    table[3, :2] = torch.tensor([0, n - 1])  # excluded items at both ends of the index range
    sampler = DebiasedSampler(n, 20, table, exclude=exclude)
    g = torch.Generator().manual_seed(2)
    statistic = 0.0
    for anchor in (3, 0, n - 1):
        draws = torch.cat([sampler(torch.full((500,), anchor), g) for _ in range(2)])  # 20k draws
        excluded = set(table[anchor, :exclude].tolist()) | {anchor}
        assert not any(x in excluded for x in draws.unique().tolist())
        allowed = torch.tensor(sorted(set(range(n)) - excluded))
        assert len(allowed) == sampler.num_allowed == 29
        assert set(draws.unique().tolist()) == set(allowed.tolist())
        statistic += _chi_square(draws, allowed, n)
    # three anchors with 29 allowed items each: dof 3 * 28 = 84, critical value 129.80 at alpha = 1e-3
    assert statistic < 129.80


def test_debiased_on_every_anchor_of_a_batch():
    n = 50
    table = _random_table(n, 8, seed=3)
    anchors = torch.arange(n).repeat(20)
    out = DebiasedSampler(n, 40, table, exclude=8)(anchors, torch.Generator().manual_seed(0))
    excluded = torch.cat([anchors.unsqueeze(1), table[anchors]], dim=1)
    assert not (out.unsqueeze(2) == excluded.unsqueeze(1)).any()
    assert out.min() >= 0 and out.max() < n


def test_hard_takes_the_right_count_from_the_band_and_never_from_the_excluded_set():
    n, k, exclude, pool = 2000, 1000, 16, 64
    table = _random_table(n, exclude + pool + 8, seed=4)
    sampler = HardSampler(n, k, table, exclude=exclude, hard_fraction=0.25, hard_pool=pool)
    assert sampler.num_hard == 250
    anchors = torch.tensor([5, 17, 1999, 0])
    out = sampler(anchors, torch.Generator().manual_seed(5))
    assert out.shape == (4, k)
    excluded = torch.cat([anchors.unsqueeze(1), table[anchors, :exclude]], dim=1)
    band = table[anchors, exclude:exclude + pool]
    assert not (out.unsqueeze(2) == excluded.unsqueeze(1)).any()
    in_band = (out.unsqueeze(2) == band.unsqueeze(1)).any(dim=2)
    assert in_band[:, :250].all()
    # the debiased rest hits the 64-item band only by chance: 750 * 64 / 1983 ≈ 24 per row
    assert (in_band[:, 250:].sum(dim=1) < 60).all()
    assert len(out[0, :250].unique()) > 50  # the band is sampled broadly, not one item
    # hard_fraction 0 is debiased, 1 is all-hard
    zero = HardSampler(n, k, table, exclude=exclude, hard_fraction=0.0, hard_pool=pool)
    assert zero.num_hard == 0 and (zero(anchors).unsqueeze(2) == band.unsqueeze(1)).any(dim=2).sum() < 240
    one = HardSampler(n, k, table, exclude=exclude, hard_fraction=1.0, hard_pool=pool)(anchors)
    assert (one.unsqueeze(2) == band.unsqueeze(1)).any(dim=2).all()


@pytest.mark.parametrize("kind", ["uniform", "debiased", "hard"])
def test_deterministic_shape_dtype_and_device(kind):
    n = 300
    table = _random_table(n, 40, seed=6)
    sampler = build_sampler(kind, n, 100, table, exclude=8, hard_fraction=0.2, hard_pool=32)
    anchors = torch.tensor([0, 5, 299], dtype=torch.int32)
    g = torch.Generator().manual_seed(123)
    state = g.get_state()
    first = sampler(anchors, g)
    assert first.dtype == torch.int64 and first.shape == (3, 100) and first.device == anchors.device
    assert not torch.equal(first, sampler(anchors, g))  # the stream advances
    g.set_state(state)
    assert torch.equal(first, sampler(anchors, g))
    assert torch.equal(first, sampler(anchors, torch.Generator().manual_seed(123)))
    torch.manual_seed(7)
    global_draw = sampler(anchors)
    torch.manual_seed(7)
    assert torch.equal(global_draw, sampler(anchors))
    assert sampler.state_dict() == {}  # tables are rebuilt from the cache, not stored in checkpoints


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["uniform", "debiased", "hard"])
def test_samples_on_cuda(kind):
    n = 300
    table = _random_table(n, 40, seed=6)
    sampler = build_sampler(kind, n, 100, table, exclude=8, hard_pool=32).to("cuda")
    anchors = torch.arange(64, device="cuda")
    out = sampler(anchors, torch.Generator("cuda").manual_seed(0))
    assert out.device == anchors.device and out.dtype == torch.int64 and out.shape == (64, 100)
    assert not (out == anchors.unsqueeze(1)).any()


def _one_line_error(fn, *names):
    with pytest.raises(CKTFError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in names), message


def test_errors_name_the_option():
    table = _random_table(100, 40)
    _one_line_error(lambda: build_sampler("uniform", 100, 100), "sampler.num_negatives", "K=100", "N=100")
    _one_line_error(lambda: build_sampler("debiased", 100, 90, table, exclude=10), "sampler.num_negatives", "89")
    _one_line_error(lambda: build_sampler("random", 100, 10), "sampler.kind", "uniform, debiased, hard")
    _one_line_error(lambda: build_sampler("hard", 100, 10, table, hard_fraction=1.5), "sampler.hard_fraction")
    _one_line_error(lambda: build_sampler("hard", 100, 10, table, exclude=8, hard_pool=64),
                    "sampler.hard_pool", "sampler.k", "72")
    _one_line_error(lambda: build_sampler("debiased", 100, 10, table, exclude=41), "sampler.k", "exclude")
    _one_line_error(lambda: build_sampler("debiased", 120, 10, table), "100", "120")
    with pytest.raises(ValueError, match="distinct"):
        DebiasedSampler(100, 10, torch.zeros(100, 4, dtype=torch.long), exclude=4)


def test_shared_uniform_sampler_returns_one_set_for_the_batch():
    from transfer.sampling import SharedUniformSampler

    sampler = build_sampler("uniform", 50, 7, shared=True)
    assert isinstance(sampler, SharedUniformSampler)
    out = sampler(torch.arange(5), generator=torch.Generator().manual_seed(0))
    assert out.shape == (7,) and out.dtype == torch.int64 and int(out.min()) >= 0 and int(out.max()) < 50
    counts = torch.bincount(torch.cat([sampler(torch.arange(3)) for _ in range(4000)]), minlength=50).float()
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()
    with pytest.raises(CKTFError, match="sampler.shared"):
        build_sampler("debiased", 50, 7, torch.zeros(50, 2, dtype=torch.long), shared=True)
