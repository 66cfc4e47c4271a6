"""CKTF's projection ``g(·)``: pool a tapped feature map to a vector, project it, put it on the unit sphere.

CKTF eq. 2 pools each module's output ``[B, C, H, W]`` to ``[B, C]`` (global average pooling) before a
small head maps it to the d-dimensional space where the NCE objectives compare student and teacher
(CRD's ``Embed``). Normalisation here is per sample (over features) only. The published code instead
normalised stage maps across the batch dimension (``dim=0``) and pooled some families on an 8x8 grid;
that recipe is available as ``loss.nce.stage_norm batch`` / ``loss.nce.stage_pool reference``
(:mod:`transfer.losses.stage_features`), which hands the heads already-pooled vectors.

Example::

    head = ProjectionHead(in_dim=512, out_dim=128)       # or kind="mlp"
    g = head(stage4_features)                            # [B, 128], unit norm
"""

from __future__ import annotations

from typing import Literal

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfer.errors import CKTFError

_EMBED_RANGE = (16, 1024)


class _SpatialMean(torch.autograd.Function):
    """``[B, C, H, W]`` → mean over H, W, whose gradient is the ``[B, C]`` one broadcast (a stride-0 view).

    Autograd's mean writes a map-sized gradient (67 MB for a 64×64×64 stem at batch 64), only for it to be added
    to the gradient the network's next layer sends the same map; the autograd engine adds a broadcast view into
    that one in place.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.shape = x.shape
        return x.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        b, c, h, w = ctx.shape
        return (grad / (h * w))[:, :, None, None].expand(b, c, h, w)


def pool_flatten(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` → mean over H, W; ``[B, N, C]`` tokens → mean over N; ``[B, C]`` unchanged.

    Never normalises or averages across the batch dimension (see the module docstring).
    """
    if x.dim() == 4:
        return _SpatialMean.apply(x)
    if x.dim() == 3:
        return einops.reduce(x, "b n c -> b c", "mean")
    if x.dim() == 2:
        return x
    raise CKTFError(f"cannot pool a feature of shape {tuple(x.shape)}: expected [B, C, H, W], [B, N, C] or [B, C] "
                    "(check the taps options)")


class ProjectionHead(nn.Module):
    """``normalise(W · pool(x))`` (``kind="linear"``, CRD), the same after a non-affine BatchNorm of the pooled
    input (``kind="bn_linear"``) or a 2-layer MLP (``kind="mlp"``).

    The MLP is ``Linear(in, h) → ReLU → Linear(h, out)`` with ``h = max(in_dim, out_dim)``: as wide as
    the wider end, so the hidden layer is never a bottleneck narrower than both. The output is fp32
    (normalising a half-precision vector loses the ``eps`` guard) and unit norm per sample.
    """

    def __init__(self, in_dim: int, out_dim: int = 128,
                 kind: Literal["linear", "bn_linear", "mlp"] = "linear") -> None:
        super().__init__()
        lo, hi = _EMBED_RANGE
        if not lo <= out_dim <= hi:
            raise CKTFError(f"loss.nce.embed_dim must be between {lo} and {hi}; got {out_dim}")
        if in_dim < 1:
            raise CKTFError(f"projection input size must be positive; got {in_dim} (feature channels)")
        if kind == "linear":
            self.net: nn.Module = nn.Linear(in_dim, out_dim)
        elif kind == "bn_linear":
            # Pooled post-ReLU features all lie in one narrow cone; centring and scaling them first keeps the
            # instance-specific part from being swamped by the shared mean direction.
            self.net = nn.Sequential(nn.BatchNorm1d(in_dim, affine=False), nn.Linear(in_dim, out_dim))
        elif kind == "mlp":
            hidden = max(in_dim, out_dim)
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
        else:
            raise CKTFError(f"loss.nce.projection must be 'linear', 'bn_linear' or 'mlp'; got {kind!r}")
        self.in_dim, self.out_dim, self.kind = in_dim, out_dim, kind

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(pool_flatten(x)).float(), dim=1)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
