"""Checkpoints as single ``.safetensors`` files, written atomically.

A training state is a nested structure (model and optimizer state dicts, RNG
states, counters). We store every tensor in the safetensors payload and the
structure around them as a JSON *skeleton* in the file's metadata, so loading
never unpickles anything and a checkpoint can be inspected with any safetensors
reader. Files are written to a temporary name in the same directory, fsynced and
renamed, so a crash mid-write leaves the previous checkpoint intact.

Example::

    save_checkpoint("runs/x/last.safetensors", {"model": model.state_dict(), "epoch": 3},
                    {"kind": "teacher"})
    ckpt = load_checkpoint("runs/x/last.safetensors")
    model.load_state_dict(ckpt.state["model"])
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from transfer.engine.atomic import atomic_path
from transfer.errors import CKTFError

FORMAT = "cktf-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint: the nested ``state`` and the string ``metadata`` (kind, config, …)."""

    path: Path
    state: dict[str, Any]
    metadata: dict[str, Any]


def _encode(obj: Any, tensors: dict[str, torch.Tensor], seen: dict[int, str]) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        key = f"t{len(tensors)}"
        # safetensors refuses aliased or strided storage: give each entry its own contiguous copy if needed.
        ptr = t.untyped_storage().data_ptr() if t.numel() else -len(tensors) - 1
        if ptr in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        seen[ptr] = key
        tensors[key] = t.cpu()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode_key(k), _encode(v, tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, seen) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, seen) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _encode_key(key: Any) -> Any:
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    raise TypeError(f"cannot store a dict key of type {type(key).__name__} in a checkpoint")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def save_checkpoint(path: str | Path, state: dict[str, Any], metadata: dict[str, Any] | None = None) -> Path:
    """Write ``state`` (nested dicts/lists/tuples of tensors and scalars) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors, {})
    meta = {"format": FORMAT, "version": str(VERSION), "skeleton": json.dumps(skeleton)}
    for key, value in (metadata or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return save_safetensors_atomic(path, tensors, meta)


def save_safetensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically (temporary file in the same directory, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a cktf checkpoint without loading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise CKTFError(f"checkpoint {path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CKTFError(f"{path} is not a cktf checkpoint (expected a .safetensors file written by cktf: "
                        f"{str(err).splitlines()[0]})") from None
    if meta.get("format") != FORMAT:
        raise CKTFError(f"{path} is a safetensors file but not a cktf checkpoint (no '{FORMAT}' metadata)")
    return meta


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`; bad files raise a one-line :class:`CKTFError`."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path), device=str(map_location))
        state = _decode(json.loads(meta["skeleton"]), tensors)
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise CKTFError(f"checkpoint {path} is damaged ({str(err).splitlines()[0]})") from None
    metadata = {k: v for k, v in meta.items() if k not in ("skeleton",)}
    return Checkpoint(path=path, state=state, metadata=metadata)
