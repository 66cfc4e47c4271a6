"""Tiny-ImageNet (200 classes, 64×64) read from the official unpacked archive, as is.

Layout::

    ROOT/wnids.txt                       class ids, one per line
    ROOT/words.txt                       "<wnid>\\t<synonym>, <synonym>, ..." (optional: names only)
    ROOT/train/<wnid>/images/*.JPEG      500 per class (train/<wnid>/<wnid>_boxes.txt is ignored)
    ROOT/val/images/*.JPEG               10K images, labels in val/val_annotations.txt
    ROOT/val/val_annotations.txt         "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>"
    ROOT/test/images/*.JPEG              10K images without labels (target -1)

``ROOT`` may also be the folder that contains the unpacked ``tiny-imagenet-200/``.

The validation labels are read from the annotation file rather than requiring the common
"reorganise val/ into class folders" step, so an untouched download works. Class indices follow
the *sorted* wnids so they are identical for train and val whatever order wnids.txt uses.
Some images are grayscale; every image is decoded as RGB, giving uint8 ``3×64×64`` tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from transfer.data.image_folder import read_rgb
from transfer.errors import CKTFError

SPLITS: tuple[str, ...] = ("train", "val", "test")
_EXTENSIONS = (".jpeg", ".jpg", ".png")
ARCHIVE_FOLDER = "tiny-imagenet-200"


def _require(path: Path, expected: str, kind: str = "file") -> Path:
    if not path.exists():
        raise CKTFError(f"Tiny-ImageNet {kind} {path} is missing; expected {expected}")
    return path


def _images_in(directory: Path) -> list[str]:
    _require(directory, "a folder of .JPEG images", kind="folder")
    names = sorted(
        n for n in os.listdir(directory) if n.lower().endswith(_EXTENSIONS) and not n.startswith(".")
    )
    if not names:
        raise CKTFError(f"Tiny-ImageNet folder {directory} has no .JPEG images")
    return names


def read_wnids(path: Path) -> list[str]:
    """The class ids of ``wnids.txt``, sorted (the order fixes the class indices)."""
    _require(path, "wnids.txt listing one WordNet id per line")
    wnids = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if not wnids:
        raise CKTFError(f"Tiny-ImageNet file {path} is empty; expected one WordNet id per line")
    if len(set(wnids)) != len(wnids):
        dup = next(w for w in wnids if wnids.count(w) > 1)
        raise CKTFError(f"Tiny-ImageNet file {path} lists {dup} twice; expected unique WordNet ids")
    return sorted(wnids)


def read_class_names(path: Path, wnids: list[str]) -> list[str]:
    """First synonym of each wnid in ``words.txt``; the wnid itself when absent (or no words.txt)."""
    names = {}
    if path.is_file():
        wanted = set(wnids)
        for line in path.read_text(errors="replace").splitlines():
            wnid, _, synonyms = line.partition("\t")
            wnid = wnid.strip()
            if wnid in wanted and synonyms.strip():
                names[wnid] = synonyms.split(",")[0].strip()
    return [names.get(w, w) for w in wnids]


class TinyImageNet(Dataset):
    """Tiny-ImageNet split ``train`` (100K), ``val`` (10K, labeled) or ``test`` (10K, target -1)."""

    in_channels = 3

    def __init__(
        self, root: str | os.PathLike | None, split: str = "train", transform: Callable | None = None
    ) -> None:
        if split not in SPLITS:
            raise CKTFError(f"Tiny-ImageNet split {split!r} is unknown; expected one of {', '.join(SPLITS)}")
        if root is None:
            raise CKTFError(
                "dataset tinyimagenet needs a data root: the folder that holds wnids.txt, train/, val/"
            )
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise CKTFError(
                f"Tiny-ImageNet root {self.root} does not exist; expected a folder with wnids.txt, "
                "train/, val/, test/"
            )
        if not (self.root / "wnids.txt").exists() and (self.root / ARCHIVE_FOLDER / "wnids.txt").is_file():
            self.root = self.root / ARCHIVE_FOLDER  # the folder the archive unpacks into
        self.split = split
        self.transform = transform
        self.wnids = read_wnids(self.root / "wnids.txt")
        self.class_to_idx = {w: i for i, w in enumerate(self.wnids)}
        self.classes = read_class_names(self.root / "words.txt", self.wnids)
        self.num_classes = len(self.wnids)
        paths, targets = getattr(self, f"_index_{split}")()
        self.paths: list[str] = paths
        self.targets = torch.tensor(targets, dtype=torch.long)

    def _index_train(self) -> tuple[list[str], list[int]]:
        paths, targets = [], []
        for wnid in self.wnids:
            folder = self.root / "train" / wnid / "images"
            names = _images_in(folder)
            paths += [str(folder / n) for n in names]
            targets += [self.class_to_idx[wnid]] * len(names)
        return paths, targets

    def _index_val(self) -> tuple[list[str], list[int]]:
        annotations = _require(
            self.root / "val" / "val_annotations.txt", "tab-separated lines: filename, wnid, x0, y0, x1, y1"
        )
        folder = self.root / "val" / "images"
        present = set(_images_in(folder))
        paths, targets = [], []
        for number, line in enumerate(annotations.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise CKTFError(
                    f"Tiny-ImageNet file {annotations} line {number} has no tab-separated wnid; "
                    "expected filename<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1"
                )
            name, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in self.class_to_idx:
                raise CKTFError(
                    f"Tiny-ImageNet file {annotations} line {number} has wnid {wnid!r}, "
                    f"which is not in {self.root / 'wnids.txt'}"
                )
            if name not in present:
                raise CKTFError(
                    f"Tiny-ImageNet file {annotations} line {number} names {name!r}, which is not in {folder}"
                )
            paths.append(str(folder / name))
            targets.append(self.class_to_idx[wnid])
        if not paths:
            raise CKTFError(f"Tiny-ImageNet file {annotations} has no annotations")
        return paths, targets

    def _index_test(self) -> tuple[list[str], list[int]]:
        folder = self.root / "test" / "images"
        names = _images_in(folder)
        return [str(folder / n) for n in names], [-1] * len(names)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image = read_rgb(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index]), index
