"""``cktf import-teacher``: turn weights trained elsewhere into a cktf teacher checkpoint.

The checkpoint is what ``cktf train-teacher`` writes as far as every reader is concerned (kind ``teacher``,
the model description, the weights under ``task`` with the ``model.`` prefix), plus what the weights
expect of their inputs (:class:`~transfer.models.input_spec.InputSpec`), so ``cktf transfer`` feeds the
teacher images the way it was trained on them. Everything is checked before anything is written: the
weights fit the architecture, the taps resolve, and the network runs on one image of the declared size.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from transfer.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from transfer.engine.checkpoint import save_checkpoint
from transfer.errors import CKTFError
from transfer.models import FeatureTaps, TapSpec, build_model, tap_spec_for
from transfer.models.importer import WeightsError, infer_size, load_weights, read_state_dict
from transfer.models.input_spec import InputSpec
from transfer.models.registry import TORCHVISION_PREFIX, get_entry
from transfer.models.timm_models import TIMM_PREFIX, pretrained_input

TORCHVISION_INPUT = InputSpec(224, IMAGENET_MEAN, IMAGENET_STD)


@dataclass(frozen=True)
class ImportRequest:
    """What ``cktf import-teacher`` was asked to do; ``None`` fields are inferred or defaulted.

    Args:
        arch: model name as ``--arch`` gives it (registry name, ``torchvision.<arch>`` or ``timm.<name>``).
        weights: the weights file.
        out: the teacher checkpoint to write.
        num_classes: classes of the classifier (default: read off the weights).
        in_channels: input channels (default: read off the weights; 3 for torchvision models).
        image_size: side length the network expects (default: 224 for torchvision models, timm's
            ``pretrained_cfg`` for timm models, else unrecorded).
        mean: normalisation mean (default: ImageNet's for torchvision models, timm's ``pretrained_cfg`` for
            timm models, else unrecorded).
        std: normalisation std (like ``mean``).
        taps: tap node names, for architectures without default taps.
        overwrite: replace an existing ``out``.
    """

    arch: str
    weights: Path
    out: Path
    num_classes: int | None = None
    in_channels: int | None = None
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    taps: Mapping[str, Any] | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class ImportedTeacher:
    """The checkpoint written and what it describes."""

    path: Path
    arch: str
    in_channels: int
    num_classes: int
    input: InputSpec
    parameters: int


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.parent.is_dir():
        raise CKTFError(f"--out {out}: its folder {out.parent} does not exist or is not a directory; create it first")
    if out.is_dir():
        raise CKTFError(f"--out {out} is a directory; give the path of the .safetensors file to write")
    if out.exists() and not overwrite:
        raise CKTFError(f"--out {out} already exists; pass --overwrite to replace it")
    if out.suffix != ".safetensors":
        raise CKTFError(f"--out {out} must end in .safetensors (cktf checkpoints are safetensors files)")


def _default_input(arch: str, in_channels: int) -> InputSpec:
    """What the architecture's weights usually expect: ImageNet's settings for torchvision, timm's
    ``pretrained_cfg`` for timm (its mean/std only where they fit ``in_channels``), nothing otherwise."""
    if arch.startswith(TORCHVISION_PREFIX):
        return TORCHVISION_INPUT
    if not arch.startswith(TIMM_PREFIX):
        return InputSpec()
    with torch.device("meta"):
        stated = pretrained_input(build_model(arch, in_channels=in_channels, num_classes=5))
    if len(stated.get("mean", ())) != in_channels or len(stated.get("std", ())) != in_channels:
        stated.pop("mean", None)
        stated.pop("std", None)
    return InputSpec(**stated)


def _input_spec(request: ImportRequest, in_channels: int) -> InputSpec:
    default = _default_input(request.arch, in_channels)
    try:
        return replace(default, **{key: value for key in ("image_size", "mean", "std")
                                   if (value := getattr(request, key)) is not None})
    except ValueError as err:
        raise CKTFError(f"--image-size/--mean/--std: {err}") from None


def import_teacher(request: ImportRequest) -> ImportedTeacher:
    """Check ``request.weights`` against ``request.arch`` and write the teacher checkpoint ``request.out``."""
    out, weights = Path(request.out), Path(request.weights)
    get_entry(request.arch, option="--arch")
    _check_out(out, request.overwrite)
    try:
        state = read_state_dict(weights)
    except WeightsError as err:
        raise CKTFError(f"--weights {err}") from None

    in_channels = request.in_channels or infer_size(partial(_build_channels, request.arch), state) or 3
    spec_in = _input_spec(request, in_channels)
    if spec_in.mean is not None and len(spec_in.mean) != in_channels:
        raise CKTFError(f"--mean/--std give {len(spec_in.mean)} values but {request.arch} takes {in_channels}-channel "
                        "images")
    num_classes = request.num_classes or infer_size(
        partial(_build, request.arch, in_channels), state) or 1000
    model = build_model(request.arch, in_channels=in_channels, num_classes=num_classes)
    try:
        load_weights(model, state)
    except WeightsError as err:
        raise CKTFError(f"--weights {weights} does not fit {request.arch} ({in_channels} channels, {num_classes} "
                        f"classes): {err}") from None

    spec = TapSpec.from_dict(request.taps, option="--taps") if request.taps else tap_spec_for(request.arch, model)
    _check_runs(model.eval(), spec, in_channels, spec_in.image_size or 64, request.arch)
    metadata = {
        "kind": "teacher",
        "model": request.arch,
        "in_channels": str(in_channels),
        "num_classes": str(num_classes),
        "taps": json.dumps(dict(request.taps or {})),
        "dataset": "imported",
        "imported_from": str(weights),
        **spec_in.to_metadata(),
    }
    save_checkpoint(out, {"task": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 0},
                    metadata)
    return ImportedTeacher(out, request.arch, in_channels, num_classes, spec_in,
                           sum(p.numel() for p in model.parameters()))


def _build(arch: str, in_channels: int, num_classes: int) -> torch.nn.Module:
    return build_model(arch, in_channels=in_channels, num_classes=num_classes)


def _build_channels(arch: str, in_channels: int) -> torch.nn.Module:
    return build_model(arch, in_channels=in_channels, num_classes=5)


def _check_runs(model: torch.nn.Module, spec: TapSpec, in_channels: int, size: int, arch: str) -> None:
    """Tap one zero image of the declared size, so a teacher that cannot run is refused before it is written."""
    try:
        FeatureTaps(model, spec).shapes((in_channels, size, size))
    except CKTFError:
        raise
    except RuntimeError as err:
        raise CKTFError(f"{arch} does not run on {in_channels}x{size}x{size} images (--image-size): "
                        f"{' '.join(str(err).split())[:200]}") from None
