"""Train/eval pipelines (``torchvision.transforms.v2``) for uint8 ``C×H×W`` image tensors.

Natural-image datasets follow the paper setting: everything at 64×64 (STL-10's 96×96 images are
downscaled so source and target networks see the same resolution), normalised with ImageNet
statistics. Fashion-MNIST keeps its 28×28 grayscale images and CIFAR its 32×32 ones, with pad-and-crop
(2 and 4 px) plus flip for training and statistics of their own train sets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from transfer.errors import CKTFError

IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)
# Per-pixel mean/std of the 60K Fashion-MNIST train images scaled to [0, 1]: 0.28604, 0.35302.
FASHION_MNIST_MEAN: tuple[float, ...] = (0.2860,)
FASHION_MNIST_STD: tuple[float, ...] = (0.3530,)

# CIFAR train-set statistics (the usual values of CRD/RepDistiller-style training).
CIFAR_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

NATURAL_DATASETS: tuple[str, ...] = ("stl10", "tinyimagenet", "image_folder")
FASHION_DATASETS: tuple[str, ...] = ("fashion_mnist", "fashion_split")
CIFAR_DATASETS: tuple[str, ...] = tuple(CIFAR_STATS)
DEFAULT_IMAGE_SIZE = {**dict.fromkeys(NATURAL_DATASETS, 64), **dict.fromkeys(FASHION_DATASETS, 28),
                      **dict.fromkeys(CIFAR_DATASETS, 32)}
# Small fixed-size datasets train with pad-and-crop at their native size (CIFAR: 4 px, as CRD; Fashion: 2 px).
CROP_PADDING = {**dict.fromkeys(FASHION_DATASETS, 2), **dict.fromkeys(CIFAR_DATASETS, 4)}


def resolve_image_size(dataset: str, image_size: int | None = None) -> int:
    """The side length the pipelines of ``dataset`` produce (``image_size``, or the dataset's default)."""
    if dataset not in DEFAULT_IMAGE_SIZE:
        raise CKTFError(
            f"unknown dataset {dataset!r} (data.name); expected one of {', '.join(DEFAULT_IMAGE_SIZE)}"
        )
    size = DEFAULT_IMAGE_SIZE[dataset] if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise CKTFError(f"image size {image_size!r} is invalid; expected a positive integer")
    return size


def resolve_normalization(dataset: str, mean: Sequence[float] | None = None,
                          std: Sequence[float] | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the pipelines of ``dataset`` normalise with: the given ones, else the dataset's.

    A network pretrained elsewhere expects its own statistics (e.g. ImageNet's for torchvision weights),
    which is why they can be given instead of being fixed by the dataset.
    """
    resolve_image_size(dataset)
    fallback = (IMAGENET_MEAN, IMAGENET_STD) if dataset in NATURAL_DATASETS else (FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    default_mean, default_std = CIFAR_STATS.get(dataset, fallback)
    mean = tuple(float(m) for m in mean) if mean is not None else default_mean
    std = tuple(float(s) for s in std) if std is not None else default_std
    if len(mean) != len(std) or not all(s > 0 for s in std):
        raise CKTFError(f"normalisation mean {list(mean)} and std {list(std)} need one value per channel and a "
                        "positive std")
    return mean, std


def build_transform(dataset: str, train: bool, image_size: int | None = None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> v2.Compose:
    """The train (augmenting) or eval (deterministic) pipeline of ``dataset``; outputs float32 ``C×S×S``.

    ``mean``/``std`` replace the dataset's normalisation statistics (see :func:`resolve_normalization`).
    """
    size = resolve_image_size(dataset, image_size)
    mean, std = resolve_normalization(dataset, mean, std)
    if dataset in NATURAL_DATASETS:
        if train:
            steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            steps = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    else:
        steps = [] if size == DEFAULT_IMAGE_SIZE[dataset] else [v2.Resize(size, antialias=True)]
        if train:
            steps += [v2.RandomCrop(size, padding=CROP_PADDING[dataset]), v2.RandomHorizontalFlip()]
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def build_decode_transform(dataset: str, image_size: int | None = None) -> v2.Compose | None:
    """The per-image part of batched augmentation: uint8 images of one size, so they collate into a batch.

    Deterministic and without float conversion (a quarter of the bytes through workers and collation);
    the random crop, flip and normalisation run on the whole batch (:mod:`transfer.data.batch_augment`).
    ``None`` (images pass unchanged) where a dataset's images all share one size: STL-10, Tiny-ImageNet
    and Fashion-MNIST at 28 px. Fashion-MNIST at another ``image_size`` is resized first, as in
    :func:`build_transform`; image folders, whose images may differ in size, are resized (shorter side
    to S, antialiased) and centre-cropped to S×S, so batched crops see only that central square.
    """
    size = resolve_image_size(dataset, image_size)
    if dataset == "image_folder":
        return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    if dataset in NATURAL_DATASETS or size == DEFAULT_IMAGE_SIZE[dataset]:
        return None
    return v2.Compose([v2.Resize(size, antialias=True)])
