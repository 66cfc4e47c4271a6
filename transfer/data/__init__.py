"""Datasets by name. Every dataset yields ``(image, target, index)``.

``image`` is the transform's output (a uint8 ``C×H×W`` tensor without one), ``target`` the class
index or ``-1`` for unlabeled samples, and ``index`` the sample's position in the dataset, so that
a memory bank can be addressed by it. Every dataset has ``classes``, ``num_classes``,
``in_channels``, ``targets`` (a LongTensor) and ``root``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from torch.utils.data import Dataset

from transfer.data import cifar, fashion_mnist, fashion_split, image_folder, stl10, tinyimagenet
from transfer.data.indexed import IndexedSubset, holdout_split
from transfer.data.transforms import DEFAULT_IMAGE_SIZE, build_transform
from transfer.errors import CKTFError

__all__ = [
    "DATASETS",
    "IndexedSubset",
    "build_dataset",
    "build_transform",
    "dataset_splits",
    "default_image_size",
    "holdout_split",
]


@dataclass(frozen=True)
class _Spec:
    factory: Callable[..., Dataset]
    splits: tuple[str, ...]
    options: tuple[str, ...] = ()


_SPECS: dict[str, _Spec] = {
    "stl10": _Spec(stl10.STL10, stl10.SPLITS, ("fold",)),
    "tinyimagenet": _Spec(tinyimagenet.TinyImageNet, tinyimagenet.SPLITS),
    "fashion_mnist": _Spec(fashion_mnist.FashionMNIST, fashion_mnist.SPLITS),
    "fashion_split": _Spec(
        fashion_split.FashionSplit,
        fashion_split.SPLITS,
        ("source_classes", "target_classes", "labels_per_class", "split_seed", "split_images", "target_shift"),
    ),
    "image_folder": _Spec(image_folder.image_folder, image_folder.SPLITS),
    "cifar10": _Spec(cifar.cifar10, cifar.SPLITS),
    "cifar100": _Spec(cifar.cifar100, cifar.SPLITS),
}
DATASETS: tuple[str, ...] = ("stl10", "tinyimagenet", "fashion_mnist", "fashion_split", "image_folder", "cifar10",
                             "cifar100")


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise CKTFError(f"unknown dataset {name!r} (data.name); expected one of {', '.join(DATASETS)}")
    return _SPECS[name]


def dataset_splits(name: str) -> tuple[str, ...]:
    """The split names ``name`` accepts."""
    return _spec(name).splits


def default_image_size(name: str) -> int:
    """The side length ``build_transform(name, ...)`` produces by default (64 natural, 28 Fashion-MNIST)."""
    _spec(name)
    return DEFAULT_IMAGE_SIZE[name]


def build_dataset(
    name: str, split: str, root: str | os.PathLike | None, transform: Callable | None = None, **options
) -> Dataset:
    """Open split ``split`` of dataset ``name`` stored under ``root``; ``options`` are dataset-specific.

    Options: stl10 ``fold``; fashion_split ``source_classes``, ``target_classes``,
    ``labels_per_class``, ``split_seed``, ``split_images``, ``target_shift``. ``root=None`` is only
    meaningful for the Fashion-MNIST datasets, which then use the system copy.
    """
    spec = _spec(name)
    if root is not None and os.path.exists(root) and not os.path.isdir(root):
        raise CKTFError(f"data root {root} (data.root) is a file; expected the directory holding {name}")
    if split not in spec.splits:
        raise CKTFError(f"dataset {name} has no split {split!r}; expected one of {', '.join(spec.splits)}")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = ", ".join(spec.options) or "none"
        raise CKTFError(f"dataset {name} has no option {', '.join(unknown)}; valid options: {valid}")
    return spec.factory(root, split, transform=transform, **options)
