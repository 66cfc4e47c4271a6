"""Weighted k-nearest-neighbour probe: a training-free second opinion on frozen features.

Why: a linear probe's accuracy also depends on its own optimisation (learning rate, epochs). A kNN
classifier has nothing to train, so when both probes rank the methods alike the ranking is about the
features. As in instance-discrimination papers (Wu et al., 2018), features are l2-normalised, the
``k`` nearest training items by cosine similarity (exact search, faiss ``IndexFlatIP``) each vote for
their label with weight ``exp(sim / temperature)``, and the class with the largest sum wins.

Example::

    pred = knn_predict(train_f, train_y, test_f, num_classes=10)            # LongTensor [N_test]
    acc = knn_accuracy(train_f, train_y, test_f, test_y, num_classes=10)    # 0.81
"""

from __future__ import annotations

import faiss
import torch
from torch import Tensor

from transfer.errors import CKTFError
from transfer.sampling.faiss_utils import faiss_threads, normalised_float32


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 4096,
) -> Tensor:
    """Predicted label of every test row by a similarity-weighted vote of its ``k`` nearest train rows.

    Returns a CPU LongTensor ``[N_test]``. ``k`` larger than the train set uses the whole train set.
    Queries are searched ``batch_size`` at a time, with ``torch.get_num_threads()`` faiss threads.
    Ties between classes go to the smaller class index.

    Example::

        knn_predict(torch.randn(500, 64), torch.randint(0, 10, (500,)), torch.randn(80, 64), 10, k=5)
    """
    _check_features(train_features, test_features)
    _check_labels(train_labels, train_features.shape[0], num_classes, "train")
    if k < 1:
        raise CKTFError(f"kNN probe: k must be >= 1 (neighbours per query), got {k}")
    if not temperature > 0:
        raise CKTFError(f"kNN probe: temperature must be > 0, got {temperature}")
    if batch_size < 1:
        raise CKTFError(f"kNN probe: batch_size must be >= 1 (queries per search), got {batch_size}")

    train, test = normalised_float32(train_features), normalised_float32(test_features)
    labels = train_labels.detach().to("cpu", torch.long)
    k = min(k, train.shape[0])
    predictions = [torch.empty(0, dtype=torch.long)]
    with faiss_threads(torch.get_num_threads()):
        index = faiss.IndexFlatIP(train.shape[1])
        index.add(train)
        for start in range(0, test.shape[0], batch_size):
            sims, ids = index.search(test[start:start + batch_size], k)
            if (ids < 0).any():
                raise RuntimeError("faiss returned -1 from an exact search; please report this as a bug")
            ids_t = torch.from_numpy(ids)
            predictions.append(_vote(torch.from_numpy(sims), labels[ids_t], num_classes, temperature))
    return torch.cat(predictions)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Fraction in [0, 1] of test rows whose weighted-kNN prediction equals their label.

    Example::

        knn_accuracy(train_f, train_y, test_f, test_y, num_classes=10, k=200, temperature=0.1)  # 0.79
    """
    _check_features(train_features, test_features)
    _check_labels(test_labels, test_features.shape[0], num_classes, "test")
    if test_labels.numel() == 0:
        raise CKTFError("kNN probe: the test set is empty; nothing to measure")
    pred = knn_predict(train_features, train_labels, test_features, num_classes, k=k, temperature=temperature)
    return (pred == test_labels.detach().to("cpu", torch.long)).float().mean().item()


def _vote(sims: Tensor, neighbour_labels: Tensor, num_classes: int, temperature: float) -> Tensor:
    # Shifting by the row maximum keeps exp() finite for small temperatures; the argmax is unchanged.
    weights = ((sims - sims.amax(dim=1, keepdim=True)) / temperature).exp()
    votes = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype)
    votes.scatter_add_(1, neighbour_labels, weights)
    return votes.argmax(dim=1)


def _check_features(train: Tensor, test: Tensor) -> None:
    if train.dim() != 2 or test.dim() != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"features must be 2-D [N, C] with the same C, got train {tuple(train.shape)} "
                         f"and test {tuple(test.shape)}")
    if train.shape[0] == 0:
        raise CKTFError("kNN probe: the train set is empty; the probe-train split has no labeled items")
    for name, x in (("train", train), ("test", test)):
        if not torch.isfinite(x).all():
            raise CKTFError(f"kNN probe: {name} features contain NaN or inf; check the student checkpoint")


def _check_labels(labels: Tensor, n: int, num_classes: int, name: str) -> None:
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} labels must be 1-D with one label per feature row ({n}), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} labels must be integers, got {labels.dtype}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.numel() == 0:
        return
    low, high = labels.min().item(), labels.max().item()
    if low < 0:
        raise CKTFError(f"kNN probe: {name} labels contain {low} (unlabeled items); "
                        "pass a labeled split, not the unlabeled transfer pool")
    if high >= num_classes:
        raise CKTFError(f"kNN probe: {name} label {high} is out of range for num_classes={num_classes}")


