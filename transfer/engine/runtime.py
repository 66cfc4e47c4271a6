"""Device, precision, threads and seeding: the process-level knobs of a run."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from transfer.errors import CKTFError

log = logging.getLogger("cktf")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CKTFError(f"train.device is '{name}' but CUDA is not available on this machine; use cpu or auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CKTFError(f"train.device is '{name}' but only {torch.cuda.device_count()} CUDA device(s) exist")
        return device
    return torch.device(name)


@functools.cache
def check_precision(device: torch.device, precision: str) -> None:
    """Refuse a ``train.precision`` the device cannot run, before a stage touches its run directory.

    Cached: :func:`autocast` runs it on every training step, and the bf16 query reaches the CUDA driver.

    fp16 is CUDA-only by design: its gradient scaler guards fp16's narrow range, and on CPU bf16 is both the
    natively supported half type and safe without a scaler.
    """
    if precision == "fp16" and device.type != "cuda":
        raise CKTFError("train.precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CKTFError(f"train.precision bf16 is not supported by {torch.cuda.get_device_name(device)}; "
                        "use fp16 or fp32")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for the networks; ``fp32`` is a no-op. Losses that need fp32 disable it locally."""
    if precision == "fp32":
        return contextlib.nullcontext()
    check_precision(device, precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


CUBLAS_WORKSPACE = ":4096:8"


def use_deterministic_kernels(enabled: bool) -> None:
    """Switch torch to deterministic kernels (``train.deterministic``), or back to torch's defaults.

    On CUDA, cuDNN's autotuner and several kernels (atomics in scatter/index-add backward, split-K GEMMs) can
    differ from run to run in the last bits, so an interrupted-and-resumed run or a rerun is bit-identical only
    with this on. ``warn_only``: an op without a deterministic CUDA kernel warns instead of stopping the run
    (it may still differ). cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when it creates its handle, so it is set
    here, before the first matrix product, unless the user set it.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled, warn_only=True)


def set_threads(threads: int) -> None:
    """Respect ``train.threads`` (0 keeps torch's default of one thread per core)."""
    if threads > 0:
        torch.set_num_threads(threads)


def derive_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed from ``seed`` and extra keys (e.g. the epoch)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG state as tensors (checkpointable without pickling)."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": torch.tensor(mt, dtype=torch.int64),
        "python_version": version,
        "python_gauss": gauss,
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_gauss": [int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()),
                     state["python_gauss"]))
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        _set_cuda_rng_states(list(state["cuda"]))


def _set_cuda_rng_states(states: list[torch.Tensor]) -> None:
    """Restore the saved state of every CUDA device that exists here.

    A process saves one state per device it could see; resumed on a machine (or a ``CUDA_VISIBLE_DEVICES``)
    with fewer devices, the extra states have no device to go to, and torch's ``set_rng_state_all`` would
    raise an IndexError for them.
    """
    present = torch.cuda.device_count()
    for index, cuda_state in enumerate(states[:present]):
        torch.cuda.set_rng_state(cuda_state, index)
    if len(states) > present:
        _warn_fewer_devices(len(states), present)


@functools.cache
def _warn_fewer_devices(saved: int, present: int) -> None:
    log.warning(f"the checkpoint holds the CUDA RNG states of {saved} devices but this process sees {present}: "
                f"restored those of the first {present}; random draws may differ from an uninterrupted run")


def iter_chunks(n: int, size: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in pieces of at most ``size``."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
