"""STL-10 on fixtures written in the real binary layout (column-major pixels, 1-based labels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.data_fixtures import STL10_CLASSES, write_stl10, write_stl10_images
from transfer.data import build_dataset, build_transform, dataset_splits
from transfer.errors import CKTFError


def one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture
def stl(tmp_path):
    return write_stl10(tmp_path, n_train=20, n_test=10, n_unlabeled=6)


def test_train_and_test_match_written_images_and_labels(tmp_path, stl):
    for split in ("train", "test"):
        ds = build_dataset("stl10", split, tmp_path)
        images, labels = stl[split]
        assert len(ds) == len(labels)
        assert ds.targets.dtype == torch.long and ds.targets.tolist() == labels.tolist()
        assert ds.classes == list(STL10_CLASSES) and ds.num_classes == 10 and ds.in_channels == 3
        for i in (0, len(ds) - 1):
            image, target, index = ds[i]
            assert image.dtype == torch.uint8 and image.shape == (3, 96, 96)
            assert torch.equal(image, torch.from_numpy(images[i]))
            assert (target, index) == (int(labels[i]), i)


def test_column_major_pixels_keep_their_orientation(tmp_path, stl):
    image = np.zeros((1, 3, 96, 96), dtype=np.uint8)
    image[0, 0, 5, 70] = 255  # row 5, column 70 of channel 0
    write_stl10_images(stl["folder"] / "train_X.bin", image)
    (stl["folder"] / "train_y.bin").write_bytes(bytes([3]))
    raw = (stl["folder"] / "train_X.bin").read_bytes()
    assert raw[70 * 96 + 5] == 255 and raw[5 * 96 + 70] == 0  # the real format: column-major per channel

    loaded, target, _ = build_dataset("stl10", "train", tmp_path)[0]
    assert loaded[0, 5, 70] == 255 and loaded[0, 70, 5] == 0 and int(loaded.sum()) == 255
    assert target == 2


def test_unlabeled_has_minus_one_targets(tmp_path, stl):
    ds = build_dataset("stl10", "unlabeled", tmp_path)
    assert len(ds) == 6 and ds.targets.tolist() == [-1] * 6
    image, target, index = ds[5]
    assert torch.equal(image, torch.from_numpy(stl["unlabeled"][5])) and (target, index) == (-1, 5)


def test_train_plus_unlabeled_concatenates_in_order(tmp_path, stl):
    ds = build_dataset("stl10", "train+unlabeled", tmp_path)
    train_images, train_labels = stl["train"]
    assert len(ds) == 26
    assert ds.targets.tolist() == train_labels.tolist() + [-1] * 6
    assert torch.equal(ds[19][0], torch.from_numpy(train_images[19]))
    assert torch.equal(ds[20][0], torch.from_numpy(stl["unlabeled"][0])) and ds[20][1:] == (-1, 20)


@pytest.mark.parametrize("split", ["train", "train+unlabeled"])
def test_fold_selects_predefined_train_indices(tmp_path, stl, split):
    ds = build_dataset("stl10", split, tmp_path, fold=3)
    fold = stl["folds"][3]
    images, labels = stl["train"]
    assert len(ds) == len(fold) + (6 if split == "train+unlabeled" else 0)
    assert ds.targets[: len(fold)].tolist() == labels[fold].tolist()
    assert torch.equal(ds[1][0], torch.from_numpy(images[fold[1]]))


def test_root_may_be_the_binary_folder_itself(tmp_path, stl):
    ds = build_dataset("stl10", "test", stl["folder"])
    assert len(ds) == 10 and ds.classes[0] == "airplane"


def test_split_only_needs_its_own_files(tmp_path, stl):
    (stl["folder"] / "train_y.bin").unlink()
    (stl["folder"] / "unlabeled_X.bin").unlink()
    assert len(build_dataset("stl10", "test", tmp_path)) == 10


def test_eval_transform_gives_64px_floats(tmp_path, stl):
    ds = build_dataset("stl10", "test", tmp_path, transform=build_transform("stl10", train=False))
    image, _, _ = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-1])


def _wrong_labels_length(path):
    path.write_bytes(path.read_bytes() + b"\x01")


def _zero_label(path):
    path.write_bytes(b"\x00" + path.read_bytes()[1:])


@pytest.mark.parametrize(
    ("split", "file", "damage", "expected"),
    [
        ("train", "train_X.bin", _truncate, "27648"),
        ("unlabeled", "unlabeled_X.bin", lambda p: p.write_bytes(b""), "has 0 bytes"),
        ("train", "train_y.bin", _wrong_labels_length, "one label byte per image"),
        ("test", "test_y.bin", _zero_label, "label 0"),
        ("test", "test_X.bin", lambda p: p.unlink(), "is missing"),
        ("train", "class_names.txt", lambda p: p.write_text("a\nb\n"), "expected 10"),
    ],
)
def test_damaged_files_raise_one_line_errors(tmp_path, stl, split, file, damage, expected):
    damage(stl["folder"] / file)
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("stl10", split, tmp_path)
    one_line_error(excinfo, file, expected)


def test_bad_fold_file_and_fold_options(tmp_path, stl):
    (stl["folder"] / "fold_indices.txt").write_text("1 2 x\n" * 10)
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("stl10", "train", tmp_path, fold=0)
    one_line_error(excinfo, "fold_indices.txt", "line 1")
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("stl10", "test", tmp_path, fold=0)
    one_line_error(excinfo, "fold", "test")
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("stl10", "train", tmp_path, fold=10)
    one_line_error(excinfo, "fold=10", "0..9")


def test_missing_root_unknown_split_and_option(tmp_path):
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("stl10", "train", tmp_path / "nope")
    one_line_error(excinfo, str(tmp_path / "nope"), "stl10_binary")
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("stl10", "val", tmp_path)
    one_line_error(excinfo, "'val'", *dataset_splits("stl10"))
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("stl10", "train", tmp_path, folds=1)
    one_line_error(excinfo, "folds", "fold")
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("cifar7", "train", tmp_path)
    one_line_error(excinfo, "cifar7", "stl10", "fashion_split", "image_folder", "cifar100")
