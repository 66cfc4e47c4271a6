"""Tiny-ImageNet on a fixture in the unpacked archive layout (val labels from val_annotations.txt)."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.cli_helpers import assert_one_line
from tests.data_fixtures import write_tinyimagenet
from transfer.data import build_dataset
from transfer.errors import CKTFError

WNIDS = ("n03000000", "n01000000", "n02000000")  # unsorted on purpose, as in the real wnids.txt


@pytest.fixture
def tin(tmp_path):
    return write_tinyimagenet(tmp_path, WNIDS, n_train=2, n_val=2, n_test=2, unnamed=("n02000000",))


def brightness(image: torch.Tensor) -> float:
    return image.float().mean().item()


def test_train_indices_follow_sorted_wnids_and_match_pixels(tmp_path, tin):
    ds = build_dataset("tinyimagenet", "train", tmp_path)
    assert len(ds) == 6 and ds.num_classes == 3 and ds.in_channels == 3
    assert ds.classes == ["name1", "n02000000", "name0"]  # words.txt's first synonym, else the wnid
    assert ds.targets.tolist() == [0, 0, 1, 1, 2, 2]
    for i in range(len(ds)):
        image, target, index = ds[i]
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8 and index == i
        assert abs(brightness(image) - tin["levels"][tin["wnids"][target]]) < 6


def test_val_labels_come_from_annotations_with_train_indices(tmp_path, tin):
    train = build_dataset("tinyimagenet", "train", tmp_path)
    val = build_dataset("tinyimagenet", "val", tmp_path)
    assert len(val) == len(tin["val"]) == 6
    assert val.classes == train.classes
    target_of_path = dict(zip(train.paths, train.targets.tolist(), strict=True))
    train_index = {w: target_of_path[str(path)] for path, w in tin["train"]}
    for i, (name, wnid) in enumerate(tin["val"]):
        image, target, _ = val[i]
        assert val.paths[i].endswith(name)
        assert target == train_index[wnid] == tin["wnids"].index(wnid)
        assert abs(brightness(image) - tin["levels"][wnid]) < 6


def test_grayscale_jpeg_is_decoded_as_three_equal_channels(tmp_path, tin):
    ds = build_dataset("tinyimagenet", "train", tmp_path)
    gray = [str(p) for p in tin["grayscale"]]
    i = ds.paths.index(gray[0])
    image = ds[i][0]
    assert image.shape == (3, 64, 64)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_test_split_is_unlabeled(tmp_path, tin):
    ds = build_dataset("tinyimagenet", "test", tmp_path)
    assert len(ds) == 2 and ds.targets.tolist() == [-1, -1] and ds[1][1:] == (-1, 1)


def test_missing_val_annotations_names_the_file(tmp_path, tin):
    (tmp_path / "val" / "val_annotations.txt").unlink()
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("tinyimagenet", "val", tmp_path)
    assert_one_line(excinfo, "val_annotations.txt", "missing")


def test_unknown_wnid_in_annotations_names_file_and_line(tmp_path, tin):
    path = tmp_path / "val" / "val_annotations.txt"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace(lines[1].split("\t")[1], "n09999999")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("tinyimagenet", "val", tmp_path)
    assert_one_line(excinfo, "val_annotations.txt", "line 2", "n09999999")


def test_annotation_of_missing_image_is_reported(tmp_path, tin):
    (tmp_path / "val" / "images" / "val_3.JPEG").unlink()
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("tinyimagenet", "val", tmp_path)
    assert_one_line(excinfo, "val_annotations.txt", "line 4", "val_3.JPEG")


def test_corrupt_jpeg_is_reported_with_its_path(tmp_path, tin):
    bad = tin["train"][3][0]
    bad.write_bytes(b"not a jpeg at all")
    ds = build_dataset("tinyimagenet", "train", tmp_path)
    ds[0]
    with pytest.raises(CKTFError) as excinfo:
        ds[ds.paths.index(str(bad))]
    assert_one_line(excinfo, str(bad))


@pytest.mark.parametrize(
    ("remove", "split", "expected"),
    [
        ("wnids.txt", "train", "wnids.txt"),
        ("train/n01000000/images", "train", "n01000000"),
        ("test/images", "test", "test/images"),
    ],
)
def test_missing_files_raise_one_line_errors(tmp_path, tin, remove, split, expected):
    target = tmp_path / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("tinyimagenet", split, tmp_path)
    assert_one_line(excinfo, expected, "missing")


def test_root_may_contain_the_unpacked_archive_folder(tmp_path):
    write_tinyimagenet(tmp_path / "tiny-imagenet-200", WNIDS, n_train=1, n_val=1, n_test=1)
    ds = build_dataset("tinyimagenet", "val", tmp_path)
    assert len(ds) == 3 and ds.root == tmp_path / "tiny-imagenet-200"


def test_nonexistent_root_and_unknown_split(tmp_path):
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("tinyimagenet", "train", tmp_path / "absent")
    assert_one_line(excinfo, str(tmp_path / "absent"))
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("tinyimagenet", "unlabeled", tmp_path)
    assert_one_line(excinfo, "'unlabeled'", "train, val, test")
