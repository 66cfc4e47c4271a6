"""Model zoo: every architecture is built by name, together with its default tap spec.

Configs and checkpoints refer to models by name only, so the registry is the single
place that maps a name to a builder ``(in_channels, num_classes) -> nn.Module`` and to
the :class:`TapSpec` factory that says where its stem/stages/penultimate/logits are.
Parameter counts are tabulated in each family module's docstring.

Each entry also declares how the published CKTF code pools this family's intermediate maps
(``reference_pool``), so ``loss.nce.stage_pool reference`` never has to guess a family from a name.

Any torchvision classification model can be used as ``torchvision.<arch>`` (e.g.
``torchvision.resnet18``, ``torchvision.mobilenet_v3_small``): it is built with
``weights=None`` (nothing is ever downloaded) and 3 input channels. ResNets get default
taps; for other architectures name the nodes in the config's ``taps`` mapping.

Any timm model is ``timm.<name>`` (e.g. ``timm.convnext_atto``), built with random weights and default taps
from timm's feature metadata (:mod:`transfer.models.timm_models`; timm is an optional extra).
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
    """How to build a registered model and where to tap it.

    ``reference_pool`` is the average-pooling window (kernel = stride) the published CKTF code
    (kaiqi123/CKTF, ``distiller_zoo/ST.py`` and the models' ``flatGroupOut``) applies to this family's
    intermediate maps before flattening: 8 for the CIFAR-style ResNets and WRNs, whose own classifier
    pool is an 8x8 ``AvgPool2d``; ``None`` (a global average pool) for VGG and the ImageNet-style ResNets.
    """

    builder: Callable[[int, int], nn.Module]  # (in_channels, num_classes) -> model
    spec: Callable[[nn.Module], TapSpec]
    family: str
    reference_pool: int | None = None


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, builder: Callable[[int, int], nn.Module],
                   spec: Callable[[nn.Module], TapSpec], family: str, reference_pool: int | None = None) -> None:
    """Add a model; names are unique so a config can never silently mean two networks."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    if reference_pool is not None and reference_pool < 1:
        raise ValueError(f"reference_pool must be a positive window or None, got {reference_pool}")
    MODELS[name] = ModelEntry(builder, spec, family, reference_pool)


def _cifar(depth: int, wide: bool, in_channels: int, num_classes: int) -> nn.Module:
    return cifar_resnet(depth, wide, in_channels, num_classes)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}", partial(_cifar, _depth, False), layout_spec, "resnet_cifar", 8)
for _depth in (8, 32):
    register_model(f"resnet{_depth}x4", partial(_cifar, _depth, True), layout_spec, "resnet_cifar", 8)
for _depth, _widen in ((16, 2), (40, 1), (40, 2)):
    register_model(f"wrn_{_depth}_{_widen}", partial(WideResNet, _depth, _widen), layout_spec, "wrn", 8)
for _name in CONVS_PER_GROUP:
    register_model(_name, partial(vgg, _name), layout_spec, "vgg")
for _name in LAYOUTS:
    register_model(_name, partial(small_resnet, _name), torchvision_resnet_spec, "resnet_small")


def list_models(family: str | None = None) -> list[str]:
    """Registered names in registration order, optionally of one family."""
    return [name for name, entry in MODELS.items() if family is None or entry.family == family]


TORCHVISION_PREFIX = "torchvision."


def _torchvision_builder(arch: str, in_channels: int, num_classes: int) -> nn.Module:
    import torchvision

    if in_channels != 3:
        raise CKTFError(f"torchvision model '{arch}' takes 3-channel images, but the data has {in_channels}")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def _torchvision_spec(model: nn.Module) -> TapSpec:
    import torchvision

    if isinstance(model, torchvision.models.ResNet):
        return torchvision_resnet_spec(model)
    raise CKTFError(f"{type(model).__name__} has no default feature taps; name its graph nodes in the config under "
                    "taps (stem, stages, penultimate, logits)")


def _torchvision_entry(name: str, option: str) -> ModelEntry:
    import torchvision

    arch = name[len(TORCHVISION_PREFIX):]
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise CKTFError(f"unknown torchvision classification model {arch!r} (option {option}); see "
                        "torchvision.models.list_models()")
    return ModelEntry(partial(_torchvision_builder, arch), _torchvision_spec, "torchvision")


def _timm_entry(name: str, option: str) -> ModelEntry:
    from transfer.models import timm_models

    arch = name[len(timm_models.TIMM_PREFIX):]
    timm_models.check_name(arch, option)
    return ModelEntry(partial(timm_models.build_timm, arch), timm_models.timm_spec, "timm")


def get_entry(name: str, option: str = "model.name") -> ModelEntry:
    """The registry entry for ``name``; unknown names are a user error naming ``option`` and the choices."""
    if isinstance(name, str) and name.startswith(TORCHVISION_PREFIX):
        return _torchvision_entry(name, option)
    if isinstance(name, str) and name.startswith("timm."):
        return _timm_entry(name, option)
    if not isinstance(name, str) or name not in MODELS:
        raise CKTFError(f"unknown model {name!r} (option {option}); choose one of: {', '.join(MODELS)}, "
                        "torchvision.<arch> or timm.<name>")
    return MODELS[name]


def reference_pool(name: str) -> int | None:
    """Pooling window of ``name``'s intermediate maps in the published CKTF code (``None``: global pool).

    torchvision models count as ImageNet-style networks, which the reference pools globally.
    """
    return get_entry(name).reference_pool


def _positive_int(value: object, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CKTFError(f"option {option} must be a positive integer, got {value!r}")
    return value


def build_model(name: str, in_channels: int = 3, num_classes: int = 100, option: str = "model.name") -> nn.Module:
    """Build registered model ``name`` with freshly initialised weights (``option``: the config key naming it,
    for errors)."""
    entry = get_entry(name, option)
    _positive_int(in_channels, "model.in_channels")
    _positive_int(num_classes, "model.num_classes")
    return entry.builder(in_channels, num_classes)


def tap_spec_for(name: str, model: nn.Module | None = None) -> TapSpec:
    """Default tap spec of the registered model ``name`` (derived from ``model`` when given); without ``model``
    it is derived from a weightless meta-device copy."""
    entry = get_entry(name)
    if model is None:
        with torch.device("meta"):
            model = entry.builder(3, 100)
    return entry.spec(model)


def infer_tap_spec(model: nn.Module) -> TapSpec:
    """Default taps of a model given as a module rather than a name (the Python API).

    torchvision ResNets (and cktf's 64x64 ResNets, which are torchvision ResNets) get theirs; cktf's other
    families share the ``stem``/``layer1..N``/``fc`` layout; timm models get theirs from timm's feature
    metadata. Anything else needs its nodes named.
    """
    import torchvision

    from transfer.models import timm_models

    if timm_models.is_timm_model(model):
        return timm_models.timm_spec(model)
    if isinstance(model, torchvision.models.ResNet):
        return torchvision_resnet_spec(model)
    if all(hasattr(model, name) for name in ("stem", "layer1", "fc")):
        return layout_spec(model)
    raise ValueError(f"{type(model).__name__} has no default feature taps; pass its graph node names "
                     "(stem, stages, penultimate, logits) as a TapSpec or mapping")
