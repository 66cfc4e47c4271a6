"""Fake CUDA: run code on ``device="cuda"`` tensors on a machine without a GPU.

torch's CUDA build creates CUDA tensors under :class:`~torch._subclasses.fake_tensor.FakeTensorMode` without a
device: a fake tensor has a shape, a dtype and a device but no data, and every operator checks its devices as
on a GPU, so a tensor left on the CPU next to a CUDA one raises (``FakeTensorDeviceMismatchError``). Only a
CPU scalar (a 0-dim tensor, which CUDA kernels also accept) passes, and ``torch.stack`` of 0-dim tensors does
not check: where a stack of scalars matters, the tests assert the devices themselves.

What fake tensors cannot do:

- hold values: a host read (``.item()``, ``.tolist()``, ``int(t)``, ``bool(t)``) returns a placeholder here
  (``FakeCuda(placeholder=0)``: 0, 0.0, False); an op whose output size depends on the values (``nonzero``,
  ``torch.unique``, boolean-mask indexing) gets a symbolic size. Both are what stalls a GPU until its queue
  has run, and both are counted in :attr:`FakeCuda.host_syncs`;
- run a backward pass through the custom autograd functions of the NCE loss;
- move modules whose parameters were created inside the mode (torch swaps such parameters and refuses):
  networks are built for real on the CPU and moved with the production code's ``.to("cuda")`` inside the
  mode (:func:`to_cuda`), the way every stage moves them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

CUDA = torch.device("cuda")


class FakeCuda(FakeTensorMode):
    """A fake-tensor mode that accepts the real CPU tensors of modules built outside it and answers host reads
    with ``placeholder`` (as the dtype's type), counting them."""

    def __init__(self, placeholder: int = 0) -> None:
        super().__init__(allow_non_fake_inputs=True, shape_env=ShapeEnv())
        self.placeholder = placeholder
        self.host_syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _sized_by_values(func, args):
            self.host_syncs += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_syncs += 1
            dtype = args[0].dtype
            if dtype == torch.bool:
                return bool(self.placeholder)
            return float(self.placeholder) if dtype.is_floating_point else int(self.placeholder)
        return super().__torch_dispatch__(func, types, args, kwargs)


def _sized_by_values(func, args) -> bool:
    """Whether ``func``'s output size depends on its input's values (nonzero, unique, boolean masks); indexing
    with integer tensors carries the tag too but needs no sync."""
    if torch.Tag.dynamic_output_shape not in func.tags:
        return False
    if func is torch.ops.aten.index.Tensor:
        return any(index is not None and index.dtype == torch.bool for index in args[1])
    return True


def to_cuda(module: nn.Module) -> nn.Module:
    """``module.to("cuda")`` (call inside :class:`FakeCuda`): its real tensors become fake CUDA ones."""
    return module.to(CUDA)


def on_cuda(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cuda"
