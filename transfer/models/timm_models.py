"""timm (PyTorch Image Models) networks by name: ``timm.<name>`` builds ``timm.create_model(name)`` with random
weights, and its feature taps come from timm's own metadata instead of hand-written node names.

timm is an optional dependency (``pip install 'cktf[timm]'``): it is imported only when a ``timm.`` name is
used, so everything else works without it. Nothing is downloaded: models are created with
``pretrained=False``; pretrained weights come from a file the user has (``cktf import-teacher``).

Default taps:

- CNN families (ResNet, ConvNeXt, EfficientNet, RegNet, … — every model whose ``feature_info`` describes
  NCHW maps at growing strides): the stages are the ``feature_info`` modules (a stem entry such as ResNet's
  ``act1`` or RegNet's ``stem`` is not a stage), the stem is the input of the first stage, the penultimate is
  the pooled vector the classifier reads (``forward_head(pre_logits=True)``) and the logits are the
  classifier's output.
- ViT-style models (one token sequence through ``blocks``, all at the patch stride): the stages are four
  evenly spaced blocks, read as token maps ``[B, N, C]`` (the stage features mean-pool tokens), the stem is
  the token sequence entering the first block, the penultimate is the pre-logits vector (class token or
  pooled tokens after the final norm). ViTs are built with ``dynamic_img_size=True``, so they run at any
  multiple of their patch size and weights saved at 224 px still fit.
- Models whose ``feature_info`` says channels-last maps (Swin, …) or that have no ``feature_info`` get no
  default taps: name their nodes with ``taps`` (``--taps`` on ``cktf import-teacher``).
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from transfer.errors import CKTFError
from transfer.models.taps import TapSpec

TIMM_PREFIX = "timm."
INSTALL_HINT = "pip install 'cktf[timm]'"
TOKEN_STAGES = 4


def import_timm() -> Any:
    """The ``timm`` module, or a one-line error saying how to install it."""
    try:
        import timm
    except ImportError:
        raise CKTFError(f"timm models need the timm package: {INSTALL_HINT}") from None
    return timm


def check_name(arch: str, option: str) -> None:
    """Refuse a name timm does not know, in one line with the closest names it does (``name.tag`` names one of
    the model's pretrained configurations: its input settings, never a download)."""
    timm = import_timm()
    base, _, tag = arch.partition(".")
    if timm.is_model(base) and not tag:
        return
    if timm.is_model(base):
        tags = timm.list_pretrained(f"{base}.*")
        if arch in tags:
            return
        raise CKTFError(f"timm model {base!r} has no pretrained tag {tag!r} (option {option}); its tags: "
                        f"{', '.join(t.partition('.')[2] for t in tags) or 'none'}")
    close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
    hint = f"closest: {', '.join(close)}" if close else "see timm.list_models()"
    raise CKTFError(f"unknown timm model {arch!r} (option {option}); {hint}")


def build_timm(arch: str, in_channels: int, num_classes: int) -> nn.Module:
    """``timm.create_model(arch)`` with random weights, ``in_channels`` inputs and ``num_classes`` outputs.

    Models that take ``dynamic_img_size`` (ViTs and their kin) get it, so their position embeddings are
    resampled to whatever input size the data has.
    """
    timm = import_timm()
    kwargs = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels}
    try:
        return timm.create_model(arch, dynamic_img_size=True, **kwargs)
    except TypeError as err:
        if "dynamic_img_size" not in str(err):
            raise
    return timm.create_model(arch, **kwargs)


