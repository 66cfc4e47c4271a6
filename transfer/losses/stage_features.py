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
import torch.nn.functional as F
from torch import Tensor, nn

from transfer.losses.projection import pool_flatten


def batch_normalise(x: Tensor) -> Tensor:
    """Divide every entry by its L2 norm over the batch dimension (``dim=0``), in fp32."""
    return F.normalize(x.float(), p=2, dim=0)


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
