"""Reading pretrained weights made elsewhere and checking that they fit a network cktf builds.

Weights come as a PyTorch state dict (``.pth``/``.pt``) or a ``.safetensors`` file. A ``.pth`` file is a
pickle, and unpickling can run arbitrary code, so it is read with ``torch.load(weights_only=True)`` only:
a file holding anything but tensors and plain containers is refused before any of it runs. Training
scripts often wrap the state dict (``{"state_dict": ...}``, ``{"model": ...}``) and DDP prefixes every
key with ``module.``; both are undone here, so a user never has to rewrite a file by hand.

Errors are :class:`WeightsError` (a ``ValueError``) about the file; the caller names the option.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "teacher")
PREFIXES = ("module.", "model.", "_orig_mod.")
SHOWN = 3  # mismatches listed per kind before "… (+N more)"


class WeightsError(ValueError):
    """A weights file that cannot be read, or whose tensors do not fit the network."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or a ``torch.save``'d state dict, unwrapped and unprefixed.

    Args:
        path: the weights file; ``.safetensors`` is read as such, anything else with
            ``torch.load(weights_only=True)``.

    Returns:
        ``{parameter or buffer name: tensor}`` on the CPU.

    Raises:
        WeightsError: the file is missing, damaged, holds pickled objects other than tensors and plain
            containers, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return strip_prefixes(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"{path} is not a readable safetensors file ({_first_line(err)})") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"(?i)unsupported global:? (?:GLOBAL )?(\S+)", str(err))
        what = f"a pickled {found.group(1).rstrip('.,')}" if found else "pickled objects"
        raise WeightsError(f"{path} holds {what}, not only tensors: refused without running it (.pth files are "
                           "read with torch.load(weights_only=True); save a plain state dict or .safetensors)"
                           ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise WeightsError(f"{path} is not a PyTorch state dict or .safetensors file ({_first_line(err)})") from None
    return strip_prefixes(unwrap(loaded, str(path)))


def unwrap(loaded: object, where: str = "the file") -> dict[str, torch.Tensor]:
    """The state dict inside ``loaded``: itself, or under one of :data:`WRAPPER_KEYS` (recursively).

    Non-tensor entries next to the tensors (an ``epoch`` counter, say) are dropped.
    """
    while isinstance(loaded, Mapping):
        tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        inner = next((loaded[k] for k in WRAPPER_KEYS if isinstance(loaded.get(k), Mapping)), None)
        if inner is None:
            break
        loaded = inner
    raise WeightsError(f"{where} holds no state dict (tensors by parameter name, possibly under "
                       f"{', '.join(repr(k) for k in WRAPPER_KEYS)})")


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a prefix all keys share (``module.`` from DDP, ``model.``, ``_orig_mod.`` from torch.compile)."""
    changed = True
    while changed and state:
        changed = False
        for prefix in PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix):]: value for key, value in state.items()}
                changed = True
    return state


def check_fits(model: nn.Module, state: Mapping[str, torch.Tensor], optional: Callable[[str], bool] | None = None
               ) -> None:
    """Raise :class:`WeightsError` listing the first missing, unexpected and mis-shaped keys, if any.

    ``optional(key)`` marks model keys the file may lack (default: BatchNorm's ``num_batches_tracked``
    counters, which older checkpoints do not have and which do not change an eval-mode forward).
    """
    optional = optional or (lambda key: key.endswith("num_batches_tracked"))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = [f"{label} {_first(items)}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("shape (file vs network)", shapes)) if items]
    if problems:
        raise WeightsError("; ".join(problems))


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Check ``state`` with :func:`check_fits`, then copy it into ``model`` (cast to the model's dtypes)."""
    check_fits(model, state)
    model.load_state_dict(state, strict=False)
    return model


def infer_size(build: Callable[[int], nn.Module], state: Mapping[str, torch.Tensor]) -> int | None:
    """The value of a size argument of ``build`` (e.g. the number of classes) that ``state`` was saved with.

    Two weightless (meta-device) builds with different sizes show which tensor dimensions follow the
    argument; the file's extent along them is the answer. ``None`` when no such key is in the file, the
    builds fail, or the keys disagree.
    """
    probes = (5, 7)
    try:
        with torch.device("meta"):
            shapes = [{k: tuple(v.shape) for k, v in build(n).state_dict().items()} for n in probes]
    except Exception:  # noqa: BLE001 - a builder refusing a probe size (e.g. 3 channels only) means "unknown"
        return None
    found = set()
    for key, a in shapes[0].items():
        b = shapes[1].get(key)
        if b is None or a == b or key not in state or len(a) != len(b) or state[key].dim() != len(a):
            continue
        for dim, (x, y) in enumerate(zip(a, b, strict=True)):
            if (x, y) == probes:
                found.add(int(state[key].shape[dim]))
    return found.pop() if len(found) == 1 else None


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else "")


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:200] + "…") if len(text) > 200 else (text or type(err).__name__)
