"""The run directory: checkpoints, resolved config, TensorBoard events, metrics — and the rule for deleting.

cktf deletes only what it provably wrote itself. A run directory is *ours* when it holds the marker file
``.cktf-run``, written when cktf creates (or first fills) the directory; only then may ``--overwrite`` or a
fresh start clear it, and only the files cktf writes there (checkpoints, config, metrics, TensorBoard
events, half-written temporaries, and nested runs such as ``probe/`` that carry their own marker). Every
other file stays. A non-empty directory without the marker is never touched. The current directory, its
ancestors and the home directory are refused as run directories outright.

States when a run starts:

* no directory, or an empty one: created and marked;
* ours without a checkpoint (interrupted before its first save): cleared and started fresh, with or without
  ``--resume`` — there is nothing to lose;
* ours with a checkpoint: needs ``--resume`` (continue) or ``--overwrite`` (clear and restart).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transfer import __version__
from transfer.engine.atomic import TMP_SUFFIX, write_text_atomic
from transfer.errors import CKTFError

MARKER = ".cktf-run"
OWN_FILES = ("last.safetensors", "best.safetensors", "config.yaml", "metrics.json", "resumes.jsonl")
OWN_PATTERNS = ("events.out.tfevents.*", f".*{TMP_SUFFIX}")

log = logging.getLogger("cktf")

__all__ = ["MARKER", "RunDir", "clear_own_files", "is_own_run", "last_opened_run", "prepare_run_dir", "run_path",
           "write_json", "write_text_atomic"]


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

    @property
    def resumes(self) -> Path:
        """One JSON line per ``--resume`` that changed the config (what changed, when)."""
        return self.path / "resumes.jsonl"


def run_path(root: str, name: str) -> Path:
    """``root/name`` for a run name that stays strictly inside ``root`` (``log.root``/``log.name``)."""
    parts = Path(name).parts
    if not name.strip() or Path(name).is_absolute() or any(p in (".", "..") for p in parts) or not parts:
        raise CKTFError(f"log.name {name!r} is not a run name; expected a plain relative name inside log.root "
                        "(e.g. fashion_cktf or exp1/cktf), without '.', '..' or a leading '/'")
    return Path(root) / name


def _protected(path: Path) -> str | None:
    """Why ``path`` may never be a run directory (None if it may)."""
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd:
        return "is the current directory"
    if resolved in cwd.parents:
        return "contains the current directory"
    if resolved == Path.home().resolve():
        return "is the home directory"
    return None


def is_own_run(path: Path) -> bool:
    """Whether ``path`` carries cktf's run marker."""
    return (path / MARKER).is_file()


def clear_own_files(path: Path) -> list[Path]:
    """Delete the files cktf writes in the run directory ``path`` (which must carry the marker); keep the rest.

    Nested runs that carry their own marker (``probe/``) are cleared the same way and removed if nothing else is
    left in them. Returns what was deleted.
    """
    if not is_own_run(path):
        raise ValueError(f"{path} is not a cktf run directory (no {MARKER})")
    removed: list[Path] = []
    candidates = [path / name for name in OWN_FILES]
    for pattern in OWN_PATTERNS:
        candidates += sorted(path.glob(pattern))
    for item in candidates:
        if item.is_file() and not item.is_symlink():
            item.unlink()
            removed.append(item)
    for child in sorted(path.iterdir()):
        if child.is_dir() and not child.is_symlink() and is_own_run(child):
            removed += clear_own_files(child)
            (child / MARKER).unlink()
            if not any(child.iterdir()):
                child.rmdir()
    return removed


def _mark(path: Path) -> None:
    write_text_atomic(path / MARKER, json.dumps({"cktf": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
                      + "\n")


_OPENED: list[Path] = []


def last_opened_run() -> RunDir | None:
    """The run directory this process opened last (what an interrupt left behind), if any."""
    return RunDir(_OPENED[-1]) if _OPENED else None


def prepare_run_dir(path: str | os.PathLike, *, resume: bool, overwrite: bool, option: str = "log.name") -> RunDir:
    """Create, reopen (``resume``) or clear (``overwrite``) the run directory ``path``.

    Args:
        path: the run directory.
        resume: continue the run from its ``last.safetensors``; a marked run without one starts fresh.
        overwrite: clear cktf's own files of an existing run first (never anything else).
        option: the config key(s) that named ``path``, for error messages.

    Returns:
        The :class:`RunDir`, existing and marked.
    """
    if resume and overwrite:
        raise CKTFError("--resume and --overwrite exclude each other")
    run = RunDir(Path(path))
    _OPENED[:] = [run.path]
    why = _protected(run.path)
    if why is not None:
        raise CKTFError(f"run directory {run.path} ({option}) {why}; cktf writes a run into a directory of its own")
    if run.path.exists() and not run.path.is_dir():
        raise CKTFError(f"run directory {run.path} ({option}) exists and is not a directory")
    if resume and run.last.is_file():
        return run
    if run.path.is_dir() and any(run.path.iterdir()):
        if not is_own_run(run.path):
            raise CKTFError(f"{run.path} ({option}) is not empty and is not a cktf run directory (no {MARKER} "
                            "marker); cktf never deletes what it did not write: choose another directory")
        if run.last.is_file() and not overwrite:
            raise CKTFError(f"run directory {run.path} already exists; pass --resume to continue it, --overwrite "
                            f"to replace it, or choose another {option}")
        if resume:
            log.info(f"nothing to resume in {run.path} (no checkpoint was written yet): starting it afresh")
        clear_own_files(run.path)
    elif resume:
        log.info(f"nothing to resume in {run.path}: starting a new run")
    try:
        run.path.mkdir(parents=True, exist_ok=True)
        if not is_own_run(run.path):
            _mark(run.path)
    except OSError as err:
        raise CKTFError(f"cannot create run directory {run.path} ({option}): {err.strerror or err}") from None
    return run


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
