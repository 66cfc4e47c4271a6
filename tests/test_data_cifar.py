"""CIFAR-10/100 from the official pickled "python version" files, read without running anything they hold."""

import pickle
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import assert_one_line, invoke, one_line_error
from tests.data_fixtures import CodePayload, write_cifar
from transfer.data import build_dataset, build_transform
from transfer.data.batch_augment import build_batch_transform
from transfer.errors import CKTFError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_official_layout_loads_pixels_labels_and_names(tmp_path, variant):
    written = write_cifar(tmp_path, variant, n_train=23, n_test=7)
    for root in (tmp_path, written["folder"]):
        for split in ("train", "test"):
            ds = build_dataset(variant, split, root)
            images, labels = written[split]
            assert len(ds) == len(labels) and ds.in_channels == 3
            assert ds.num_classes == (100 if variant == "cifar100" else 10) and ds.classes[3] == "class3"
            image, target, index = ds[5]
            assert torch.equal(image, torch.from_numpy(images[5])) and target == labels[5] and index == 5
            assert ds.targets.tolist() == labels


def test_transforms_keep_32px_and_pad_crop_by_4(tmp_path):
    write_cifar(tmp_path, "cifar100", n_train=8, n_test=4)
    ds = build_dataset("cifar100", "train", tmp_path, build_transform("cifar100", train=True))
    assert ds[0][0].shape == (3, 32, 32) and ds[0][0].dtype == torch.float32
    raw = build_dataset("cifar100", "train", tmp_path)
    batch = torch.stack([raw[i][0] for i in range(8)])
    augment = build_batch_transform("cifar100", train=True)
    assert augment.padding == 4 and augment(batch).shape == (8, 3, 32, 32)
    plain = build_transform("cifar100", train=False)(raw[0][0])
    mean = torch.tensor([0.5071, 0.4865, 0.4409]).view(3, 1, 1)
    std = torch.tensor([0.2673, 0.2564, 0.2762]).view(3, 1, 1)
    assert torch.allclose(plain, (raw[0][0].float() / 255 - mean) / std, atol=1e-6)


def test_a_pickle_carrying_code_is_refused_and_never_runs(tmp_path):
    folder = write_cifar(tmp_path, "cifar100", n_train=4, n_test=4)["folder"]
    marker = tmp_path / "pwned"
    with open(folder / "train", "wb") as fh:
        pickle.dump({b"data": CodePayload(marker), b"fine_labels": [0]}, fh, protocol=4)
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("cifar100", "train", tmp_path)
    assert_one_line(excinfo, "refusing", "train", "system", "nothing in it was run")
    assert not marker.exists()


def test_broken_files_are_one_line(tmp_path):
    folder = write_cifar(tmp_path, "cifar10", n_train=10, n_test=4)["folder"]
    (folder / "data_batch_3").unlink()
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("cifar10", "train", tmp_path)
    assert_one_line(excinfo, "data_batch_3", "missing")
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:50])
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("cifar10", "test", tmp_path)
    assert_one_line(excinfo, "test_batch", "cannot read")
    with pytest.raises(CKTFError) as excinfo:
        build_dataset("cifar10", "test", tmp_path / "nowhere")
    assert_one_line(excinfo, "nowhere", "does not exist")


def test_a_teacher_trains_on_cifar100_from_the_command_line(tmp_path):
    write_cifar(tmp_path / "data", "cifar100", n_train=64, n_test=16)
    args = ["train-teacher", "--config", str(REPO / "configs/fashion_split/teacher.yaml"), "--data.name", "cifar100",
            "--data.root", str(tmp_path / "data"), "--data.train_split", "train", "--data.test_split", "test",
            "--data.options", "{}", "--model.name", "resnet8", "--train.epochs", "1", "--train.batch_size", "16",
            "--log.root", str(tmp_path / "runs"), "--log.name", "c100", "--log.tensorboard", "false"]
    code, out = invoke(*args)
    assert code == 0, out
    code, out = invoke(*args[:-6], "--log.root", str(tmp_path / "runs"), "--log.name", "x", "--data.root",
                       str(tmp_path / "missing"))
    one_line_error(code, out, "missing")
