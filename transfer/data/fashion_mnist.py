"""Fashion-MNIST read straight from its IDX files (gzipped or raw).

We read IDX ourselves instead of using ``torchvision.datasets.FashionMNIST(download=False)``
because that class only looks for *uncompressed* files under ``ROOT/FashionMNIST/raw/``, while the
Debian package ``dataset-fashion-mnist`` (and the upstream repository) ship ``.gz`` files in a flat
folder, and the packaged ``.gz`` files do not match torchvision's download checksums, so even its
download path cannot adopt them. The format is simple enough to validate fully here.

Lookup: ``root`` (the files directly in it, or under ``root/FashionMNIST/raw/``); with no root,
:data:`DEFAULT_DIR`. A root that is given but missing is an error, never a silent fallback.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from transfer.errors import CKTFError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
SPLITS: tuple[str, ...] = ("train", "test")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_HOW_TO_GET = (
    "install them with `apt-get install dataset-fashion-mnist` or download the four IDX files from "
    "github.com/zalandoresearch/fashion-mnist (data/fashion) into --data.root"
)
_UBYTE = 0x08


def read_idx(path: str | os.PathLike, ndim: int) -> torch.Tensor:
    """Read an unsigned-byte IDX file (``.gz`` or raw) with ``ndim`` dimensions into a uint8 tensor.

    IDX: two zero bytes, a type byte (0x08 = uint8), a dimension count, big-endian int32 sizes, data.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise CKTFError(f"cannot read IDX file {path}: {' '.join(str(exc).split())}") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] != ndim:
        raise CKTFError(
            f"IDX file {path} starts with {raw[:4].hex() or 'nothing'}; expected magic 000008{ndim:02x} "
            f"(uint8, {ndim} dimensions)"
        )
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(shape)
    if len(raw) != expected:
        raise CKTFError(
            f"IDX file {path} has {len(raw)} bytes (uncompressed); "
            f"expected {expected} for shape {tuple(shape)}"
        )
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def find_fashion_dir(root: str | os.PathLike | None) -> Path:
    """The folder holding the IDX files: ``root``, ``root/FashionMNIST/raw`` or :data:`DEFAULT_DIR`."""
    if root is None:
        if DEFAULT_DIR.is_dir():
            return DEFAULT_DIR
        raise CKTFError(
            f"Fashion-MNIST not found: no data root given and {DEFAULT_DIR} does not exist; {_HOW_TO_GET}"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise CKTFError(f"Fashion-MNIST root {path} does not exist; expected a folder with the IDX files")
    for candidate in (path, path / "FashionMNIST" / "raw"):
        if any(
            (candidate / stem).is_file() or (candidate / f"{stem}.gz").is_file() for stem in FILES["train"]
        ):
            return candidate
    return path


def _locate(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise CKTFError(f"Fashion-MNIST file {directory / stem}(.gz) is missing; {_HOW_TO_GET}")


@functools.lru_cache(maxsize=4)
def _load_cached(images_path: Path, labels_path: Path, stamp: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1).long()
    if tuple(images.shape[1:]) != (28, 28):
        raise CKTFError(f"IDX file {images_path} holds {tuple(images.shape[1:])} images; expected 28×28")
    if len(labels) != len(images):
        raise CKTFError(
            f"IDX file {labels_path} has {len(labels)} labels; expected {len(images)} "
            f"(one per image in {images_path.name})"
        )
    if len(labels) and int(labels.max()) >= len(CLASSES):
        raise CKTFError(
            f"IDX file {labels_path} has label {int(labels.max())}; expected 0..{len(CLASSES) - 1}"
        )
    return images.unsqueeze(1), labels


def load_fashion_mnist(root: str | os.PathLike | None, split: str) -> tuple[torch.Tensor, torch.Tensor, Path]:
    """``(images N×1×28×28 uint8, labels N int64, folder)`` of a split; cached, so treat them as read-only."""
    if split not in SPLITS:
        raise CKTFError(f"Fashion-MNIST split {split!r} is unknown; expected one of {', '.join(SPLITS)}")
    directory = find_fashion_dir(root)
    images_path, labels_path = (_locate(directory, stem) for stem in FILES[split])
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (images_path, labels_path))
    images, labels = _load_cached(images_path.resolve(), labels_path.resolve(), stamp)
    return images, labels, directory


class FashionMNIST(Dataset):
    """Fashion-MNIST ``train`` (60K) or ``test`` (10K): uint8 ``1×28×28`` images, 10 classes."""

    in_channels = 1
    num_classes = len(CLASSES)

    def __init__(
        self, root: str | os.PathLike | None = None, split: str = "train", transform: Callable | None = None
    ) -> None:
        self.data, self.targets, self.root = load_fashion_mnist(root, split)
        self.classes = list(CLASSES)
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image = self.data[index].clone()  # the cached array is shared between datasets
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index]), index
