"""The run directory: checkpoints, resolved config, TensorBoard events, metrics.

A run never silently overwrites an earlier one: starting a run whose directory
already holds a checkpoint needs ``--resume`` (continue it) or ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transfer.errors import CKTFError


@dataclass(frozen=True)
class RunDir:
    """Paths of one run's files."""

    path: Path

    @property
    def last(self) -> Path:
        return self.path / "last.safetensors"

    @property
    def best(self) -> Path:
        return self.path / "best.safetensors"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"


def prepare_run_dir(root: str, name: str, *, resume: bool, overwrite: bool) -> RunDir:
    """Create or reopen ``root/name`` according to ``resume``/``overwrite``."""
    if resume and overwrite:
        raise CKTFError("--resume and --overwrite exclude each other")
    run = RunDir(Path(root) / name)
    if resume:
        if not run.last.is_file():
            raise CKTFError(f"nothing to resume in {run.path} (no last.safetensors); drop --resume to start a new run")
        return run
    if run.path.exists() and any(run.path.iterdir()):
        if not overwrite:
            raise CKTFError(f"run directory {run.path} already exists; pass --resume to continue it, --overwrite "
                            "to replace it, or choose another --log.name")
        shutil.rmtree(run.path)
    run.path.mkdir(parents=True, exist_ok=True)
    return run


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
