"""Model-side performance flags: the ``channels_last`` memory format and ``torch.compile``.

Both change how a network runs, never what it computes (up to float rounding), so checkpoints stay
interchangeable: converted weights are only strided differently (the checkpoint writer stores contiguous
copies, and ``load_state_dict`` copies values into whatever layout the receiving model has), and
``nn.Module.compile`` compiles a module's forward in place, so its ``state_dict`` keys keep their names
(no ``_orig_mod.`` prefix as with the ``torch.compile(module)`` wrapper).
"""

from __future__ import annotations

import torch
from torch import nn

from transfer.config import TrainConfig
from transfer.engine.runtime import check_precision, use_deterministic_kernels
from transfer.errors import CKTFError


def use_channels_last(module: nn.Module) -> nn.Module:
    """Store every 4-D weight and buffer of ``module`` channels-last (NHWC), in place.

    Convolutions whose weights are channels-last run in that layout and hand it on to the next layer, so the
    whole network runs NHWC from the first convolution on, whatever layout the input batch has. On CPU
    (oneDNN) and on GPU tensor cores those kernels are the faster ones; 2-D tensors (linear layers, memory
    banks) are untouched.
    """
    return module.to(memory_format=torch.channels_last)


def prepare_network(module: nn.Module, device: torch.device, *, channels_last: bool) -> nn.Module:
    """Move ``module`` to ``device`` and apply ``train.channels_last``: one place, so that every network a
    stage runs (trained, frozen teacher, probed backbone) gets the same treatment."""
    module = module.to(device)
    return use_channels_last(module) if channels_last else module


def check_compile_available(device: torch.device) -> None:
    """Fail now, in one line, if ``torch.compile`` cannot build kernels for ``device``.

    Otherwise the failure would surface at the first training step, deep inside a compiler traceback.
    """
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise CKTFError("train.compile needs torch.compile, which this Python/torch build does not support; "
                        "set --train.compile false")
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise CKTFError("train.compile on CUDA needs triton (pip install triton); set --train.compile false")
        return
    if device.type != "cpu":
        raise CKTFError(f"train.compile is not supported on device {device}; set --train.compile false")
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:
        raise CKTFError("train.compile on CPU needs a C++ compiler (g++, or the one named by $CXX) for "
                        "torch.compile; install one or set --train.compile false") from None


def check_runtime(device: torch.device, train: TrainConfig) -> None:
    """Check ``train.precision`` and ``train.compile`` against ``device`` before a stage touches its run
    directory, so a setting the machine cannot run fails in one line and leaves nothing half-written; then
    apply ``train.deterministic`` (before the stage's first CUDA work)."""
    check_precision(device, train.precision)
    if train.compile:
        check_compile_available(device)
    use_deterministic_kernels(train.deterministic)


def compile_module(module: nn.Module, device: torch.device) -> nn.Module:
    """Compile ``module``'s forward in place (``nn.Module.compile``), after checking that it can be done.

    Compilation itself happens lazily, on the first call in each mode (train, eval, no-grad).
    """
    check_compile_available(device)
    module.compile()
    return module


def match_state_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give per-parameter optimizer state (momentum buffers, …) its parameter's memory layout again.

    Checkpoints store contiguous tensors, so after a resume a channels-last parameter would be updated from
    an NCHW momentum buffer: same values, but elementwise kernels may take a different (non-vectorised) path
    for mixed layouts and round differently, and the resumed run would no longer match an uninterrupted one
    bit for bit.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if (isinstance(value, torch.Tensor) and value.shape == param.shape
                        and value.stride() != param.stride()):
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
