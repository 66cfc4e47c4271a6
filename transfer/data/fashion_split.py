"""A CPU-scale stand-in for Tiny-ImageNet → STL-10: Fashion-MNIST's label space cut in two domains.

The *source* domain (default classes 1, 5, 7, 8, 9: trouser, sandal, sneaker, bag, ankle boot) is
fully labeled, like Tiny-ImageNet; the *target* domain (default 0, 2, 3, 4, 6: T-shirt, pullover,
dress, coat, shirt) has a large unlabeled pool and only ``labels_per_class`` labels per class, like
STL-10. The split is chosen so that transfer has something to show: on the target classes,
logistic regression on raw pixels with 100 labels per class reaches only ≈69–71% test accuracy
(the upper-body garments are easily confused), leaving room for transferred features, while on
the source classes the same baseline already reaches ≈91%, so the opposite split would be too easy.

Splits: ``source_train`` / ``source_test`` (source classes, labeled), ``target_unlabeled`` (all
target-class train images, targets -1), ``target_train`` (a labeled subset of that same pool),
``target_labeled`` (the whole pool *with* its labels: only for the supervised-ceiling control, never
for transfer) and ``target_test``. Classes are renumbered 0..k-1 in the order given. Everything is
sliced from the in-memory Fashion-MNIST arrays, so building any split takes a fraction of a second.

Two options, both off by default, turn the class split into an image-and-domain split closer to the
paper, where the source's classes *cover* the target's concepts but the images differ:

- ``split_images``: the train and the test images are each cut into two fixed halves (by a hash of the
  image index, independent of ``split_seed``, so teacher and probe configs can never disagree about
  them); source splits take one half, target splits the other. Source and target classes may then
  overlap, e.g. all 10 classes on both sides, and the target's images are still never seen by the teacher.
- ``target_shift``: pixel-level shifts applied to every target split and no source split
  (:mod:`transfer.data.domain_shift`: ``invert``, ``rotate90``, ``lowres``, ``blur``, ``noise``, in order).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from transfer.data.domain_shift import apply_shifts, parse_shifts
from transfer.data.fashion_mnist import CLASSES, load_fashion_mnist
from transfer.errors import CKTFError

SPLITS: tuple[str, ...] = (
    "source_train", "source_test", "target_unlabeled", "target_train", "target_labeled", "target_test"
)
DEFAULT_SOURCE_CLASSES: tuple[int, ...] = (1, 5, 7, 8, 9)
DEFAULT_TARGET_CLASSES: tuple[int, ...] = (0, 2, 3, 4, 6)


def parse_class_list(value: Any, option: str) -> list[int]:
    """Validate a list of Fashion-MNIST class ids (a sequence of ints or a string like ``"1,5,7"``)."""
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
        try:
            value = [int(v) for v in value]
        except ValueError:
            raise CKTFError(
                f"fashion_split option {option}={value!r} is invalid; expected class ids 0..9"
            ) from None
    if not isinstance(value, Sequence) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise CKTFError(
            f"fashion_split option {option}={value!r} is invalid; expected a list of class ids 0..9"
        )
    classes = list(value)
    if not classes:
        raise CKTFError(f"fashion_split option {option} is empty; expected at least one class id 0..9")
    if any(not 0 <= c < len(CLASSES) for c in classes):
        raise CKTFError(f"fashion_split option {option}={classes} is out of range; expected class ids 0..9")
    if len(set(classes)) != len(classes):
        raise CKTFError(
            f"fashion_split option {option}={classes} has duplicates; expected distinct class ids"
        )
    return classes


def _stable_key(seed: int, index: int) -> bytes:
    return hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()


@functools.lru_cache(maxsize=8)
def image_half(count: int, source: bool) -> torch.Tensor:
    """Indices (sorted) of the source or the target half of ``count`` images; fixed by a hash of each index."""
    ranked = sorted(range(count), key=lambda i: _stable_key(-1, i))
    half = ranked[: count // 2] if source else ranked[count // 2 :]
    return torch.tensor(sorted(half), dtype=torch.long)


def select_per_class(
    indices: torch.Tensor, labels: torch.Tensor, classes: list[int], per_class: int, seed: int
) -> torch.Tensor:
    """``per_class`` items of each class, sorted; the pick depends only on ``seed`` and the item index.

    Items are ranked by a hash of ``(seed, index)`` rather than by a random generator so that the
    labeled subset is the same on every machine and library version.
    """
    chosen = []
    for c in classes:
        pool = indices[labels == c].tolist()
        if len(pool) < per_class:
            raise CKTFError(
                f"fashion_split option labels_per_class={per_class} exceeds the {len(pool)} "
                f"train images of class {c} ({CLASSES[c]})"
            )
        chosen += sorted(pool, key=lambda i: _stable_key(seed, i))[:per_class]
    return torch.tensor(sorted(chosen), dtype=torch.long)


class FashionSplit(Dataset):
    """One split of the source/target partition of Fashion-MNIST; images are uint8 ``1×28×28``.

    ``fashion_indices`` gives each item's index in the Fashion-MNIST train or test set.
    """

    in_channels = 1

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "source_train",
        transform: Callable | None = None,
        source_classes: Sequence[int] | str = DEFAULT_SOURCE_CLASSES,
        target_classes: Sequence[int] | str = DEFAULT_TARGET_CLASSES,
        labels_per_class: int = 100,
        split_seed: int = 0,
        split_images: bool = False,
        target_shift: Sequence[str] | str | None = None,
    ) -> None:
        if split not in SPLITS:
            raise CKTFError(f"fashion_split split {split!r} is unknown; expected one of {', '.join(SPLITS)}")
        source = parse_class_list(source_classes, "source_classes")
        target = parse_class_list(target_classes, "target_classes")
        if not isinstance(split_images, bool):
            raise CKTFError(f"fashion_split option split_images={split_images!r} is invalid; expected true or false")
        if set(source) & set(target) and not split_images:
            raise CKTFError(
                f"fashion_split options source_classes={source} and target_classes={target} share "
                f"classes {sorted(set(source) & set(target))}; expected disjoint lists (or split_images: true)"
            )
        shifts = parse_shifts(target_shift, "target_shift")
        if (
            isinstance(labels_per_class, bool)
            or not isinstance(labels_per_class, int)
            or labels_per_class < 1
        ):
            raise CKTFError(
                f"fashion_split option labels_per_class={labels_per_class!r} is invalid; "
                "expected a positive integer"
            )
        if isinstance(split_seed, bool) or not isinstance(split_seed, int):
            raise CKTFError(f"fashion_split option split_seed={split_seed!r} is invalid; expected an integer")

        is_source = split.startswith("source")
        domain = source if is_source else target
        images, labels, self.root = load_fashion_mnist(root, "test" if split.endswith("_test") else "train")
        remap = torch.full((len(CLASSES),), -1, dtype=torch.long)
        remap[torch.tensor(domain)] = torch.arange(len(domain))
        candidates = image_half(len(labels), is_source) if split_images else torch.arange(len(labels))
        keep = candidates[remap[labels[candidates]] >= 0]
        if split == "target_train":
            keep = select_per_class(keep, labels[keep], domain, labels_per_class, split_seed)

        self.split = split
        self.transform = transform
        self.fashion_indices = keep
        self.data = images[keep] if is_source else apply_shifts(images[keep], shifts, keep)
        self.targets = remap[labels[keep]] if split != "target_unlabeled" else torch.full((len(keep),), -1)
        self.classes = [CLASSES[c] for c in domain]
        self.num_classes = len(domain)
        self.source_classes, self.target_classes = source, target
        self.split_images, self.target_shift = split_images, shifts

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image = self.data[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index]), index
