"""Weighted kNN probe: agrees with brute force, separates clusters, handles k > N, rejects unlabeled data."""

from __future__ import annotations

import pytest
import torch

faiss = pytest.importorskip("faiss")  # kNN runs on faiss; a machine without faiss skips this file

from linear_probe import knn  # noqa: E402
from linear_probe.knn import knn_accuracy, knn_predict  # noqa: E402
from transfer.errors import CKTFError  # noqa: E402


def _brute_force(train, labels, test, num_classes, k, temperature):
    sims = torch.nn.functional.normalize(test, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    top = sims.topk(min(k, train.shape[0]), dim=1)
    votes = torch.zeros(test.shape[0], num_classes, dtype=test.dtype)
    votes.scatter_add_(1, labels[top.indices], (top.values / temperature).exp())
    return votes.argmax(dim=1)


def _random(n_train=300, n_test=120, c=16, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_train, c, generator=g), torch.randint(0, classes, (n_train,), generator=g),
            torch.randn(n_test, c, generator=g))


@pytest.mark.parametrize("k, temperature, batch_size", [(20, 0.07, 4096), (5, 0.5, 7), (1, 0.07, 50)])
def test_matches_brute_force(k, temperature, batch_size):
    train, labels, test = _random()
    pred = knn_predict(train, labels, test, 7, k=k, temperature=temperature, batch_size=batch_size)
    assert pred.dtype == torch.int64 and pred.shape == (120,)
    assert torch.equal(pred, _brute_force(train, labels, test, 7, k, temperature))


def test_weights_matter():
    # 2 far neighbours of class 0 outvote 1 near neighbour of class 1 only when the temperature is high
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.2]])
    assert knn_predict(train, labels, query, 2, k=3, temperature=0.07).item() == 1
    assert knn_predict(train, labels, query, 2, k=3, temperature=100.0).item() == 0


def test_well_separated_clusters():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(5, 32, generator=g) * 10
    ytr, yte = torch.randint(0, 5, (400,), generator=g), torch.randint(0, 5, (200,), generator=g)
    xtr = centres[ytr] + torch.randn(400, 32, generator=g)
    xte = centres[yte] + torch.randn(200, 32, generator=g)
    assert knn_accuracy(xtr, ytr, xte, yte, 5) >= 0.99
    # shuffled train labels carry no information: near chance
    assert knn_accuracy(xtr, ytr[torch.randperm(400, generator=g)], xte, yte, 5) < 0.5


def test_k_larger_than_train_set_uses_all_of_it():
    train, labels, test = _random(n_train=6, n_test=10, classes=3)
    pred = knn_predict(train, labels, test, 3, k=50)
    assert torch.equal(pred, _brute_force(train, labels, test, 3, 6, 0.07))


def test_tiny_temperature_stays_finite():
    train, labels, test = _random()
    pred = knn_predict(train, labels, test, 7, k=20, temperature=1e-4)
    assert torch.equal(pred, _brute_force(train.double(), labels, test.double(), 7, 1, 1.0))  # ~ the nearest wins


def test_empty_test_set_and_float64_input():
    train, labels, test = _random()
    assert knn_predict(train, labels, test[:0], 7).shape == (0,)
    assert torch.equal(knn_predict(train.double(), labels, test.double(), 7), knn_predict(train, labels, test, 7))


def test_unlabeled_and_out_of_range_labels_raise():
    train, labels, test = _random()
    labels[3] = -1
    with pytest.raises(CKTFError, match="train labels contain -1.*unlabeled") as info:
        knn_predict(train, labels, test, 7)
    assert "\n" not in str(info.value)
    labels[3] = 0
    with pytest.raises(CKTFError, match="test labels contain -1"):
        knn_accuracy(train, labels, test, torch.full((120,), -1), 7)
    with pytest.raises(CKTFError, match="label 6 is out of range for num_classes=5"):
        knn_predict(train, labels, test, 5)


def test_bad_arguments():
    train, labels, test = _random()
    for kwargs, message in (({"k": 0}, "k must be >= 1"), ({"temperature": 0.0}, "temperature must be > 0")):
        with pytest.raises(CKTFError, match=message):
            knn_predict(train, labels, test, 7, **kwargs)
    with pytest.raises(CKTFError, match="features contain NaN"):
        knn_predict(train, labels, test.index_fill(0, torch.tensor([2]), float("nan")), 7)
    with pytest.raises(CKTFError, match="train set is empty"):
        knn_predict(train[:0], labels[:0], test, 7)
    with pytest.raises(ValueError, match="same C"):
        knn_predict(train, labels, test[:, :8], 7)


def test_uses_torch_threads_and_restores_faiss_threads(monkeypatch):
    before, original = faiss.omp_get_max_threads(), faiss.omp_set_num_threads
    calls = []

    def record(n):
        calls.append(n)
        original(n)

    monkeypatch.setattr(knn.faiss, "omp_set_num_threads", record, raising=True)
    knn_predict(*_random(), 7)
    monkeypatch.undo()
    assert calls == [torch.get_num_threads(), before]
    assert faiss.omp_get_max_threads() == before
