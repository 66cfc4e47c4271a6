"""Training augmentation applied to a whole uint8 batch on the training device.

Per-image ``torchvision.transforms.v2`` pipelines cost ~220 µs per 28×28 image in Python overhead,
about a fifth of a CPU training step. Here the dataset yields uint8 images of one size (see
:func:`transfer.data.transforms.build_decode_transform`), collation stays cheap, and one call per
batch draws every sample's crop and flip at once, resamples and normalises.

Randomness comes from torch's global generator of the batch's device (or an explicit ``generator``),
so the engine's per-epoch ``seed_everything(derive_seed(seed, epoch))`` makes runs reproducible
and resumable exactly as with per-image transforms. The draws differ from theirs; the distribution
of outputs is the same (natural images skip only torchvision's rounding of resized pixels to uint8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from transfer.data.transforms import CROP_PADDING, NATURAL_DATASETS, resolve_image_size, resolve_normalization


class BatchTransform:
    """uint8 ``[B, C, H, W]`` → normalised float32 ``[B, C, S, S]``; subclasses add the geometry."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != len(self.mean):
            raise ValueError(f"{type(self).__name__} expects a uint8 [B, {len(self.mean)}, H, W] batch, "
                             f"got {images.dtype} {list(images.shape)}")
        return self.transform(images, generator)

    def transform(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.normalize(images)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(x / 255 - mean) / std`` (ToDtype(scale=True) + Normalize) as a new float32 tensor."""
        scale, shift = self._scale_shift(images.device)
        return torch.mul(images, scale).add_(shift)

    def _scale_shift(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._affine:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
            self._affine[device] = ((1 / (255 * std)).to(device), (-mean / std).to(device))
        return self._affine[device]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


class PaddedCropFlip(BatchTransform):
    """RandomCrop(H×W, padding, zero fill) + RandomHorizontalFlip(0.5) + normalise, per sample.

    Each output is exactly one of the (2·padding+1)²·2 crops/flips the per-image v2 pipeline can
    produce, each equally likely; one gather on the padded uint8 batch does all of them.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], padding: int = 2) -> None:
        super().__init__(mean, std)
        self.padding = padding

    def transform(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, c, h, w = images.shape
        p, device = self.padding, images.device
        padded = F.pad(images, (p, p, p, p))
        top = torch.randint(0, 2 * p + 1, (b, 1), device=device, generator=generator)
        left = torch.randint(0, 2 * p + 1, (b, 1), device=device, generator=generator)
        flip = torch.rand(b, 1, device=device, generator=generator) < 0.5
        rows = top + torch.arange(h, device=device)
        cols = left + torch.arange(w, device=device)
        cols = torch.where(flip, cols.flip(1), cols)
        index = (rows.view(b, h, 1) * (w + 2 * p) + cols.view(b, 1, w)).view(b, 1, h * w)
        crops = padded.reshape(b, c, -1).gather(2, index.expand(b, c, h * w)).view(b, c, h, w)
        return self.normalize(crops)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(padding={self.padding}, mean={self.mean}, std={self.std})"


class RandomResizedCropFlip(BatchTransform):
    """RandomResizedCrop(size, scale, ratio, antialias) + RandomHorizontalFlip(0.5) + normalise, per sample.

    Boxes follow torchvision's rule (10 tries of area fraction ~ U(scale) and log-aspect ~ U(log ratio),
    rounded to whole pixels, else the central crop), drawn for the whole batch at once; each box is
    resized by :func:`resample_boxes`, which reproduces torchvision's antialiased bilinear resize of the
    cropped pixels (it only skips the final rounding to uint8).

    Dense weight matrices rather than ``grid_sample``: exact antialiasing when a box shrinks, and two
    batched matrix products are what accelerators do best. On a CPU they cost about as much as the
    per-image pipeline for 64×64 images (~180 against ~260 µs per image, one thread).
    """

    ATTEMPTS = 10

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], size: int,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        super().__init__(mean, std)
        self.size, self.scale, self.ratio = size, scale, ratio

    def boxes(self, b: int, height: int, width: int, device: torch.device,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B, 4]`` float boxes ``(top, left, height, width)`` in whole pixels."""
        shape = (b, self.ATTEMPTS)
        area = height * width * torch.empty(shape, device=device).uniform_(*self.scale, generator=generator)
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(torch.empty(shape, device=device).uniform_(log_lo, log_hi, generator=generator))
        w = torch.round(torch.sqrt(area * aspect))
        h = torch.round(torch.sqrt(area / aspect))
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.int().argmax(dim=1, keepdim=True)
        w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

        fallback_w, fallback_h = float(width), float(height)
        if width / height < min(self.ratio):
            fallback_h = float(round(width / min(self.ratio)))
        elif width / height > max(self.ratio):
            fallback_w = float(round(height * max(self.ratio)))
        found = fits.any(dim=1)
        w = torch.where(found, w, torch.full_like(w, fallback_w))
        h = torch.where(found, h, torch.full_like(h, fallback_h))

        u = torch.rand(2, b, device=device, generator=generator)
        top = torch.minimum(torch.floor(u[0] * (height - h + 1)), height - h)
        left = torch.minimum(torch.floor(u[1] * (width - w + 1)), width - w)
        top = torch.where(found, top, torch.floor((height - h) / 2))
        left = torch.where(found, left, torch.floor((width - w) / 2))
        return torch.stack([top, left, h, w], dim=1)

    def transform(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, _, height, width = images.shape
        boxes = self.boxes(b, height, width, images.device, generator)
        flip = torch.rand(b, device=images.device, generator=generator) < 0.5
        return self.normalize(resample_boxes(images.float(), boxes, self.size, flip))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"mean={self.mean}, std={self.std})")


class CenterResize(BatchTransform):
    """Deterministic eval: the central square of each image resized to size×size, then normalised.

    On square inputs (what the decode step yields) this is exactly torchvision's
    ``Resize(size) + CenterCrop(size)``; on others it crops before resizing instead of after.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], size: int) -> None:
        super().__init__(mean, std)
        self.size = size

    def transform(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, _, height, width = images.shape
        side = min(height, width)
        box = torch.tensor([(height - side) // 2, (width - side) // 2, side, side], dtype=torch.float32,
                           device=images.device)
        return self.normalize(resample_boxes(images.float(), box.expand(b, 4), self.size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, mean={self.mean}, std={self.std})"


def resize_weights(start: torch.Tensor, length: torch.Tensor, size: int, extent: int) -> torch.Tensor:
    """``[B, size, extent]`` weights resizing pixels ``start .. start+length-1`` of each row to ``size``.

    The triangle (bilinear) filter with half-pixel centres, widened by the scale factor when shrinking
    and renormalised at the box edges: the weights of torch's antialiased bilinear interpolation,
    written as a dense matrix so a whole batch of different boxes resizes in two matrix products.
    """
    scale = (length / size).view(-1, 1, 1)
    centre = start.view(-1, 1, 1) + scale * (torch.arange(size, device=start.device).view(1, -1, 1) + 0.5)
    pixel = torch.arange(extent, device=start.device).view(1, 1, -1) + 0.5
    weights = (1 - ((pixel - centre) / scale.clamp(min=1.0)).abs()).clamp_(min=0)
    inside = (pixel > start.view(-1, 1, 1)) & (pixel < (start + length).view(-1, 1, 1))
    weights = weights * inside
    return weights / weights.sum(dim=2, keepdim=True)


def resample_boxes(images: torch.Tensor, boxes: torch.Tensor, size: int,
                   flip: torch.Tensor | None = None) -> torch.Tensor:
    """Resize box ``(top, left, height, width)`` of each float image to size×size, mirrored where ``flip``."""
    b, c, height, width = images.shape
    top, left, h, w = boxes.unbind(1)
    rows = resize_weights(top, h, size, height)
    cols = resize_weights(left, w, size, width)
    if flip is not None:
        cols = torch.where(flip.view(-1, 1, 1), cols.flip(1), cols)
    resized_rows = torch.matmul(rows.unsqueeze(1), images)
    return torch.bmm(resized_rows.reshape(b, c * size, width), cols.transpose(1, 2)).view(b, c, size, size)


def build_batch_transform(dataset: str, train: bool, image_size: int | None = None,
                          mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> BatchTransform:
    """The batched counterpart of ``build_transform(dataset, train, image_size, mean, std)``.

    Its input is a batch of what the dataset yields through
    :func:`~transfer.data.transforms.build_decode_transform`; the output matches ``build_transform``'s.
    """
    size = resolve_image_size(dataset, image_size)
    mean, std = resolve_normalization(dataset, mean, std)
    if dataset in NATURAL_DATASETS:
        if train:
            return RandomResizedCropFlip(mean, std, size)
        return CenterResize(mean, std, size)
    if train:
        return PaddedCropFlip(mean, std, padding=CROP_PADDING[dataset])
    return BatchTransform(mean, std)
