"""The fused batch-normalise-and-pool of ``loss.nce.stage_norm batch`` computes what autograd through
``F.normalize(x, dim=0)`` followed by the pool computes (forward and gradient), in every memory layout."""

import einops
import pytest
import torch
import torch.nn.functional as F

from transfer.losses.stage_features import StageFeatures


def normalise_then_pool(x: torch.Tensor, window: int | None) -> torch.Tensor:
    """The unfused computation, written with torch's own normalize and pooling (autograd differentiates it)."""
    y = F.normalize(x, p=2, dim=0)
    if window is None:
        return y.mean(dim=(2, 3))
    kernel = (min(window, x.shape[2]), min(window, x.shape[3]))
    return einops.rearrange(F.avg_pool2d(y, kernel, stride=kernel), "b c h w -> b (c h w)")


LAYOUTS = [torch.contiguous_format, torch.channels_last]
CASES = [((5, 3, 28, 28), 8), ((5, 3, 7, 7), 8), ((5, 4, 16, 16), 8), ((5, 4, 6, 6), None), ((3, 2, 5, 9), None)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape,window", CASES)
def test_forward_and_gradient_equal_autograd_through_normalize(shape, window, layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, generator=g)
    x[:, 0, 0, 0] = 0.0  # a clamped norm: F.normalize divides by eps there
    x = x.contiguous(memory_format=layout).requires_grad_()
    reduce = StageFeatures(batch_norm=True, window=window)
    expected = normalise_then_pool(x, window)
    got = reduce(x)
    upstream = torch.randn(expected.shape, dtype=torch.float64, generator=g)
    (want_grad,) = torch.autograd.grad(expected, x, upstream)
    (got_grad,) = torch.autograd.grad(got, x, upstream)
    assert got.shape == expected.shape == (shape[0], reduce.out_dim(shape[1:]))
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14)
    assert torch.allclose(got_grad, want_grad, rtol=1e-12, atol=1e-14 * want_grad.abs().max().item())
    assert got_grad.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("window", [None, 4])
def test_gradcheck(window):
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reduce = StageFeatures(batch_norm=True, window=window)
    assert torch.autograd.gradcheck(reduce, (x.requires_grad_(),))


def test_half_precision_maps_are_reduced_in_fp32_and_get_their_own_dtype_back():
    x = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    half = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = StageFeatures(batch_norm=True)(half)
    assert out.dtype == torch.float32
    assert torch.allclose(out, normalise_then_pool(half.detach().float(), None), atol=1e-6)
    out.sum().backward()
    assert half.grad.dtype == torch.bfloat16 and half.grad.is_contiguous(memory_format=torch.channels_last)


def test_a_map_in_neither_layout_is_reduced_too():
    x = torch.randn(4, 6, 8, 8, dtype=torch.float64).transpose(2, 3).requires_grad_()  # strided, no standard layout
    got = StageFeatures(batch_norm=True, window=4)(x)
    assert torch.allclose(got, normalise_then_pool(x, 4), rtol=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), x)
    (want,) = torch.autograd.grad(normalise_then_pool(x, 4).sum(), x)
    assert torch.allclose(grad, want, rtol=1e-12, atol=1e-14)


def test_the_global_pool_sends_a_broadcast_gradient_that_adds_up_with_the_networks_own():
    from transfer.losses.projection import pool_flatten

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64, generator=g).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    conv = torch.nn.Conv2d(3, 2, 3, padding=1).double()
    upstream = torch.randn(4, 3, dtype=torch.float64, generator=g)
    # the map feeds both the next layer and the pool, as a tapped stage does
    total = conv(x).square().sum() + (pool_flatten(x) * upstream).sum()
    want = conv(x).square().sum() + (x.mean(dim=(2, 3)) * upstream).sum()
    (got_grad,) = torch.autograd.grad(total, x)
    (want_grad,) = torch.autograd.grad(want, x)
    assert torch.allclose(got_grad, want_grad, rtol=1e-12, atol=1e-15)
    (alone,) = torch.autograd.grad((pool_flatten(x) * upstream).sum(), x)
    assert alone.stride()[2:] == (0, 0)  # a view, nothing map-sized written
    assert torch.equal(alone, (upstream / 30)[:, :, None, None].expand(4, 3, 5, 6))
    assert torch.autograd.gradcheck(pool_flatten, (x.detach().requires_grad_(),))
