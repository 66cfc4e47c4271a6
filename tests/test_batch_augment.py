"""Batched augmentation: same outputs as the per-image pipelines, normalisation, seeding, config option."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.utils.data import TensorDataset
from torchvision.transforms.v2 import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from tests.data_fixtures import INPUTS, write_fashion_idx
from transfer.config import DataConfig, TeacherConfig, load_config
from transfer.data import DATASETS, build_transform
from transfer.data import transforms as T
from transfer.data.batch_augment import PaddedCropFlip, RandomResizedCropFlip, build_batch_transform, resample_boxes
from transfer.data.transforms import build_decode_transform
from transfer.errors import CKTFError
from transfer.stages.common import build_splits, make_loader


def images(shape, n, seed=0):
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def decoded(dataset, batch, image_size=None):
    decode = build_decode_transform(dataset, image_size)
    return torch.stack([decode(x) if decode else x for x in batch])


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("train", [True, False])
def test_decode_then_batch_gives_the_per_image_shape(dataset, train):
    batch = decoded(dataset, images(INPUTS[dataset], 3))
    assert batch.dtype == torch.uint8
    out = build_batch_transform(dataset, train)(batch)
    expected = build_transform(dataset, train)(images(INPUTS[dataset], 1)[0]).shape
    assert out.shape == (3, *expected) and out.dtype == torch.float32 and out.is_contiguous()


def test_decode_only_resizes_where_sizes_differ():
    assert build_decode_transform("stl10") is None and build_decode_transform("fashion_split") is None
    assert build_decode_transform("image_folder")(images((3, 50, 80), 1)[0]).shape == (3, 64, 64)
    resized = build_decode_transform("fashion_mnist", image_size=32)(images((1, 28, 28), 1)[0])
    assert resized.shape == (1, 32, 32) and resized.dtype == torch.uint8


@pytest.mark.parametrize("dataset", ["fashion_split", "tinyimagenet", "stl10"])
def test_eval_matches_the_per_image_eval_transform(dataset):
    batch = images(INPUTS[dataset], 4)
    # float input in [0, 1]: torchvision's uint8 resize rounds (to within one level), its float resize does not
    expected = torch.stack([build_transform(dataset, False)(x.float() / 255) for x in batch])
    assert torch.allclose(build_batch_transform(dataset, False)(batch), expected, atol=1e-4)


def test_normalisation_statistics():
    levels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1)
    for dataset, mean, std in (("fashion_split", T.FASHION_MNIST_MEAN, T.FASHION_MNIST_STD),
                               ("stl10", T.IMAGENET_MEAN, T.IMAGENET_STD)):
        c, side = len(mean), INPUTS[dataset][1]
        expected = (levels.float() / 255 - torch.tensor(mean).view(1, c, 1, 1)) / torch.tensor(std).view(1, c, 1, 1)
        out = build_batch_transform(dataset, True)(levels.expand(3, c, side, side).contiguous())
        if c == 1:  # a crop shifted by up to 2 pixels brings padding zeros into the 2-pixel border only
            out = out[:, :, 2:-2, 2:-2]
        assert torch.allclose(out, expected.expand_as(out), atol=1e-5), dataset
    pixels = images((1, 28, 28), 64)
    scaled = (pixels.float() / 255 - T.FASHION_MNIST_MEAN[0]) / T.FASHION_MNIST_STD[0]
    out = build_batch_transform("fashion_split", False)(pixels)
    assert out.mean().item() == pytest.approx(scaled.mean().item(), abs=1e-5)
    assert out.std().item() == pytest.approx(scaled.std().item(), abs=1e-5)


def test_padded_crops_are_exactly_the_per_image_candidates_and_all_occur():
    x = images((1, 28, 28), 1)[0]
    normalise = build_transform("fashion_split", False)
    candidates = {}
    for top, left, flip in itertools.product(range(5), range(5), (False, True)):
        crop = TF.crop(TF.pad(x, [2]), top, left, 28, 28)
        candidates[(top, left, flip)] = normalise(TF.horizontal_flip(crop) if flip else crop)
    torch.manual_seed(0)
    out = build_batch_transform("fashion_split", True)(x.expand(1000, 1, 28, 28).contiguous())
    seen = []
    for sample in out:
        match = [key for key, cand in candidates.items() if torch.allclose(sample, cand, atol=1e-5)]
        assert len(match) == 1
        seen.append(match[0])
    counts = torch.tensor([seen.count(key) for key in candidates])
    assert counts.min() >= 5 and counts.max() <= 40  # 50 equally likely outcomes, 20 expected each


def test_batched_resized_crop_equals_torchvision_on_the_same_boxes():
    batch = images((3, 24, 20), 40, seed=3)
    transform = RandomResizedCropFlip(T.IMAGENET_MEAN, T.IMAGENET_STD, size=16)
    boxes = transform.boxes(40, 24, 20, torch.device("cpu"), torch.Generator().manual_seed(0))
    flip = torch.arange(40) % 2 == 1
    out = resample_boxes(batch.float(), boxes, 16, flip)
    for image, (top, left, h, w), flipped, got in zip(batch, boxes.int().tolist(), flip, out, strict=True):
        expected = TF.resized_crop(image.float(), top, left, h, w, [16, 16], antialias=True)
        if flipped:
            expected = TF.horizontal_flip(expected)
        assert torch.allclose(got, expected, atol=1e-3)
    assert ((boxes[:, 2] > 16) | (boxes[:, 3] > 16)).any() and ((boxes[:, 2] < 16) & (boxes[:, 3] < 16)).any()


def test_boxes_follow_torchvisions_distribution():
    transform = RandomResizedCropFlip(T.IMAGENET_MEAN, T.IMAGENET_STD, size=32)
    top, left, h, w = transform.boxes(4000, 48, 40, torch.device("cpu"), torch.Generator().manual_seed(0)).T
    assert bool((top >= 0).all() and (left >= 0).all() and (top + h <= 48).all() and (left + w <= 40).all())
    area = h * w / (48 * 40)
    assert area.min() >= 0.06 and area.max() <= 1.0
    assert (w / h).min() >= 0.7 and (w / h).max() <= 1.4

    torch.manual_seed(0)
    reference = RandomResizedCrop(32)
    params = [reference.make_params([torch.zeros(3, 48, 40)]) for _ in range(4000)]
    ref_area = torch.tensor([p["height"] * p["width"] / (48 * 40) for p in params])
    ref_log_ratio = torch.tensor([math.log(p["width"] / p["height"]) for p in params])
    assert area.mean().item() == pytest.approx(ref_area.mean().item(), abs=0.02)
    assert torch.log(w / h).std().item() == pytest.approx(ref_log_ratio.std().item(), abs=0.02)


def test_fallback_is_the_central_crop_like_torchvision():
    transform = RandomResizedCropFlip(T.IMAGENET_MEAN, T.IMAGENET_STD, size=8, scale=(2.0, 3.0))
    assert transform.boxes(2, 10, 30, torch.device("cpu")).tolist() == [[0.0, 8.0, 10.0, 13.0]] * 2


@pytest.mark.parametrize("dataset", ["fashion_split", "stl10"])
def test_train_is_seeded_by_the_global_rng_and_eval_draws_nothing(dataset):
    batch = images(INPUTS[dataset], 6)
    train, evaluate = build_batch_transform(dataset, True), build_batch_transform(dataset, False)
    torch.manual_seed(5)
    first = train(batch)
    torch.manual_seed(5)
    assert torch.equal(train(batch), first)
    assert not torch.equal(train(batch), first)
    assert torch.equal(train(batch, torch.Generator().manual_seed(1)), train(batch, torch.Generator().manual_seed(1)))
    state = torch.get_rng_state()
    assert torch.equal(evaluate(batch), evaluate(batch))
    assert torch.equal(torch.get_rng_state(), state)


def test_rejects_a_batch_that_is_not_uint8():
    with pytest.raises(ValueError, match="uint8"):
        build_batch_transform("fashion_split", True)(torch.zeros(2, 1, 28, 28))


def test_augment_option_is_validated_in_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {name: fashion_split}\nmodel: {name: resnet8}\nlog: {name: t}\n")
    assert load_config(path, TeacherConfig).data.augment == "batched"
    assert load_config(path, TeacherConfig, ["--data.augment", "per_image"]).data.augment == "per_image"
    with pytest.raises(CKTFError) as info:
        load_config(path, TeacherConfig, ["--data.augment", "gpu"])
    message = str(info.value)
    assert "\n" not in message and "data.augment" in message and "per_image" in message


def test_build_splits_hands_uint8_training_items_and_the_batch_augmentation(tmp_path):
    write_fashion_idx(tmp_path, n_train=60, n_test=20)
    base = {"name": "fashion_mnist", "root": str(tmp_path), "test_split": "test", "val_fraction": 0.2}
    batched = build_splits(DataConfig(**base), seed=0)
    assert batched.train[0][0].dtype == torch.uint8 and isinstance(batched.augment, PaddedCropFlip)
    assert batched.val[0][0].dtype == torch.float32 and batched.test[0][0].dtype == torch.float32
    per_image = build_splits(DataConfig(**base, augment="per_image"), seed=0)
    assert per_image.train[0][0].dtype == torch.float32 and per_image.augment is None


def test_loader_defaults():
    data = TensorDataset(torch.zeros(8, 1, 4, 4, dtype=torch.uint8))
    cpu = torch.device("cpu")
    assert not make_loader(data, 4, train=True, num_workers=0, device=cpu).pin_memory
    assert make_loader(data, 4, train=True, num_workers=2, device=torch.device("cuda")).pin_memory
    for random_items in (True, False):  # items seeded per (epoch, index): workers can persist either way
        loader = make_loader(data, 4, train=True, num_workers=2, device=cpu, random_items=random_items)
        assert loader.persistent_workers and loader.prefetch_factor == 4
    assert make_loader(data, 4, train=False, num_workers=2, device=cpu).persistent_workers
