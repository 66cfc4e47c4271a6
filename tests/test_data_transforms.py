"""Train/eval pipelines: output shape/dtype per dataset, determinism, normalisation constants."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.data_fixtures import INPUTS
from transfer.data import DATASETS, build_transform, default_image_size
from transfer.data import transforms as T
from transfer.errors import CKTFError


def image(shape, seed=0):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("train", [True, False])
def test_output_shape_and_dtype(dataset, train):
    channels = INPUTS[dataset][0]
    size = default_image_size(dataset)
    out = build_transform(dataset, train)(image(INPUTS[dataset]))
    assert out.shape == (channels, size, size) and out.dtype == torch.float32


@pytest.mark.parametrize("dataset", DATASETS)
def test_eval_is_deterministic_and_train_is_not(dataset):
    x = image(INPUTS[dataset])
    evaluate, augment = build_transform(dataset, False), build_transform(dataset, True)
    assert torch.equal(evaluate(x), evaluate(x))
    torch.manual_seed(0)
    assert any(not torch.equal(augment(x), augment(x)) for _ in range(5))


def test_fashion_eval_only_normalises():
    x = image((1, 28, 28))
    expected = (x.float() / 255 - T.FASHION_MNIST_MEAN[0]) / T.FASHION_MNIST_STD[0]
    assert torch.allclose(build_transform("fashion_mnist", False)(x), expected, atol=1e-5)


def test_natural_eval_resizes_shorter_side_then_center_crops():
    x = torch.zeros((3, 96, 128), dtype=torch.uint8)
    x[:, :, 16:112] = 255  # a centred 96×96 white square in a wider black image
    out = build_transform("stl10", False)(x)
    white = (torch.tensor(1.0) - torch.tensor(T.IMAGENET_MEAN)) / torch.tensor(T.IMAGENET_STD)
    assert out.shape == (3, 64, 64) and torch.allclose(out[:, 32, 32], white, atol=1e-4)
    assert torch.allclose(out[:, :, 1:-1], white[:, None, None].expand(3, 64, 62), atol=0.05)


def test_image_size_override_and_errors():
    assert build_transform("tinyimagenet", False, image_size=32)(image((3, 64, 64))).shape == (3, 32, 32)
    assert build_transform("fashion_split", True, image_size=32)(image((1, 28, 28))).shape == (1, 32, 32)
    with pytest.raises(CKTFError) as excinfo:
        build_transform("mnist", True)
    assert "mnist" in str(excinfo.value) and "stl10" in str(excinfo.value)
    with pytest.raises(CKTFError):
        build_transform("stl10", True, image_size=0)
    with pytest.raises(CKTFError):
        default_image_size("mnist")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="no system Fashion-MNIST")
def test_fashion_constants_match_the_train_set():
    from transfer.data.fashion_mnist import load_fashion_mnist

    pixels = load_fashion_mnist(None, "train")[0].float() / 255
    assert abs(pixels.mean().item() - T.FASHION_MNIST_MEAN[0]) < 1e-4
    assert abs(pixels.std().item() - T.FASHION_MNIST_STD[0]) < 1e-4
