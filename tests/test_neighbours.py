"""Neighbour tables: agree with brute force, never contain the item itself, and are cached by key."""

import hashlib
import logging

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("faiss")  # the tables are faiss searches; a machine without faiss skips this file

from transfer.errors import CKTFError  # noqa: E402
from transfer.sampling import build_neighbour_table, cached_neighbour_table, file_sha256  # noqa: E402


def _features(n: int = 500, c: int = 16, seed: int = 0) -> torch.Tensor:
    """Clustered vectors, like a teacher's features: 10 centres plus noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, c, generator=g) * 2
    return centres[torch.randint(0, 10, (n,), generator=g)] + torch.randn(n, c, generator=g)


def _brute_force(features: torch.Tensor, k: int) -> torch.Tensor:
    x = torch.nn.functional.normalize(features, dim=1)
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))
    return sim.topk(k, dim=1).indices


def _check_rows(table: torch.Tensor, n: int, k: int) -> None:
    assert table.dtype == torch.int64 and table.shape == (n, k)
    assert table.min() >= 0 and table.max() < n
    assert not (table == torch.arange(n).unsqueeze(1)).any()
    assert (table.sort(dim=1).values.diff(dim=1) > 0).all()  # k distinct entries per row


def _recall(table: torch.Tensor, truth: torch.Tensor) -> float:
    return (table.unsqueeze(2) == truth.unsqueeze(1)).any(dim=2).float().mean().item()


@pytest.mark.parametrize("index", ["flat", "auto"])
def test_exact_search_matches_brute_force(index):
    features = _features()
    table = build_neighbour_table(features, 8, index=index)
    _check_rows(table, 500, 8)
    assert torch.equal(table.sort(dim=1).values, _brute_force(features, 8).sort(dim=1).values)
    x = torch.nn.functional.normalize(features, dim=1)
    sims = (x.unsqueeze(1) * x[table]).sum(dim=2)
    assert (sims.diff(dim=1) <= 1e-6).all()  # nearest first


def test_ivf_has_high_recall():
    features = _features()
    table = build_neighbour_table(features, 8, index="ivf", nlist=8, nprobe=4)
    _check_rows(table, 500, 8)
    assert _recall(table, _brute_force(features, 8)) >= 0.9


def test_ivf_rows_with_too_few_candidates_are_filled_exactly():
    features = torch.randn(500, 16, generator=torch.Generator().manual_seed(1))
    # 100 lists of ~5 items with one probed: faiss returns -1 for most rows, which are searched exactly
    table = build_neighbour_table(features, 8, index="ivf", nlist=100, nprobe=1)
    _check_rows(table, 500, 8)
    assert _recall(table, _brute_force(features, 8)) > 0.9


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_duplicate_vectors(index):
    features = _features(200)
    features[:30] = features[0]  # 30 identical vectors: an item may be outranked by its own copies
    table = build_neighbour_table(features, 8, index=index, nlist=4, nprobe=4)
    _check_rows(table, 200, 8)
    assert (table[:30] < 30).all()  # a copy's nearest neighbours are the other copies


def test_bad_k_and_features():
    features = _features(50)
    for k in (0, 50, 60):
        with pytest.raises(CKTFError, match=r"sampler\.k") as info:
            build_neighbour_table(features, k)
        assert "\n" not in str(info.value)
    features[3, 2] = float("nan")
    with pytest.raises(CKTFError, match="NaN"):
        build_neighbour_table(features, 4)
    with pytest.raises(CKTFError, match=r"sampler\.nlist"):
        build_neighbour_table(_features(50), 4, index="ivf", nlist=51)


def test_file_sha256(tmp_path):
    data = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "teacher.safetensors"
    path.write_bytes(data.numpy().tobytes())
    assert file_sha256(path) == hashlib.sha256(data.numpy().tobytes()).hexdigest()
    with pytest.raises(CKTFError, match="does not exist"):
        file_sha256(tmp_path / "missing")


class _Features:
    """compute_features with a call counter."""

    def __init__(self, features: torch.Tensor):
        self.features, self.calls = features, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.features


def test_cache_reuses_rebuilds_and_writes_atomically(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cktf")
    compute = _Features(_features(120))
    key = {"teacher": "a" * 64, "dataset": "stl10", "split": "unlabeled", "N": 120}
    first = cached_neighbour_table(tmp_path, key, compute, 6)
    assert compute.calls == 1 and "built" in caplog.text
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("neighbours-") and files[0].suffix == ".safetensors"

    caplog.clear()
    again = cached_neighbour_table(tmp_path, dict(reversed(key.items())), compute, 6)  # key order is irrelevant
    assert compute.calls == 1 and torch.equal(first, again) and again.dtype == torch.int64
    assert "reused" in caplog.text

    cached_neighbour_table(tmp_path, {**key, "teacher": "b" * 64}, compute, 6)
    cached_neighbour_table(tmp_path, key, compute, 7)
    cached_neighbour_table(tmp_path, key, compute, 6, index="ivf", nlist=4)
    assert compute.calls == 4 and len(list(tmp_path.iterdir())) == 4

    files[0].write_bytes(b"not a safetensors file")
    assert torch.equal(cached_neighbour_table(tmp_path, key, compute, 6), first)
    assert compute.calls == 5
    assert torch.equal(cached_neighbour_table(tmp_path, key, compute, 6), first) and compute.calls == 5
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".safetensors")]  # no temp files left


def test_cache_rebuilds_a_table_of_the_wrong_shape(tmp_path):
    compute = _Features(_features(80))
    key = {"teacher": "c" * 64, "N": 80}
    table = cached_neighbour_table(tmp_path, key, compute, 5)
    (path,) = tmp_path.iterdir()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    save_file({"neighbours": table[:70].to(torch.int32).contiguous()}, str(path), metadata=metadata)
    assert torch.equal(cached_neighbour_table(tmp_path, key, compute, 5), table)
    assert compute.calls == 2
    with pytest.raises(ValueError, match="N=90"):
        cached_neighbour_table(tmp_path, {**key, "N": 90}, compute, 5)
