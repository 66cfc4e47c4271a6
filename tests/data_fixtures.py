"""Writers of tiny dataset fixtures in the exact on-disk formats of the real datasets.

Each ``write_*`` function creates files under ``root`` (usually pytest's ``tmp_path``) that the
loaders in :mod:`transfer.data` read exactly as they read the real downloads, and returns what it
wrote (pixel arrays in their true orientation, labels, file lists) so tests can compare against it.
All content is drawn from ``numpy.random.default_rng(seed)``: the same arguments give the same files.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")

# Shape of one decoded uint8 image of each dataset, as its loader yields it (image folders: any size).
INPUTS = {
    "stl10": (3, 96, 96),
    "tinyimagenet": (3, 64, 64),
    "image_folder": (3, 50, 80),
    "fashion_mnist": (1, 28, 28),
    "fashion_split": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
}

FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# --------------------------------------------------------------------------------------------- STL-10
def write_stl10_images(path: str | Path, images: np.ndarray) -> None:
    """Write ``N×3×96×96`` uint8 images (row-major ``[c, row, col]``) as an STL-10 ``*_X.bin``.

    The real files store each channel column-major (Fortran order): byte ``c*9216 + col*96 + row``
    of an image is pixel ``[c, row, col]``, so we write the transposed channels.
    """
    images = np.asarray(images, dtype=np.uint8)
    assert images.ndim == 4 and images.shape[1:] == (3, 96, 96), images.shape
    Path(path).write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())


def write_stl10(
    root: str | Path,
    n_train: int = 20,
    n_test: int = 10,
    n_unlabeled: int = 6,
    *,
    fold_size: int | None = None,
    n_folds: int = 10,
    classes: Sequence[str] = STL10_CLASSES,
    seed: int = 0,
) -> dict:
    """Write ``root/stl10_binary/`` with random images, labels cycling through the 10 classes, folds.

    Labels are stored 1-based as in the real ``*_y.bin``. Fold ``k`` lists ``fold_size`` (default
    ``n_train // 5``) train indices starting at ``k * n_train // n_folds``, wrapping around, one
    space-separated line per fold as in ``fold_indices.txt``. Returns ``{"folder": Path,
    "train": (images, labels0), "test": (images, labels0), "unlabeled": images, "folds": [[int]]}``
    with images ``N×3×96×96`` uint8 in true orientation and 0-based labels.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    out: dict = {"folder": folder}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        images = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)
        write_stl10_images(folder / f"{split}_X.bin", images)
        if split == "unlabeled":
            out[split] = images
            continue
        labels = rng.permutation(np.arange(n) % 10)
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
        out[split] = (images, labels)
    fold_size = n_train // 5 if fold_size is None else fold_size
    folds = [[(k * n_train // n_folds + j) % n_train for j in range(fold_size)] for k in range(n_folds)]
    (folder / "fold_indices.txt").write_text("".join(" ".join(map(str, f)) + " \n" for f in folds))
    (folder / "class_names.txt").write_text("".join(f"{c}\n" for c in classes))
    out["folds"] = folds
    return out


# ------------------------------------------------------------------------------------- Tiny-ImageNet
def _save_jpeg(path: Path, level: int, size: int, gray: bool, rng: np.random.Generator) -> None:
    shape = (size, size) if gray else (size, size, 3)
    pixels = np.clip(level + rng.integers(-8, 9, size=shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=95)


def write_tinyimagenet(
    root: str | Path,
    wnids: Sequence[str] = ("n03000000", "n01000000", "n02000000"),
    n_train: int = 2,
    n_val: int = 2,
    n_test: int = 2,
    *,
    grayscale_train: int = 1,
    size: int = 64,
    unnamed: Sequence[str] = (),
    seed: int = 0,
) -> dict:
    """Write the unpacked Tiny-ImageNet layout (see :mod:`transfer.data.tinyimagenet`) under ``root``.

    ``wnids.txt`` keeps the given (unsorted) order. Every image of class ``w`` is a flat gray/color
    field of brightness ``levels[w]`` (plus noise), so a test can tell the class from the pixels even
    after JPEG compression. The first ``grayscale_train`` train images of each class are written as
    1-channel JPEGs, like the real dataset's grayscale images. Val images are named ``val_<i>.JPEG``
    with classes interleaved; ``words.txt`` names each wnid ``"name<k>, synonym"`` except those in
    ``unnamed``, plus an unrelated entry. Returns ``{"wnids": sorted wnids, "levels": {wnid: int},
    "train": [(path, wnid)], "val": [(filename, wnid)], "test": [path], "grayscale": [path]}``.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ordered = sorted(wnids)
    levels = {w: 30 + (200 * k) // max(len(ordered) - 1, 1) for k, w in enumerate(ordered)}
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    words = ["n00000001\tentity"] + [
        f"{w}\tname{k}, synonym{k}" for k, w in enumerate(wnids) if w not in unnamed
    ]
    (root / "words.txt").write_text("\n".join(words) + "\n")

    out: dict = {"wnids": ordered, "levels": levels, "train": [], "val": [], "test": [], "grayscale": []}
    for w in wnids:
        boxes = []
        for j in range(n_train):
            path = root / "train" / w / "images" / f"{w}_{j}.JPEG"
            _save_jpeg(path, levels[w], size, j < grayscale_train, rng)
            out["train"].append((path, w))
            out["grayscale"] += [path] if j < grayscale_train else []
            boxes.append(f"{path.name}\t0\t0\t{size - 1}\t{size - 1}\n")
        (root / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))

    lines = []
    for i in range(n_val * len(wnids)):
        w = wnids[-1 - i % len(wnids)]
        name = f"val_{i}.JPEG"
        _save_jpeg(root / "val" / "images" / name, levels[w], size, False, rng)
        x0, y0 = rng.integers(0, size // 2, size=2)
        lines.append(f"{name}\t{w}\t{x0}\t{y0}\t{x0 + size // 2}\t{y0 + size // 2}\n")
        out["val"].append((name, w))
    (root / "val" / "val_annotations.txt").write_text("".join(lines))

    for i in range(n_test):
        path = root / "test" / "images" / f"test_{i}.JPEG"
        _save_jpeg(path, int(rng.integers(0, 256)), size, False, rng)
        out["test"].append(path)
    return out


# ------------------------------------------------------------------------------------- Fashion-MNIST
def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (magic ``0x0000 08 <ndim>``, big-endian int32 sizes, data).

    The file is gzipped when ``path`` ends in ``.gz``, as in the distributed Fashion-MNIST files.
    """
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def write_fashion_idx(
    root: str | Path,
    n_train: int = 200,
    n_test: int = 100,
    *,
    gz: bool = True,
    subdir: str | None = None,
    seed: int = 0,
) -> dict:
    """Write the four Fashion-MNIST IDX files (``train-images-idx3-ubyte[.gz]`` etc.) into ``root``.

    ``subdir`` (e.g. ``"FashionMNIST/raw"``) nests them as torchvision does. Labels are balanced
    (``i % 10``, shuffled) and pixel ``[0, 0]`` of each image equals ``20 * label`` so a test can
    check a remapped label against the pixels. Returns ``{"dir": Path, "train": (images N×28×28,
    labels), "test": (images, labels)}``.
    """
    rng = np.random.default_rng(seed)
    directory = Path(root) / subdir if subdir else Path(root)
    out: dict = {"dir": directory}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels * 20
        suffix = ".gz" if gz else ""
        write_idx(directory / (FASHION_FILES[split][0] + suffix), images)
        write_idx(directory / (FASHION_FILES[split][1] + suffix), labels)
        out[split] = (images, labels.astype(np.int64))
    return out


# -------------------------------------------------------------------------------------- image folder
def write_image_folder(
    root: str | Path,
    classes: Sequence[str] = ("cat", "dog"),
    n_per_class: int = 2,
    splits: Sequence[str] = ("train", "val"),
    *,
    size: tuple[int, int] = (20, 24),
    ext: str = ".png",
    seed: int = 0,
) -> dict:
    """Write ``root/<split>/<class>/img<j><ext>`` RGB images of ``size`` (height, width).

    Images of class ``k`` have every pixel's red channel equal to ``40 * k`` (exact for PNG).
    Returns ``{split: [(path, class_name)]}`` in sorted path order.
    """
    rng = np.random.default_rng(seed)
    out: dict = {}
    for split in splits:
        out[split] = []
        for k, name in enumerate(sorted(classes)):
            for j in range(n_per_class):
                path = Path(root) / split / name / f"img{j}{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                pixels[..., 0] = 40 * k
                Image.fromarray(pixels).save(path)
                out[split].append((path, name))
    return out


# ------------------------------------------------------------------------------------------------ CIFAR


def _py2_dump(obj, fh) -> None:
    """Pickle protocol 2 as Python 2's cPickle wrote the official CIFAR files: byte strings as (SHORT_)BINSTRING
    opcodes (Python 3 would wrap them in ``_codecs.encode`` calls)."""
    import pickle
    import struct

    class Py2Pickler(pickle._Pickler):
        dispatch = dict(pickle._Pickler.dispatch)

        def save_str2(self, data: bytes) -> None:
            n = len(data)
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + data if n < 256
                       else pickle.BINSTRING + struct.pack("<i", n) + data)
            self.memoize(data)

        dispatch[bytes] = save_str2

    Py2Pickler(fh, protocol=2).dump(obj)


def write_cifar(root: str | Path, variant: str = "cifar100", n_train: int = 40, n_test: int = 20,
                seed: int = 0) -> dict:
    """The official "python version" files (``cifar-100-python/{train,test,meta}`` or
    ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``): protocol-2 pickles, as Python 2 wrote
    them, of dicts with byte-string keys, a uint8 ``[N, 3072]`` array (channel-major rows of 32×32) and label
    lists."""
    rng = np.random.default_rng(seed)
    classes = 100 if variant == "cifar100" else 10
    folder = Path(root) / ("cifar-100-python" if variant == "cifar100" else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    out: dict = {"folder": folder}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, classes, size=n).tolist()
        out[split] = (images, labels)
        if variant == "cifar100":
            chunks = [(split, images, labels)]
        else:
            names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
            bounds = np.linspace(0, n, len(names) + 1).astype(int)
            chunks = [(name, images[a:b], labels[a:b]) for name, a, b in
                      zip(names, bounds[:-1], bounds[1:], strict=True)]
        for name, part, part_labels in chunks:
            key = b"fine_labels" if variant == "cifar100" else b"labels"
            batch = {b"batch_label": name.encode(), key: list(part_labels), b"data": part.reshape(len(part), -1),
                     b"filenames": [f"img_{i}.png".encode() for i in range(len(part))]}
            if variant == "cifar100":
                batch[b"coarse_labels"] = [label // 5 for label in part_labels]
            with open(folder / name, "wb") as fh:
                _py2_dump(batch, fh)
    meta_name, names_key = ("meta", b"fine_label_names") if variant == "cifar100" else ("batches.meta", b"label_names")
    with open(folder / meta_name, "wb") as fh:
        _py2_dump({names_key: [f"class{i}".encode() for i in range(classes)]}, fh)
    return out


class CodePayload:
    """An object whose unpickling would run ``touch marker``: what a malicious pickle carries. Tests assert the
    marker never appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)
