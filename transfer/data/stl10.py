"""STL-10 from the official binary layout, read by torchvision and returned as ``(image, target, index)``.

We subclass :class:`torchvision.datasets.STL10` to reuse its reader (it maps the pixel files once,
undoes their per-channel column-major order with a transposed *view* and slices folds), but replace
its integrity check: that one MD5-hashes every file, which takes long on the 2.6 GB unlabeled file
and rejects any file that is not byte-identical to the original archive. Ours checks what can
actually go wrong (missing files, truncated pixel files, label files out of step) and reports it as
a one-line :class:`CKTFError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision

from transfer.errors import CKTFError

IMAGE_BYTES = 3 * 96 * 96
SPLITS: tuple[str, ...] = ("train", "test", "unlabeled", "train+unlabeled")
NUM_FOLDS = 10
_LAYOUT = "the official layout stl10_binary/{train,test,unlabeled}_X.bin, {train,test}_y.bin, class_names.txt"


def resolve_stl10_root(root: str | os.PathLike | None) -> tuple[Path, str]:
    """Return ``(parent, folder)`` such that ``parent/folder`` holds the ``*.bin`` files.

    ``root`` may be the folder that contains ``stl10_binary/`` or the binary folder itself
    (whatever its name).
    """
    if root is None:
        raise CKTFError("dataset stl10 needs a data root: the folder that contains stl10_binary/")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise CKTFError(f"STL-10 root {path} does not exist; expected a folder containing stl10_binary/")
    if (path / STL10.base_folder).is_dir():
        return path, STL10.base_folder
    if any((path / name).is_file() for name in ("train_X.bin", "test_X.bin", "unlabeled_X.bin")):
        return path.parent, path.name
    raise CKTFError(
        f"STL-10 root {path} has no stl10_binary/ folder and no *_X.bin files; expected {_LAYOUT}"
    )


def _check_fold(fold: Any, split: str) -> int | None:
    if fold is None:
        return None
    if isinstance(fold, str) and fold.strip().isdigit():
        fold = int(fold)
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < NUM_FOLDS:
        raise CKTFError(
            f"STL-10 option fold={fold!r} is invalid; expected None or an integer 0..{NUM_FOLDS - 1}"
        )
    if split not in ("train", "train+unlabeled"):
        raise CKTFError(
            f"STL-10 option fold={fold} selects a predefined train fold; it only applies to splits "
            f"train and train+unlabeled, not {split!r}"
        )
    return fold


class STL10(torchvision.datasets.STL10):
    """STL-10 split ``train`` (5K), ``test`` (8K), ``unlabeled`` (100K) or ``train+unlabeled``.

    ``fold`` (0..9) keeps only the 1000 train images of that predefined fold. Images are uint8
    ``3×96×96`` tensors (before ``transform``); unlabeled images have target ``-1``.
    """

    in_channels = 3
    num_classes = 10

    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str = "train",
        fold: int | None = None,
        transform: Callable | None = None,
    ) -> None:
        if split not in SPLITS:
            raise CKTFError(f"STL-10 split {split!r} is unknown; expected one of {', '.join(SPLITS)}")
        fold = _check_fold(fold, split)
        parent, folder = resolve_stl10_root(root)
        self.base_folder = folder
        super().__init__(str(parent), split=split, folds=fold, transform=transform, download=False)
        self.fold = fold
        self.classes = self._read_class_names()
        # Shares memory with torchvision's (transposed) array: no copy of the 2.6 GB unlabeled file.
        self.images = torch.from_numpy(self.data)
        self.targets = torch.from_numpy(self.labels.astype("int64"))

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.base_folder

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image = self.images[index].contiguous()
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index]), index

    def _check_integrity(self) -> bool:
        """Replaces torchvision's MD5 check; raises :class:`CKTFError` instead of returning False."""
        n_train = None
        if self.split in ("train", "train+unlabeled"):
            n_train = self._check_pair("train")
        if self.split == "test":
            self._check_pair("test")
        if self.split in ("unlabeled", "train+unlabeled"):
            self._count_images(self._require("unlabeled_X.bin"))
        self._read_class_names()
        if self.folds is not None:
            self._check_fold_line(self.folds, n_train or 0)
        return True

    def _require(self, name: str) -> Path:
        path = self.folder / name
        if not path.is_file():
            raise CKTFError(f"STL-10 file {path} is missing; expected {_LAYOUT}")
        return path

    def _count_images(self, path: Path) -> int:
        size = path.stat().st_size
        if size == 0 or size % IMAGE_BYTES:
            raise CKTFError(
                f"STL-10 file {path} has {size} bytes; expected a positive multiple of {IMAGE_BYTES} "
                "(3×96×96 uint8 images)"
            )
        return size // IMAGE_BYTES

    def _check_pair(self, stem: str) -> int:
        n_images = self._count_images(self._require(f"{stem}_X.bin"))
        labels_path = self._require(f"{stem}_y.bin")
        labels = labels_path.read_bytes()
        if len(labels) != n_images:
            raise CKTFError(
                f"STL-10 file {labels_path} has {len(labels)} bytes; expected {n_images} "
                f"(one label byte per image in {stem}_X.bin)"
            )
        bad = next((i for i, v in enumerate(labels) if not 1 <= v <= self.num_classes), None)
        if bad is not None:
            raise CKTFError(
                f"STL-10 file {labels_path} has label {labels[bad]} at position {bad}; expected 1..10"
            )
        return n_images

    def _read_class_names(self) -> list[str]:
        path = self._require(self.class_names_file)
        names = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if len(names) != self.num_classes:
            raise CKTFError(f"STL-10 file {path} lists {len(names)} class names; expected {self.num_classes}")
        return names

    def _check_fold_line(self, fold: int, n_train: int) -> None:
        path = self._require(self.folds_list_file)
        lines = path.read_text(errors="replace").splitlines()
        if len(lines) <= fold:
            raise CKTFError(f"STL-10 file {path} has {len(lines)} lines; expected {NUM_FOLDS} (one per fold)")
        try:
            indices = [int(tok) for tok in lines[fold].split()]
        except ValueError:
            raise CKTFError(
                f"STL-10 file {path} line {fold + 1} is not a list of integers; expected train image indices"
            ) from None
        if not indices or min(indices) < 0 or max(indices) >= n_train:
            raise CKTFError(
                f"STL-10 file {path} line {fold + 1} must list train image indices in 0..{n_train - 1}"
            )
