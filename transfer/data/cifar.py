"""CIFAR-10 and CIFAR-100 from their official "python version" downloads, read without trusting pickle.

The official files (``cifar-10-batches-py/``, ``cifar-100-python/``) are Python pickles: a dict of byte
strings, lists and one uint8 numpy array. Unpickling an arbitrary file can run any code, so they are read
with an unpickler that resolves only the few globals those files contain (numpy's array reconstruction);
a file naming anything else is refused in one line and nothing in it runs. There is no MD5 check (as
torchvision has), so files written by tests in the same format load exactly as the real ones.

Layout (``data.root`` is the folder holding the unpacked directory, or that directory itself)::

    cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    cifar-100-python/{train, test, meta}
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from transfer.errors import CKTFError

SPLITS: tuple[str, ...] = ("train", "test")
# Globals the official pickles reference (numpy 1 and numpy 2 module names); nothing else is resolved.
SAFE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
})


class UnsafePickle(Exception):
    """A pickle that references a global outside :data:`SAFE_GLOBALS`."""


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickle(f"{module}.{name}")


def load_batch(path: Path) -> dict[bytes, Any]:
    """One official CIFAR pickle as a dict with byte-string keys; refuses anything but containers and arrays."""
    try:
        with open(path, "rb") as fh:
            content = _ArrayOnlyUnpickler(fh, encoding="bytes").load()
    except UnsafePickle as err:
        raise CKTFError(f"refusing {path}: it is not a plain CIFAR batch (the pickle references {err}, which could "
                        "run code); nothing in it was run") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise CKTFError(f"cannot read CIFAR file {path}: {' '.join(str(err).split()) or type(err).__name__}") from None
    if not isinstance(content, dict):
        raise CKTFError(f"CIFAR file {path} holds a {type(content).__name__}; expected the official dict of arrays")
    return content


class _Variant:
    def __init__(self, folder: str, files: dict[str, tuple[str, ...]], meta: str, labels: bytes, names: bytes) -> None:
        self.folder, self.files, self.meta, self.labels, self.names = folder, files, meta, labels, names


VARIANTS = {
    "cifar10": _Variant("cifar-10-batches-py", {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                                                "test": ("test_batch",)}, "batches.meta", b"labels", b"label_names"),
    "cifar100": _Variant("cifar-100-python", {"train": ("train",), "test": ("test",)}, "meta", b"fine_labels",
                         b"fine_label_names"),
}


def find_cifar_dir(root: str | os.PathLike | None, variant: str) -> Path:
    """``root/<official folder>`` or ``root`` itself when it is that folder."""
    spec = VARIANTS[variant]
    if root is None:
        raise CKTFError(f"{variant}: no data root given; pass --data.root DIR holding {spec.folder}/ "
                        f"(the official 'python version' download, unpacked)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise CKTFError(f"{variant} root {path} does not exist; expected a folder holding {spec.folder}/")
    inner = path / spec.folder
    return inner if inner.is_dir() else path


def _images(batch: dict, path: Path) -> np.ndarray:
    data = batch.get(b"data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        raise CKTFError(f"CIFAR file {path}: b'data' must be a uint8 array of N x 3072 pixels, got {shape}")
    return data.reshape(-1, 3, 32, 32)


class CIFAR(Dataset):
    """CIFAR-10 / CIFAR-100 ``train`` (50K) or ``test`` (10K): uint8 ``3×32×32`` images.

    Args:
        root: the folder holding ``cifar-10-batches-py/`` or ``cifar-100-python/`` (or that folder).
        split: ``train`` or ``test``.
        transform: applied to each uint8 image tensor.
        variant: ``cifar10`` or ``cifar100`` (fine labels).
    """

    in_channels = 3

    def __init__(self, root: str | os.PathLike | None, split: str = "train", transform: Callable | None = None,
                 variant: str = "cifar100") -> None:
        if split not in SPLITS:
            raise CKTFError(f"{variant} split {split!r} is unknown; expected one of {', '.join(SPLITS)}")
        spec = VARIANTS[variant]
        self.root = find_cifar_dir(root, variant)
        images, labels = [], []
        for name in spec.files[split]:
            path = self.root / name
            if not path.is_file():
                raise CKTFError(f"{variant} file {path} is missing; expected the official {spec.folder}/ files "
                                f"({', '.join(spec.files[split])}, {spec.meta})")
            batch = load_batch(path)
            images.append(_images(batch, path))
            target = np.asarray(batch.get(spec.labels, []), dtype=np.int64)
            if target.shape != (images[-1].shape[0],):
                raise CKTFError(f"CIFAR file {path}: {spec.labels!r} must hold one label per image")
            labels.append(target)
        meta_path = self.root / spec.meta
        names = load_batch(meta_path).get(spec.names) if meta_path.is_file() else None
        self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names] if names else None
        self.data = torch.from_numpy(np.concatenate(images))
        self.targets = torch.from_numpy(np.concatenate(labels))
        self.num_classes = len(self.classes) if self.classes else (10 if variant == "cifar10" else 100)
        self.classes = self.classes or [str(i) for i in range(self.num_classes)]
        if len(self.targets) and not (0 <= int(self.targets.min()) and int(self.targets.max()) < self.num_classes):
            raise CKTFError(f"{variant} labels in {self.root} fall outside 0..{self.num_classes - 1}")
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image = self.data[index].clone()
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index]), index


def cifar10(root: str | os.PathLike | None, split: str = "train", transform: Callable | None = None) -> CIFAR:
    return CIFAR(root, split, transform, variant="cifar10")


def cifar100(root: str | os.PathLike | None, split: str = "train", transform: Callable | None = None) -> CIFAR:
    return CIFAR(root, split, transform, variant="cifar100")
