"""Projection heads: per-sample pooling (never across the batch), unit-norm output, options."""

from __future__ import annotations

import pytest
import torch

from transfer.errors import CKTFError
from transfer.losses import ProjectionHead, pool_flatten


def test_pool_flatten_shapes_and_values():
    x = torch.randn(3, 5, 4, 6)
    torch.testing.assert_close(pool_flatten(x), x.mean(dim=(2, 3)))
    tokens = torch.randn(3, 7, 5)
    torch.testing.assert_close(pool_flatten(tokens), tokens.mean(dim=1))
    v = torch.randn(3, 5)
    assert pool_flatten(v) is v
    with pytest.raises(CKTFError, match=r"\[B, C, H, W\]"):
        pool_flatten(torch.randn(2, 3, 4, 5, 6))


def test_pooling_does_not_mix_samples():
    x = torch.randn(4, 3, 2, 2)
    y = x.clone()
    y[1:] *= 100.0
    torch.testing.assert_close(pool_flatten(y)[0], pool_flatten(x)[0])


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_head_output_is_unit_norm_per_sample(kind):
    head = ProjectionHead(32, 16, kind)
    out = head(torch.randn(5, 32, 3, 3))
    assert out.shape == (5, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))


def test_linear_and_mlp_structure():
    linear = ProjectionHead(64, 128)
    assert isinstance(linear.net, torch.nn.Linear) and linear.net.weight.shape == (128, 64)
    mlp = ProjectionHead(64, 128, "mlp")
    layers = list(mlp.net)
    assert [type(m) for m in layers] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert layers[0].weight.shape == (128, 64) and layers[2].weight.shape == (128, 128)  # hidden = max(64, 128)
    assert ProjectionHead(512, 128, "mlp").net[0].weight.shape == (512, 512)


def test_linear_head_equals_manual_projection():
    head = ProjectionHead(8, 16)
    x = torch.randn(2, 8, 4, 4)
    z = x.mean(dim=(2, 3)) @ head.net.weight.T + head.net.bias
    torch.testing.assert_close(head(x), z / z.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("out_dim", [8, 2048])
def test_embed_dim_out_of_range(out_dim):
    with pytest.raises(CKTFError, match=f"loss.nce.embed_dim must be between 16 and 1024; got {out_dim}"):
        ProjectionHead(32, out_dim)


def test_unknown_kind():
    with pytest.raises(CKTFError, match="loss.nce.projection"):
        ProjectionHead(32, 16, "conv")  # type: ignore[arg-type]


def test_bn_linear_head_centres_its_input_before_projecting():
    torch.manual_seed(0)
    head = ProjectionHead(16, 32, kind="bn_linear")
    assert not any(isinstance(m, torch.nn.BatchNorm1d) and m.affine for m in head.modules())
    x = torch.rand(64, 16, 3, 3) + 5.0  # all-positive pooled features in one narrow cone
    out = head(x)
    assert out.shape == (64, 32) and torch.allclose(out.norm(dim=1), torch.ones(64), atol=1e-5)
    linear = ProjectionHead(16, 32, kind="linear")
    cos = lambda g: (g @ g.T)[~torch.eye(64, dtype=torch.bool)].mean()  # noqa: E731
    assert cos(out.detach()) < 0.2 < cos(linear(x).detach())
