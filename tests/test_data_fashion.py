"""Fashion-MNIST IDX reading, its lookup order, the fashion_split domains, and IndexedSubset/holdout_split."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cli_helpers import assert_one_line
from tests.data_fixtures import write_fashion_idx, write_idx
from transfer.data import IndexedSubset, build_dataset, holdout_split
from transfer.data import fashion_mnist as fm
from transfer.data.fashion_mnist import CLASSES
from transfer.data.fashion_split import SPLITS
from transfer.errors import CKTFError

REAL = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def fashion(tmp_path):
    return write_fashion_idx(tmp_path, n_train=200, n_test=100)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("subdir", [None, "FashionMNIST/raw"])
def test_idx_files_read_gzipped_or_raw_flat_or_nested(tmp_path, gz, subdir):
    written = write_fashion_idx(tmp_path, n_train=30, n_test=20, gz=gz, subdir=subdir)
    for split in ("train", "test"):
        ds = build_dataset("fashion_mnist", split, tmp_path)
        images, labels = written[split]
        assert len(ds) == len(labels) and ds.targets.tolist() == labels.tolist()
        image, target, index = ds[7]
        assert image.shape == (1, 28, 28) and image.dtype == torch.uint8
        assert torch.equal(image[0], torch.from_numpy(images[7])) and (target, index) == (labels[7], 7)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert ds.num_classes == 10 and ds.in_channels == 1


def test_no_root_uses_default_dir_but_a_given_root_never_falls_back(tmp_path, fashion, monkeypatch):
    monkeypatch.setattr(fm, "DEFAULT_DIR", tmp_path)
    assert len(build_dataset("fashion_mnist", "test", None)) == 100
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("fashion_mnist", "test", tmp_path / "typo")
    assert_one_line(excinfo, str(tmp_path / "typo"), "does not exist")


def test_missing_default_dir_says_how_to_get_the_files(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEFAULT_DIR", tmp_path / "none")
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("fashion_mnist", "train", None)
    assert_one_line(excinfo, "apt-get install dataset-fashion-mnist", "zalandoresearch/fashion-mnist")


def test_root_without_files_names_the_missing_file(tmp_path):
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("fashion_mnist", "train", tmp_path)
    assert_one_line(excinfo, "train-images-idx3-ubyte", "missing")


@pytest.mark.parametrize(
    ("file", "content", "expected"),
    [
        ("t10k-images-idx3-ubyte.gz", np.zeros((100, 28), np.uint8), "magic 00000803"),
        ("t10k-labels-idx1-ubyte.gz", np.zeros(99, np.uint8), "99 labels; expected 100"),
        ("t10k-labels-idx1-ubyte.gz", np.full(100, 10, np.uint8), "label 10"),
        ("t10k-images-idx3-ubyte.gz", np.zeros((100, 28, 27), np.uint8), "28×28"),
    ],
)
def test_malformed_idx_files_raise_one_line_errors(tmp_path, fashion, file, content, expected):
    write_idx(tmp_path / file, content)
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("fashion_mnist", "test", tmp_path)
    assert_one_line(excinfo, file, expected)


def test_truncated_and_corrupt_gzip_idx(tmp_path, fashion):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-3]))
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("fashion_mnist", "test", tmp_path)
    assert_one_line(excinfo, path.name, "expected 108")
    path.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("fashion_mnist", "test", tmp_path)
    assert_one_line(excinfo, path.name)


def _original_class(image: torch.Tensor) -> int:
    return int(image[0, 0, 0]) // 20  # the fixture writes 20 * label into pixel [0, 0]


def test_fashion_split_sizes_and_remapping(tmp_path, fashion):
    sizes = {
        "source_train": 100,
        "source_test": 50,
        "target_unlabeled": 100,
        "target_train": 15,
        "target_test": 50,
    }
    for split, size in sizes.items():
        ds = build_dataset(
            "fashion_split",
            split,
            tmp_path,
            labels_per_class=3,
            source_classes=[9, 1, 5, 7, 8],
            target_classes=[0, 2, 3, 4, 6],
        )
        domain = [9, 1, 5, 7, 8] if split.startswith("source") else [0, 2, 3, 4, 6]
        assert len(ds) == size and ds.num_classes == 5 and ds.in_channels == 1
        assert ds.classes[0] == ("Ankle boot" if split.startswith("source") else "T-shirt/top")
        for i in range(len(ds)):
            image, target, index = ds[i]
            assert image.shape == (1, 28, 28) and index == i
            assert _original_class(image) in domain
            assert target == (-1 if split == "target_unlabeled" else domain.index(_original_class(image)))


def test_target_train_is_balanced_deterministic_and_drawn_from_the_pool(tmp_path, fashion):
    pool = build_dataset("fashion_split", "target_unlabeled", tmp_path)
    first = build_dataset("fashion_split", "target_train", tmp_path, labels_per_class=4, split_seed=0)
    again = build_dataset("fashion_split", "target_train", tmp_path, labels_per_class=4, split_seed=0)
    other = build_dataset("fashion_split", "target_train", tmp_path, labels_per_class=4, split_seed=1)
    assert torch.equal(first.fashion_indices, again.fashion_indices)
    assert not torch.equal(first.fashion_indices, other.fashion_indices)
    assert set(first.fashion_indices.tolist()) <= set(pool.fashion_indices.tolist())
    assert torch.bincount(first.targets, minlength=5).tolist() == [4] * 5
    source = build_dataset("fashion_split", "source_train", tmp_path)
    assert not set(source.fashion_indices.tolist()) & set(pool.fashion_indices.tolist())


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"source_classes": [1, 2], "target_classes": [2, 3]}, "disjoint"),
        ({"source_classes": [1, 1]}, "source_classes"),
        ({"target_classes": [0, 10]}, "target_classes"),
        ({"target_classes": []}, "target_classes"),
        ({"source_classes": "1,x"}, "source_classes"),
        ({"source_classes": [1.0, 5]}, "source_classes"),
        ({"labels_per_class": 0}, "labels_per_class"),
        ({"labels_per_class": 21}, "labels_per_class=21"),
        ({"seed": 3}, "seed"),
    ],
)
def test_bad_fashion_split_options(tmp_path, fashion, options, expected):
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("fashion_split", "target_train", tmp_path, **options)
    assert_one_line(excinfo, expected)


def test_class_lists_may_be_comma_separated_strings(tmp_path, fashion):
    ds = build_dataset("fashion_split", "source_test", tmp_path, source_classes="8, 9", target_classes="0")
    assert ds.classes == ["Bag", "Ankle boot"] and len(ds) == 20


def test_indexed_subset_renumbers_positions(tmp_path, fashion):
    ds = build_dataset("fashion_mnist", "test", tmp_path)
    keep, held = holdout_split(len(ds), 0.2, seed=0)
    assert len(held) == 20 and sorted(keep + held) == list(range(100))
    assert (keep, held) == holdout_split(len(ds), 0.2, seed=0) and held != holdout_split(
        len(ds), 0.2, seed=1
    )[1]
    sub = IndexedSubset(ds, held)
    assert len(sub) == 20 and sub.targets.tolist() == ds.targets[held].tolist()
    assert (sub.classes, sub.num_classes, sub.in_channels) == (ds.classes, 10, 1)
    image, target, index = sub[3]
    assert index == 3 and target == int(ds.targets[held[3]]) and torch.equal(image, ds[held[3]][0])
    with pytest.raises(CKTFError):
        holdout_split(10, 1.0, seed=0)


@pytest.mark.skipif(not REAL.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_sizes():
    assert len(build_dataset("fashion_mnist", "train", None)) == 60000
    assert len(build_dataset("fashion_mnist", "test", None)) == 10000
    sizes = {
        "source_train": 30000,
        "source_test": 5000,
        "target_unlabeled": 30000,
        "target_train": 500,
        "target_test": 5000,
    }
    for split, size in sizes.items():
        ds = build_dataset("fashion_split", split, None)
        assert len(ds) == size
    assert torch.bincount(ds.targets).tolist() == [1000] * 5
    halves = {"source_train": 30000, "source_test": 5000, "target_unlabeled": 30000, "target_test": 5000}
    for split, size in halves.items():
        assert len(build_dataset("fashion_split", split, None, source_classes=list(range(10)),
                                 target_classes=list(range(10)), split_images=True)) == size


ALL = list(range(10))


def _halves(tmp_path, split, **options):
    return build_dataset("fashion_split", split, tmp_path, source_classes=ALL, target_classes=ALL, split_images=True,
                         **options)


def test_split_images_gives_disjoint_halves_with_shared_classes(tmp_path, fashion):
    for part, total in (("train", 200), ("test", 100)):
        source = _halves(tmp_path, f"source_{part}")
        target = _halves(tmp_path, "target_unlabeled" if part == "train" else "target_test")
        src, tgt = set(source.fashion_indices.tolist()), set(target.fashion_indices.tolist())
        assert not src & tgt and src | tgt == set(range(total)) and len(src) == total // 2
        assert source.num_classes == target.num_classes == 10
        assert all(_original_class(source[i][0]) == source.classes.index(CLASSES[source[i][1]])
                   for i in range(len(source)))
    # the halves do not move with split_seed (a probe with another seed must not see teacher images)
    assert torch.equal(_halves(tmp_path, "source_train", split_seed=3).fashion_indices,
                       _halves(tmp_path, "source_train").fashion_indices)
    labeled = _halves(tmp_path, "target_labeled")
    assert torch.equal(labeled.fashion_indices, _halves(tmp_path, "target_unlabeled").fashion_indices)
    assert (labeled.targets >= 0).all()


def test_split_images_respects_labels_per_class_within_the_target_half(tmp_path, fashion):
    pool = _halves(tmp_path, "target_unlabeled")
    labeled = _halves(tmp_path, "target_train", labels_per_class=3)
    assert torch.bincount(labeled.targets, minlength=10).tolist() == [3] * 10
    assert set(labeled.fashion_indices.tolist()) <= set(pool.fashion_indices.tolist())
    smallest = int(torch.bincount(_halves(tmp_path, "target_labeled").targets).min())
    with pytest.raises(CKTFError) as excinfo:
        _halves(tmp_path, "target_train", labels_per_class=smallest + 1)
    assert_one_line(excinfo, f"labels_per_class={smallest + 1}")


def test_target_labeled_is_the_whole_pool_with_labels(tmp_path, fashion):
    pool = build_dataset("fashion_split", "target_unlabeled", tmp_path)
    labeled = build_dataset("fashion_split", "target_labeled", tmp_path)
    assert torch.equal(pool.fashion_indices, labeled.fashion_indices) and torch.equal(pool.data, labeled.data)
    assert [labeled.classes[t] for t in labeled.targets.tolist()] == [
        CLASSES[_original_class(image)] for image in labeled.data]


def test_target_shift_applies_to_target_splits_only(tmp_path, fashion):
    raw = {part: build_dataset("fashion_mnist", part, tmp_path).data for part in ("train", "test")}
    for split in SPLITS:
        ds = build_dataset("fashion_split", split, tmp_path, target_shift="invert", labels_per_class=3)
        original = raw["test" if split.endswith("_test") else "train"][ds.fashion_indices]
        expected = original if split.startswith("source") else 255 - original
        assert torch.equal(ds.data, expected), split
        assert torch.equal(ds[0][0], expected[0])


def test_shifted_probe_subset_is_pixel_identical_to_the_pool(tmp_path, fashion):
    pool = _halves(tmp_path, "target_unlabeled", target_shift=["noise", "lowres"])
    labeled = _halves(tmp_path, "target_train", target_shift=["noise", "lowres"], labels_per_class=3)
    row = {int(index): i for i, index in enumerate(pool.fashion_indices)}
    for i, index in enumerate(labeled.fashion_indices.tolist()):
        assert torch.equal(labeled.data[i], pool.data[row[index]])


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"split_images": "yes"}, "split_images='yes'"),
        ({"split_images": 1}, "split_images=1"),
        ({"source_classes": [1, 2], "target_classes": [2, 3], "split_images": False}, "split_images: true"),
        ({"target_shift": "sepia"}, "target_shift"),
        ({"target_shift": ["blur", "blur"]}, "target_shift"),
    ],
)
def test_bad_split_images_and_target_shift_options(tmp_path, fashion, options, expected):
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("fashion_split", "target_train", tmp_path, labels_per_class=3, **options)
    assert_one_line(excinfo, expected)


def test_defaults_are_unchanged_by_the_new_options(tmp_path, fashion):
    for split in SPLITS:
        plain = build_dataset("fashion_split", split, tmp_path, labels_per_class=3)
        explicit = build_dataset("fashion_split", split, tmp_path, labels_per_class=3, split_images=False,
                                 target_shift="none")
        assert torch.equal(plain.fashion_indices, explicit.fashion_indices) and torch.equal(plain.data, explicit.data)
