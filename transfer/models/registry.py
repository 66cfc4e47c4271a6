"""Model zoo: every architecture is built by name, together with its default tap spec.

Configs and checkpoints refer to models by name only, so the registry is the single
place that maps a name to a builder ``(in_channels, num_classes) -> nn.Module`` and to
the :class:`TapSpec` factory that says where its stem/stages/penultimate/logits are.
Parameter counts are tabulated in each family module's docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from transfer.errors import CKTFError
from transfer.models.resnet_cifar import cifar_resnet
from transfer.models.resnet_small import LAYOUTS, small_resnet, torchvision_resnet_spec
from transfer.models.taps import TapSpec, layout_spec
from transfer.models.vgg import CONVS_PER_GROUP, vgg
from transfer.models.wrn import WideResNet


@dataclass(frozen=True)
class ModelEntry:
    """How to build a registered model and where to tap it."""

    builder: Callable[[int, int], nn.Module]  # (in_channels, num_classes) -> model
    spec: Callable[[nn.Module], TapSpec]
    family: str


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, builder: Callable[[int, int], nn.Module],
                   spec: Callable[[nn.Module], TapSpec], family: str) -> None:
    """Add a model; names are unique so a config can never silently mean two networks."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = ModelEntry(builder, spec, family)


def _cifar(depth: int, wide: bool, in_channels: int, num_classes: int) -> nn.Module:
    return cifar_resnet(depth, wide, in_channels, num_classes)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}", partial(_cifar, _depth, False), layout_spec, "resnet_cifar")
for _depth in (8, 32):
    register_model(f"resnet{_depth}x4", partial(_cifar, _depth, True), layout_spec, "resnet_cifar")
for _depth, _widen in ((16, 2), (40, 1), (40, 2)):
    register_model(f"wrn_{_depth}_{_widen}", partial(WideResNet, _depth, _widen), layout_spec, "wrn")
for _name in CONVS_PER_GROUP:
    register_model(_name, partial(vgg, _name), layout_spec, "vgg")
for _name in LAYOUTS:
    register_model(_name, partial(small_resnet, _name), torchvision_resnet_spec, "resnet_small")


def list_models(family: str | None = None) -> list[str]:
    """Registered names in registration order, optionally of one family."""
    return [name for name, entry in MODELS.items() if family is None or entry.family == family]


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; unknown names are a user error listing the choices."""
    if not isinstance(name, str) or name not in MODELS:
        raise CKTFError(f"unknown model {name!r} (option model.name); choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def _positive_int(value: object, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CKTFError(f"option {option} must be a positive integer, got {value!r}")
    return value


def build_model(name: str, in_channels: int = 3, num_classes: int = 100) -> nn.Module:
    """Build registered model ``name`` with freshly initialised weights."""
    entry = get_entry(name)
    _positive_int(in_channels, "model.in_channels")
    _positive_int(num_classes, "model.num_classes")
    return entry.builder(in_channels, num_classes)


def default_tap_spec(name: str, model: nn.Module | None = None) -> TapSpec:
    """Default spec of ``name``; without ``model`` it is derived from a weightless meta-device copy."""
    entry = get_entry(name)
    if model is None:
        with torch.device("meta"):
            model = entry.builder(3, 100)
    return entry.spec(model)
