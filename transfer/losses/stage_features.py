"""How a tapped intermediate map becomes the vector a projection head sees (``loss.nce.stage_norm``/``stage_pool``).

Two recipes exist:

- **pooled** (the default, the paper's text, CKTF eq. 2): a global average pool per sample, ``[B, C, H, W]``
  → ``[B, C]``. Nothing couples the samples of a batch.
- **reference** (what the published code, kaiqi123/CKTF ``distiller_zoo/ST.py``, computes): every stage map
  is first L2-normalised *across the batch* (``stage_norm batch``: each (channel, y, x) entry divided by
  its norm over the B samples), then pooled with the model family's pool (``stage_pool reference``): an
  ``w × w`` average pool with stride ``w`` followed by flattening for the CIFAR-style ResNets and WRNs
  (``w = 8``: a 32×32 map gives ``C·16`` values), a global pool for VGG and ImageNet-style ResNets. The
  reference pools its stem with the family pool too but never batch-normalises it (the stem objective
  reads the model's pooled ``f0``), and leaves the penultimate vector alone.

Two details of the reference are not copied because they change nothing or only matter for pairs no
published script uses. (1) It zero-pads the student's map to the teacher's channel count before the
student head; zero inputs add nothing to a linear (or BatchNorm-then-linear, or MLP) head, so a head on
the unpadded map computes the same function. (2) It picks the stage pool from the *student's* name and
applies it to both maps (the stem uses each model's own pool); here each side uses its own model's
``reference_pool``, which is the same whenever student and teacher are of one family.

Batch normalisation makes a sample's embedding depend on its batch-mates (and on the batch size), which
is why it is not the default. Pooling windows follow ``avg_pool2d`` without padding or ``ceil_mode``, as
the reference: a 28×28 map gives a 3×3 grid and its last 4 rows and columns are dropped. Where a map is
smaller than the window (a 7×7 map under ``w = 8``) the reference raises an error; here the window is
clipped to the map, i.e. that map is pooled globally.

Example::

    reduce = StageFeatures(batch_norm=True, window=8)
    reduce(torch.randn(64, 16, 32, 32)).shape           # [64, 256] = 16 channels x 4 x 4 cells
    reduce.out_dim((16, 32, 32))                        # 256: the projection head's input size
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfer.losses.projection import pool_flatten

NORM_EPS = 1e-12  # F.normalize's: a norm below it is clamped to it


def batch_normalise(x: Tensor) -> Tensor:
    """Divide every entry by its L2 norm over the batch dimension (``dim=0``), in fp32."""
    return F.normalize(x.float(), p=2, dim=0, eps=NORM_EPS)


def _flat_layout(x: Tensor) -> tuple[Tensor, bool]:
    """``x`` ``[B, C, H, W]`` as a ``[B, M]`` view in memory order (copied only when neither NCHW nor
    channels_last is), and whether that order is channels-last (``[B, H, W, C]``)."""
    if x.is_contiguous():
        return x.view(x.shape[0], -1), False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1), True
    return x.contiguous().view(x.shape[0], -1), False


_CHUNK_ELEMENTS = 1 << 20  # per temporary (4 MiB of fp32): cache-sized, and below the allocator's mmap threshold


def _sample_chunks(batch: int, per_sample: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, per_sample))
    return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]


def _inverse_batch_norms(flat: Tensor) -> tuple[Tensor, Tensor]:
    """``1 / max(‖flat[:, m]‖, eps)`` for every column of a ``[B, M]`` map, and where the norm was not clamped.

    Summed as squares a few samples at a time: ``linalg.vector_norm(dim=0)`` is ~30x slower on CPU here.
    """
    norm = sum(flat[part].square().sum(0) for part in _sample_chunks(flat.shape[0], flat.shape[1])).sqrt_()
    return norm.clamp_min(NORM_EPS).reciprocal_(), norm > NORM_EPS


def _cells(flat: Tensor, shape: torch.Size, channels_last: bool) -> Tensor:
    """A ``[b, M]`` flat map as ``[b, H·W, C]`` (channels-last order) or ``[b, C, H·W]``."""
    _, c, h, w = shape
    return flat.view(-1, h * w, c) if channels_last else flat.view(-1, c, h * w)


def _grid(flat: Tensor, shape: torch.Size, channels_last: bool) -> Tensor:
    """A ``[b, M]`` flat map back as ``[b, C, H, W]`` (a view, in the flat map's memory format)."""
    _, c, h, w = shape
    return flat.view(-1, h, w, c).permute(0, 3, 1, 2) if channels_last else flat.view(-1, c, h, w)


class _BatchNormalisedPool(torch.autograd.Function):
    """``pool(x / ‖x‖_batch)``: the batch-dimension L2 normalisation and the pooling in a few passes.

    Autograd through ``F.normalize`` and a mean keeps ~6 map-sized temporaries forward and backward; here the
    forward reads the map twice (norms; scaled and pooled a few samples at a time) and the backward is
    ``∂x = ∂y·r − x·r³·Σ_b(∂y·x)`` with ``r = 1/max(‖x‖_b, eps)`` (the second part vanishes where the norm was
    clamped), whose only map-sized tensor is the gradient itself. ``window=None`` pools globally; else
    ``window × window`` cells as :func:`window_pool`. Computes in fp32 and returns the input's gradient in its
    dtype and memory format.
    """

    @staticmethod
    def forward(ctx, x: Tensor, window: int | None) -> Tensor:
        flat, channels_last = _flat_layout(x)
        flat = flat.to(torch.promote_types(x.dtype, torch.float32))
        b, _, h, w = x.shape
        chunks = _sample_chunks(b, flat.shape[1])
        inverse, live = _inverse_batch_norms(flat)
        ctx.save_for_backward(x, inverse, live)
        ctx.window = window
        if window is None:
            cells = _cells(flat, x.shape, channels_last)
            weights = inverse.view(cells.shape[1:])
            return torch.cat([(cells[part] * weights).mean(1 if channels_last else 2) for part in chunks])
        kernel = _windows(h, w, window)
        ctx.kernel = kernel
        pooled = [F.avg_pool2d(_grid(flat[part] * inverse, x.shape, channels_last), kernel, stride=kernel)
                  for part in chunks]
        return einops.rearrange(torch.cat(pooled), "b c h w -> b (c h w)")

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        x, inverse, live = ctx.saved_tensors
        b, c, h, w = x.shape
        flat, channels_last = _flat_layout(x)
        flat = flat.to(inverse.dtype)
        grad = grad.to(inverse.dtype)
        chunks = _sample_chunks(b, flat.shape[1])
        if ctx.window is None:
            spread = (grad / (h * w)).view((b, 1, c) if channels_last else (b, c, 1))  # ∂y, broadcast over cells
            cells = _cells(flat, x.shape, channels_last)
            dot = sum((cells[part] * spread[part]).sum(0) for part in chunks)  # Σ_b ∂y·x per entry
            correction = (inverse.pow(3) * dot.view(-1)).masked_fill_(~live, 0.0)
            grad_flat = flat * correction.neg_()
            grad_cells = _cells(grad_flat, x.shape, channels_last)
            grad_cells.addcmul_(spread, inverse.view(grad_cells.shape[1:]))
        else:
            pooled = grad.reshape(b, c, h // ctx.kernel[0], w // ctx.kernel[1])
            grad_grid = torch.ops.aten.avg_pool2d_backward(pooled, _grid(flat, x.shape, channels_last), ctx.kernel,
                                                           ctx.kernel, (0, 0), False, True, None)
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
            grad_y, _ = _flat_layout(grad_grid.contiguous(memory_format=memory_format))
            dot = sum((grad_y[part] * flat[part]).sum(0) for part in chunks)
            correction = (inverse.pow(3) * dot).masked_fill_(~live, 0.0)
            grad_flat = grad_y.mul_(inverse).addcmul_(flat, correction, value=-1.0)
        return _grid(grad_flat.to(x.dtype), x.shape, channels_last), None


def _windows(height: int, width: int, window: int) -> tuple[int, int]:
    return min(window, height), min(window, width)


def window_pool(x: Tensor, window: int) -> Tensor:
    """``[B, C, H, W]`` → average over ``window × window`` cells (stride = window, no padding) → ``[B, C·h·w]``.

    The window is clipped to the map, so a map smaller than ``window`` is pooled globally.
    """
    if x.dim() != 4:
        raise ValueError(f"window pooling needs a [B, C, H, W] map, got shape {tuple(x.shape)}")
    kernel = _windows(x.shape[2], x.shape[3], window)
    return einops.rearrange(F.avg_pool2d(x, kernel, stride=kernel), "b c h w -> b (c h w)")


class StageFeatures(nn.Module):
    """Optional batch-dimension L2 normalisation, then a global pool (``window=None``) or a window pool.

    Has no parameters or buffers, so adding it to a pair changes no checkpoint key.
    """

    def __init__(self, batch_norm: bool = False, window: int | None = None) -> None:
        super().__init__()
        if window is not None and window < 1:
            raise ValueError(f"window must be a positive integer or None, got {window}")
        self.batch_norm = batch_norm
        self.window = window

    def forward(self, x: Tensor) -> Tensor:
        if self.batch_norm and x.dim() == 4:
            return _BatchNormalisedPool.apply(x, self.window)
        if self.batch_norm:
            x = batch_normalise(x)
        if self.window is None or x.dim() == 2:
            return pool_flatten(x)
        return window_pool(x, self.window)

    def out_dim(self, shape: tuple[int, ...]) -> int:
        """Size of the vector produced from one sample of per-sample ``shape`` (no batch dimension)."""
        if len(shape) == 1:
            return int(shape[0])
        if len(shape) == 2:  # [N, C] tokens
            if self.window is not None:
                raise ValueError(f"window pooling needs a [C, H, W] map, got per-sample shape {tuple(shape)}")
            return int(shape[1])
        channels, height, width = shape
        if self.window is None:
            return int(channels)
        kh, kw = _windows(height, width, self.window)
        return int(channels * (height // kh) * (width // kw))

    def extra_repr(self) -> str:
        return f"batch_norm={self.batch_norm}, window={self.window}"
