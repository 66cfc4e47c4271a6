"""Pixel-level domain shifts for a CPU-scale cross-domain proxy built from one dataset.

The paper's target (STL-10) differs from its source (Tiny-ImageNet) in the images themselves, not only in
the classes: other photos, another resolution. A proxy cut out of Fashion-MNIST gets such a gap by shifting
the target's images: the teacher then meets inputs it was never trained on, as in the paper, and the
shift is applied once, in memory, when a split is built (a fraction of a second for 30K images).

Every shift maps uint8 ``[N, 1, H, W]`` images to new uint8 images of the same shape and is deterministic:
``noise`` draws each image's noise from its ``index``, the image's position in the underlying dataset, and
from nothing else, so an image gets the same noise in every split and every config that contains it (the
labeled probe subset is a subset of the unlabeled pool, and must stay pixel-identical to it).

Example::

    shifted = apply_shifts(images, parse_shifts("invert,lowres", "target_shift"), indices=idx)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from transfer.errors import CKTFError

NOISE_STD: float = 40.0  # of 255: visible grain that leaves the garment recognisable
BLUR_SIGMA: float = 1.0  # pixels at 28×28


def _invert(images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Light garments on a white background: every grey level flipped."""
    return 255 - images


def _rotate90(images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """A quarter turn counter-clockwise: the same pixels, a geometry the source never shows."""
    return torch.rot90(images, 1, dims=(2, 3)).contiguous()


def _lowres(images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Half the resolution (antialiased down, bilinear back up), like STL-10's 96 px images shown at 64 px."""
    h, w = images.shape[-2:]
    small = F.interpolate(images.float(), size=(h // 2, w // 2), mode="bilinear", antialias=True, align_corners=False)
    return _to_uint8(F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False))


def _blur(images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gaussian blur (σ = BLUR_SIGMA px, 5-tap separable kernel, borders replicated)."""
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * BLUR_SIGMA**2))
    kernel = kernel / kernel.sum()
    x = F.pad(images.float(), (2, 2, 2, 2), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, 5))
    x = F.conv2d(x, kernel.view(1, 1, 5, 1))
    return _to_uint8(x)


def _noise(images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Additive Gaussian noise (std NOISE_STD grey levels), a function of each image's ``index`` alone."""
    noise = torch.empty(images.shape[1:], dtype=torch.float32)
    out = torch.empty_like(images)
    generator = torch.Generator()
    for row, index in enumerate(indices.tolist()):
        generator.manual_seed(index)
        noise.normal_(0.0, NOISE_STD, generator=generator)
        out[row] = _to_uint8(images[row].float() + noise)
    return out


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


SHIFTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "invert": _invert,
    "rotate90": _rotate90,
    "lowres": _lowres,
    "blur": _blur,
    "noise": _noise,
}


def parse_shifts(value: Any, option: str) -> list[str]:
    """Validate a list of shift names (a sequence, or a string like ``"invert,lowres"``); ``none`` is no shift."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    if not isinstance(value, Sequence) or any(not isinstance(v, str) for v in value):
        raise CKTFError(f"fashion_split option {option}={value!r} is invalid; expected shift names from "
                        f"{', '.join(SHIFTS)} (or none)")
    names = [v for v in value if v != "none"]
    unknown = [v for v in names if v not in SHIFTS]
    if unknown:
        raise CKTFError(f"fashion_split option {option} has unknown shift {unknown[0]!r}; expected some of "
                        f"{', '.join(SHIFTS)} (or none)")
    if len(set(names)) != len(names):
        raise CKTFError(f"fashion_split option {option}={names} has duplicates; expected each shift at most once")
    return names


def apply_shifts(images: torch.Tensor, shifts: list[str], indices: torch.Tensor) -> torch.Tensor:
    """``images`` (uint8 ``[N, 1, H, W]``) with ``shifts`` applied in order; ``indices`` seed per-image noise."""
    for name in shifts:
        images = SHIFTS[name](images, indices)
    return images
