"""Rebuilding networks from cktf checkpoints.

A checkpoint's metadata records which model it holds (name, input channels, classes, tap spec) and, when
known, the input size and normalisation it expects, so the transfer stage rebuilds the teacher from its
file alone — never by parsing the file name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from transfer.engine.checkpoint import load_checkpoint, read_metadata
from transfer.errors import CKTFError
from transfer.models import build_model
from transfer.models.input_spec import InputSpec


@dataclass
class LoadedNetwork:
    """A network rebuilt from a checkpoint, with what the checkpoint says about it."""

    model: nn.Module
    name: str
    in_channels: int
    num_classes: int
    taps: dict
    metadata: dict
    input: InputSpec = field(default_factory=InputSpec)


def load_network(path: str | Path, *, prefix: str, kinds: tuple[str, ...], option: str) -> LoadedNetwork:
    """Build the model recorded in checkpoint ``path`` and load its weights (state keys under ``prefix``).

    ``kinds`` lists the checkpoint kinds accepted (e.g. ``("teacher",)``); ``option`` names the CLI option
    in error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise CKTFError(f"{option} {path} does not exist")
    meta = read_metadata(path)
    kind = meta.get("kind", "?")
    if kind not in kinds:
        raise CKTFError(f"{option} {path} is a '{kind}' checkpoint; expected {' or '.join(kinds)}")
    try:
        name, in_channels, num_classes = meta["model"], int(meta["in_channels"]), int(meta["num_classes"])
    except (KeyError, ValueError):
        raise CKTFError(f"{option} {path} lacks the model description (model, in_channels, num_classes)") from None
    taps = json.loads(meta.get("taps", "{}"))
    try:
        expects = InputSpec.from_metadata(meta)
    except ValueError as err:
        raise CKTFError(f"{option} {path}: {err}") from None
    model = build_model(name, in_channels=in_channels, num_classes=num_classes)
    state = load_checkpoint(path).state["task"]
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CKTFError(f"{option} {path}: weights do not fit model '{name}' ({str(err).splitlines()[0]})") from None
    return LoadedNetwork(model, name, in_channels, num_classes, taps, meta, expects)

