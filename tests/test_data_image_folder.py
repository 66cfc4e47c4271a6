"""The generic class-per-subfolder dataset for users' own images."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.cli_helpers import assert_one_line
from tests.data_fixtures import write_image_folder
from transfer.data import build_dataset, build_transform
from transfer.errors import CKTFError


@pytest.fixture
def folder(tmp_path):
    return write_image_folder(tmp_path, classes=("dog", "cat", "emu"), n_per_class=2, splits=("train", "val"))


def test_labeled_split_classes_targets_and_pixels(tmp_path, folder):
    ds = build_dataset("image_folder", "train", tmp_path)
    assert ds.classes == ["cat", "dog", "emu"] and ds.num_classes == 3 and ds.in_channels == 3
    assert ds.targets.tolist() == [0, 0, 1, 1, 2, 2]
    for i in range(len(ds)):
        image, target, index = ds[i]
        assert image.shape == (3, 20, 24) and image.dtype == torch.uint8 and index == i
        assert torch.all(image[0] == 40 * target)  # the fixture's red channel encodes the class


def test_val_uses_train_class_indices_even_when_a_class_is_missing(tmp_path, folder):
    shutil.rmtree(tmp_path / "val" / "cat")
    ds = build_dataset("image_folder", "val", tmp_path)
    assert ds.classes == ["cat", "dog", "emu"] and ds.targets.tolist() == [1, 1, 2, 2]
    assert torch.all(ds[0][0][0] == 40)


def test_val_class_unknown_to_train_is_rejected(tmp_path, folder):
    write_image_folder(tmp_path, classes=("cat", "dog", "emu", "fox"), splits=("val",))
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("image_folder", "val", tmp_path)
    assert_one_line(excinfo, "fox", str(tmp_path / "train"))


def test_unlabeled_reads_every_image_under_root_with_minus_one(tmp_path, folder):
    ds = build_dataset("image_folder", "unlabeled", tmp_path)
    assert len(ds) == 12 and ds.targets.tolist() == [-1] * 12 and ds[11][1:] == (-1, 11)
    assert ds.classes == ["cat", "dog", "emu"]


def test_unlabeled_folder_of_loose_images_including_grayscale_jpeg(tmp_path):
    (tmp_path / "unlabeled").mkdir()
    Image.fromarray(np.full((9, 7), 77, np.uint8)).save(tmp_path / "unlabeled" / "a.jpg", quality=95)
    Image.fromarray(np.zeros((9, 7, 3), np.uint8)).save(tmp_path / "unlabeled" / "b.bmp")
    (tmp_path / "unlabeled" / "notes.txt").write_text("not an image")
    (tmp_path / "unlabeled" / ".thumbs").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "unlabeled" / ".thumbs" / "a.png")
    ds = build_dataset("image_folder", "unlabeled", tmp_path)
    assert len(ds) == 2 and ds.num_classes == 0
    gray = ds[0][0]
    assert gray.shape == (3, 9, 7) and torch.equal(gray[0], gray[2]) and abs(gray.float().mean() - 77) < 3
    assert ds[1][0].shape == (3, 9, 7)


def test_train_transform_output(tmp_path, folder):
    ds = build_dataset(
        "image_folder", "train", tmp_path, transform=build_transform("image_folder", train=True)
    )
    image = ds[0][0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32


def test_corrupt_image_is_reported_with_its_path(tmp_path, folder):
    bad = folder["train"][2][0]
    bad.write_bytes(b"\x89PNG broken")
    ds = build_dataset("image_folder", "train", tmp_path)
    with pytest.raises(CKTFError) as excinfo:
        ds[2]
    assert_one_line(excinfo, str(bad))


def test_missing_root_split_and_empty_folders(tmp_path, folder):
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("image_folder", "train", tmp_path / "absent")
    assert_one_line(excinfo, str(tmp_path / "absent"), "does not exist")
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("image_folder", "test", tmp_path)
    assert_one_line(excinfo, "test/", "found: train, val")
    (tmp_path / "train" / "gnu").mkdir()
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("image_folder", "train", tmp_path)
    assert_one_line(excinfo, "gnu")
    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("image_folder", "test", tmp_path / "empty")
    assert_one_line(excinfo, str(tmp_path / "empty" / "test"), "no class subfolders")
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("image_folder", "unlabeled", tmp_path / "empty")
    assert_one_line(excinfo, "contains no images")


@pytest.mark.parametrize("split,expected,unexpected", [
    ("unlabeled", "no class folders needed", "<class>"),
    ("train", "train/<class>/<images>", "no class folders"),
])
def test_a_missing_root_asks_for_the_layout_of_its_split(tmp_path, split, expected, unexpected):
    with pytest.raises(CKTFError) as info:
        build_dataset("image_folder", split, tmp_path / "nowhere")
    assert expected in str(info.value) and unexpected not in str(info.value)
