"""The example configs that come with cktf, usable by name from anywhere.

In a checkout they are the top-level ``configs/`` folder; an installed cktf carries the same files as package
data (``transfer/configs/``). ``--config image_folder/cktf.yaml`` names one of them whenever no such file exists
relative to the current directory, and ``cktf configs`` lists them or copies a folder of them to edit.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from transfer.errors import CKTFError

_CHECKOUT = Path(__file__).resolve().parents[2] / "configs"


def shipped_configs_dir() -> Path:
    """The folder of shipped configs: ``configs/`` of the checkout this package runs from, else the installed copy."""
    if _CHECKOUT.is_dir():
        return _CHECKOUT
    return Path(str(resources.files("transfer") / "configs"))


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself when it exists (or is absolute), else the shipped config of that name when there is one."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    shipped = shipped_configs_dir() / given
    return shipped if shipped.exists() else given


def list_shipped() -> list[str]:
    """Every shipped config as ``folder/file.yaml``, sorted; shared parts (``_*.yaml``) included."""
    root = shipped_configs_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))


def copy_shipped(folder: str, dest: str | Path) -> list[Path]:
    """Copy the shipped config folder ``folder`` (e.g. ``image_folder``) into ``dest/folder``; returns the files.

    Nothing is overwritten: an existing file of the same name is refused before anything is copied.
    """
    root = shipped_configs_dir()
    source = root / folder
    if not source.is_dir() or source.resolve().parent != root.resolve():
        folders = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise CKTFError(f"no shipped config folder '{folder}'; expected one of {', '.join(folders)}")
    target = Path(dest) / folder
    files = sorted(p for p in source.iterdir() if p.is_file())
    clashes = [target / p.name for p in files if (target / p.name).exists()]
    if clashes:
        raise CKTFError(f"{clashes[0]} already exists; cktf configs never overwrites a file (copy to another "
                        "directory, or move that one away)")
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for file in files:
        shutil.copyfile(file, target / file.name)
        copied.append(target / file.name)
    return copied