def pretrained_input(model: nn.Module) -> dict[str, Any]:
    """The input settings timm's ``pretrained_cfg`` states for ``model``: ``image_size``, ``mean``, ``std``,
    ``interpolation``, ``crop_pct`` (absent keys: not stated)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    found: dict[str, Any] = {}
    size = cfg.get("input_size")
    if size and len(size) == 3 and size[1] == size[2]:
        found["image_size"] = int(size[1])
    for key in ("mean", "std"):
        if cfg.get(key):
            found[key] = tuple(float(v) for v in cfg[key])
    if cfg.get("interpolation"):
        found["interpolation"] = str(cfg["interpolation"])
    if cfg.get("crop_pct"):
        found["crop_pct"] = float(cfg["crop_pct"])
    return found


def tracer_kwargs() -> dict[str, list]:
    """timm's own FX tracing settings (modules and functions it marks as not traceable)."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm before 1.0 kept them in timm.models._features_fx
        from timm.models import _features_fx

        return {"leaf_modules": list(_features_fx._leaf_modules),
                "autowrap_functions": list(_features_fx._autowrap_functions)}
    return {"leaf_modules": list(get_notrace_modules()), "autowrap_functions": list(get_notrace_functions())}


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with SyncBatchNorm layers: torch's conversion, or timm's where ``module`` holds timm layers.

    timm's ``BatchNormAct2d`` is a ``BatchNorm2d`` that also applies its activation; torch's conversion would
    replace it with a plain ``SyncBatchNorm`` and silently drop the activation, timm's keeps it.
    """
    if any(is_timm_model(m) for m in module.modules()):
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(module)
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def is_timm_model(model: nn.Module) -> bool:
    """Whether ``model`` is a timm network (its class lives in the ``timm`` package)."""
    return type(model).__module__.split(".", 1)[0] == "timm"


def timm_spec(model: nn.Module) -> TapSpec:
    """Default taps of a timm model from its ``feature_info`` and classifier (see the module docstring)."""
    info = list(getattr(model, "feature_info", None) or [])
    name = type(model).__name__
    if not info or not hasattr(model, "get_classifier"):
        raise CKTFError(f"timm {name} has no feature_info; name its graph nodes under taps (stem, stages, "
                        "penultimate, logits)")
    if any(str(entry.get("fmt", getattr(model, "output_fmt", "NCHW"))).upper() == "NHWC" for entry in info):
        raise CKTFError(f"timm {name} gives channels-last stage maps; name its graph nodes under taps (stem, "
                        "stages, penultimate, logits), e.g. the stage outputs after a permute to NCHW")
    modules = dict(model.named_modules())
    reductions = {entry.get("reduction") for entry in info}
    if len(info) > 1 and len(reductions) == 1:  # one token sequence: every block at the patch stride
        count = min(TOKEN_STAGES, len(info))
        picks = [round(len(info) * (k + 1) / count) - 1 for k in range(count)]
        stages = [info[i]["module"] for i in picks]
        bounds = [0, *[i + 1 for i in picks]]
        blocks = [tuple(info[j]["module"] for j in range(bounds[k], bounds[k + 1])) for k in range(len(picks))]
        entry = info[0]["module"]
    else:
        lead = next((i for i, entry in enumerate(info) if _is_stage(entry["module"], modules)), len(info))
        stages = [entry["module"] for entry in info[lead:]]
        blocks = [_stage_blocks(stage, modules) for stage in stages]
        entry = stages[0] if stages else ""
    if not stages:
        raise CKTFError(f"timm {name}: its feature_info names no stage modules; name its graph nodes under taps")
    stem, penultimate, logits = _graph_ends(model, entry)
    return TapSpec(stem=stem, stages=tuple(stages), blocks=tuple(blocks) if all(blocks) else (),
                   penultimate=penultimate, logits=logits)


def _is_stage(path: str, modules: dict[str, nn.Module]) -> bool:
    """A stage holds parameterised blocks; leading stem entries (an activation, a ``stem`` conv) do not count
    (a trailing parameterless entry, such as a ``final_conv`` identity after the last stage, does)."""
    module = modules.get(path)
    return module is not None and "stem" not in path.split(".") and any(
        True for child in module.children() if any(True for _ in child.parameters()))


def _stage_blocks(stage: str, modules: dict[str, nn.Module]) -> tuple[str, ...]:
    """A stage's blocks: the children of its ``blocks`` container if it has one (ConvNeXt), else its own
    children that hold parameters (ResNet's ``layer1.0``, RegNet's ``s1.b1``)."""
    holder = f"{stage}.blocks" if f"{stage}.blocks" in modules else stage
    return tuple(f"{holder}.{key}" for key, child in modules[holder].named_children()
                 if any(True for _ in child.parameters()))


def _graph_ends(model: nn.Module, first_stage: str) -> tuple[str, str, str]:
    """(stem, penultimate, logits) node names: the input of module ``first_stage``, the classifier's input
    (before dropout) and the model's output, read off one eval-mode FX trace."""
    from torchvision.models.feature_extraction import NodePathTracer

    classifier = model.get_classifier()
    head = next((path for path, module in model.named_modules() if module is classifier), None)
    was_training = model.training
    tracer = NodePathTracer(**tracer_kwargs())
    try:
        graph = tracer.trace(model.eval())
    finally:
        model.train(was_training)
    names = tracer.node_to_qualname
    stem = _input_of(graph, names, first_stage)
    before = _input_of(graph, names, head) if head else None
    output = next(node for node in graph.nodes if node.op == "output").args[0]
    if stem is None or before is None or output not in names:
        raise CKTFError(f"timm {type(model).__name__}: cannot find its stem or classifier in the traced graph; "
                        "name its graph nodes under taps (stem, stages, penultimate, logits)")
    while before.op == "call_module" and isinstance(model.get_submodule(before.target), nn.Dropout):
        before = before.args[0]
    return names[stem], names[before], names[output]


def _input_of(graph: Any, names: dict, module: str) -> Any:
    """The node feeding module ``module``: the first input from outside it of its first computing node (whether
    the tracer kept the module whole or traced through it)."""
    from torch import fx

    def inside(node: fx.Node) -> bool:
        return names.get(node, "") == module or names.get(node, "").startswith(module + ".")

    first = next((node for node in graph.nodes if inside(node) and node.op != "get_attr"), None)
    return next((arg for arg in (first.args if first is not None else ()) if isinstance(arg, fx.Node)
                 and arg.op != "get_attr" and arg in names and not inside(arg)), None)
