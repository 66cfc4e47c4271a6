"""Users' own images in class-per-subfolder layout, plus the shared RGB image reader.

Layout: ``ROOT/<split>/<class>/**/<image>`` for labeled splits (``train``, ``val``, ``test``).
Class indices come from ``ROOT/train/`` when it exists so that ``val``/``test`` use the same
numbering even when they lack some classes. Split ``unlabeled`` reads ``ROOT/unlabeled/`` if present,
otherwise every image under ``ROOT`` (directly or in subfolders, including any train/val/test
folders), all with target ``-1``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, DatasetFolder, has_file_allowed_extension
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import pil_to_tensor, to_dtype

from transfer.errors import CKTFError

SPLITS: tuple[str, ...] = ("train", "val", "test", "unlabeled")
# Formats torchvision.io decodes natively; others in IMG_EXTENSIONS (bmp, tiff, ppm, pgm) go through PIL.
_NATIVE = (".jpg", ".jpeg", ".png", ".webp", ".gif")


def read_rgb(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to a uint8 ``3×H×W`` tensor (grayscale and palette images become RGB).

    Raises :class:`CKTFError` naming the file when it is missing or cannot be decoded, so one bad
    file in a large folder is easy to find.
    """
    path = os.fspath(path)
    try:
        if path.lower().endswith(_NATIVE):
            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its decoders in favour of TorchCodec, which we do not depend on.
                warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)
                image = decode_image(path, mode=ImageReadMode.RGB)
        else:
            with Image.open(path) as pil:
                image = pil_to_tensor(pil.convert("RGB"))
    except (RuntimeError, OSError, ValueError, SyntaxError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CKTFError(f"cannot decode image {path}: {reason}") from None
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = to_dtype(image, torch.uint8, scale=True)
    return image


def list_class_folders(directory: Path) -> list[str]:
    """Sorted names of the visible subfolders of ``directory`` (hidden ones like ``.cache`` are skipped)."""
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def _walk_images(directory: Path) -> list[str]:
    """Image paths under ``directory`` in sorted order, skipping hidden files and folders."""
    paths = []
    for dirpath, dirnames, names in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        paths += [
            os.path.join(dirpath, n)
            for n in sorted(names)
            if has_file_allowed_extension(n, IMG_EXTENSIONS) and not n.startswith(".")
        ]
    return paths


def _check_root(root: str | os.PathLike | None, split: str) -> Path:
    layout = ("a folder of images (ROOT/unlabeled/ or anywhere under ROOT; no class folders needed)"
              if split == "unlabeled" else f"a folder with {split}/<class>/<images>")
    if root is None:
        raise CKTFError(f"dataset image_folder needs a data root (--data.root): {layout}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise CKTFError(f"image folder root {path} does not exist; expected {layout}")
    return path


class LabeledImageFolder(DatasetFolder):
    """Images in ``directory/<class>/``, with class indices taken from ``classes`` (sorted folder names)."""

    in_channels = 3

    def __init__(
        self,
        directory: Path,
        classes: list[str],
        root: Path,
        transform: Callable | None = None,
        allow_empty: bool = False,
    ) -> None:
        self._given_classes = classes
        unknown = sorted(set(list_class_folders(directory)) - set(classes))
        if unknown:
            raise CKTFError(
                f"image folder {directory} has class folders {', '.join(unknown)} that are not in "
                f"{root / 'train'}; expected the same classes as train"
            )
        try:
            super().__init__(
                str(directory),
                loader=read_rgb,
                extensions=IMG_EXTENSIONS,
                transform=transform,
                allow_empty=allow_empty,
            )
        except FileNotFoundError as exc:
            raise CKTFError(f"image folder {directory}: {' '.join(str(exc).split())}") from None
        if not self.samples:
            raise CKTFError(f"image folder {directory} contains no images ({', '.join(IMG_EXTENSIONS)})")
        self.root = str(root)
        self.num_classes = len(self.classes)
        self.targets = torch.tensor(self.targets, dtype=torch.long)

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        return list(self._given_classes), {name: i for i, name in enumerate(self._given_classes)}

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image = self.loader(self.samples[index][0])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index]), index


class UnlabeledImageFolder(Dataset):
    """Every image under ``directory`` (recursively, sorted paths), each with target ``-1``."""

    in_channels = 3

    def __init__(
        self, directory: Path, classes: list[str], root: Path, transform: Callable | None = None
    ) -> None:
        self.paths = _walk_images(directory)
        if not self.paths:
            raise CKTFError(f"image folder {directory} contains no images ({', '.join(IMG_EXTENSIONS)})")
        self.root = str(root)
        self.classes = list(classes)
        self.num_classes = len(classes)
        self.targets = torch.full((len(self.paths),), -1, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image = read_rgb(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, -1, index


def image_folder(
    root: str | os.PathLike | None, split: str = "train", transform: Callable | None = None
) -> LabeledImageFolder | UnlabeledImageFolder:
    """Open split ``split`` of a class-per-subfolder image tree (see the module docstring)."""
    if split not in SPLITS:
        raise CKTFError(f"image_folder split {split!r} is unknown; expected one of {', '.join(SPLITS)}")
    root_path = _check_root(root, split)
    split_dir = root_path / split
    train_dir = root_path / "train"
    classes = list_class_folders(train_dir) if train_dir.is_dir() else []
    if split == "unlabeled":
        directory = split_dir if split_dir.is_dir() else root_path
        return UnlabeledImageFolder(directory, classes, root_path, transform)
    if not split_dir.is_dir():
        found = ", ".join(list_class_folders(root_path)) or "nothing"
        raise CKTFError(
            f"image folder {root_path} has no {split}/ subfolder (found: {found}); "
            f"expected ROOT/{split}/<class>/<images>"
        )
    # Empty class folders are an error only where the classes are defined (train/, or a split without it).
    allow_empty = bool(classes) and split != "train"
    if not classes:
        classes = list_class_folders(split_dir)
    if not classes:
        raise CKTFError(
            f"image folder {split_dir} has no class subfolders; expected {split_dir}/<class>/<images>"
        )
    return LabeledImageFolder(split_dir, classes, root_path, transform, allow_empty)
