"""Pixel-level domain shifts of the fashion_split target: exact where they should be, deterministic per image."""

from __future__ import annotations

import pytest
import torch

from tests.cli_helpers import assert_one_line
from transfer.data.domain_shift import SHIFTS, apply_shifts, parse_shifts
from transfer.errors import CKTFError


def _images(n: int = 6) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


@pytest.mark.parametrize("name", list(SHIFTS))
def test_every_shift_keeps_shape_and_dtype_and_changes_pixels(name):
    images = _images()
    out = apply_shifts(images, [name], torch.arange(6))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)


def test_invert_and_rotate90_are_exact():
    images = _images()
    assert torch.equal(apply_shifts(images, ["invert"], torch.arange(6)), 255 - images)
    rotated = apply_shifts(images, ["rotate90"], torch.arange(6))
    assert torch.equal(rotated[0, 0, 0], images[0, 0, :, -1])  # the top row was the right column
    assert torch.equal(rotated.rot90(-1, dims=(2, 3)), images)


def test_lowres_and_blur_remove_fine_detail_but_keep_flat_areas():
    checker = ((torch.arange(28).view(-1, 1) + torch.arange(28)) % 2 * 255).to(torch.uint8).view(1, 1, 28, 28)
    flat = torch.full((1, 1, 28, 28), 100, dtype=torch.uint8)
    for name in ("lowres", "blur"):
        assert apply_shifts(checker, [name], torch.arange(1)).float().std() < 0.2 * checker.float().std()
        assert torch.equal(apply_shifts(flat, [name], torch.arange(1)), flat)


def test_noise_depends_on_the_image_index_only():
    images = _images(3)
    a = apply_shifts(images, ["noise"], torch.tensor([5, 6, 7]))
    b = apply_shifts(images[1:2], ["noise"], torch.tensor([6]))
    assert torch.equal(a[1:2], b)  # the same image in another split gets the same noise
    c = apply_shifts(images[1:2], ["noise"], torch.tensor([8]))
    assert not torch.equal(b, c)
    assert (a.float() - images.float()).std() > 20


def test_shifts_apply_in_order():
    images = _images()
    both = apply_shifts(images, ["invert", "rotate90"], torch.arange(6))
    assert torch.equal(both, (255 - images).rot90(1, dims=(2, 3)))


@pytest.mark.parametrize(("value", "expected"), [(None, []), ("none", []), ("invert, lowres", ["invert", "lowres"]),
                                                 (["blur"], ["blur"])])
def test_parse_shifts(value, expected):
    assert parse_shifts(value, "target_shift") == expected


@pytest.mark.parametrize(("value", "expected"), [("sepia", "'sepia'"), (["invert", "invert"], "duplicates"),
                                                 (3, "target_shift=3"), ([1], "target_shift")])
def test_bad_shifts_raise_one_line_errors_naming_the_option(value, expected):
    with pytest.raises(CKTFError) as excinfo:
        parse_shifts(value, "target_shift")
    assert_one_line(excinfo, "target_shift", expected)
