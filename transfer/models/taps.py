"""Feature taps: one forward pass returns every module group's output, untouched model code.

Contrastive transfer (CKTF) needs the stem, each stage, the penultimate vector and the
logits of both networks. Rather than giving every architecture a bespoke
``forward(..., return_features=True)``, a :class:`TapSpec` names the graph nodes to read
and :class:`FeatureTaps` rewrites the model's FX graph (torchvision's
``create_feature_extractor``) to return them. Parameters, buffers and leaf modules are
the wrapped model's own, so gradients, ``train()``/``eval()`` and checkpoints all refer
to ``FeatureTaps.model``.

Node names are those of ``torchvision.models.feature_extraction.get_graph_node_names``;
a module path such as ``layer1`` or ``layer1.0`` means that module's output (its last
node). The registered models come with a default spec (:func:`transfer.models.registry.tap_spec_for`); any
other FX-traceable model is plugged in by naming its nodes, e.g. a stock
``torchvision.models.resnet18()`` in a config::

    taps:
      stem: maxpool
      stages: [layer1, layer2, layer3, layer4]
      blocks: [[layer1.0, layer1.1], [layer2.0, layer2.1], [layer3.0, layer3.1], [layer4.0, layer4.1]]
      penultimate: flatten
      logits: fc

    spec = TapSpec.from_dict(cfg["taps"])
    taps = FeatureTaps(torchvision.models.resnet18(), spec)
    out = taps(images)          # out.stem, out.stages[0..3], out.penultimate, out.logits

(``blocks`` is optional; it is only needed with ``with_blocks=True``.)
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.feature_extraction import (
    DualGraphModule,
    create_feature_extractor,
    get_graph_node_names,
)

from transfer.errors import CKTFError

_MODES = ("train", "eval")


@dataclass(frozen=True)
class TapSpec:
    """Names of the graph nodes to read; each may be a node name or a module path."""

    stem: str
    stages: tuple[str, ...]
    blocks: tuple[tuple[str, ...], ...]
    penultimate: str
    logits: str

    def __post_init__(self) -> None:
        # Accept lists (e.g. from YAML) but keep the spec hashable and immutable.
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "blocks", tuple(tuple(b) for b in self.blocks))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], option: str = "taps") -> TapSpec:
        """Build a spec from config; ``option`` is the config path used in error messages."""
        if not isinstance(d, Mapping):
            raise CKTFError(f"option {option} must be a mapping with keys stem, stages, penultimate, logits")
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                raise CKTFError(f"unknown key {key!r} in option {option}; choose from: {', '.join(known)}")
        missing = [k for k in known if k != "blocks" and k not in d]
        if missing:
            raise CKTFError(f"option {option} is missing {', '.join(missing)} (required: stem, stages, "
                            "penultimate, logits)")
        stages = _str_list(d["stages"], f"{option}.stages")
        if not stages:
            raise CKTFError(f"option {option}.stages must name at least one node")
        raw_blocks = d.get("blocks") or []
        if not isinstance(raw_blocks, list | tuple):
            raise CKTFError(f"option {option}.blocks must be a list with one list of node names per stage")
        blocks = [_str_list(b, f"{option}.blocks[{i}]") for i, b in enumerate(raw_blocks)]
        if blocks and len(blocks) != len(stages):
            raise CKTFError(f"option {option}.blocks has {len(blocks)} lists but {option}.stages has "
                            f"{len(stages)} stages; give one list per stage")
        return cls(
            stem=_str(d["stem"], f"{option}.stem"),
            stages=tuple(stages),
            blocks=tuple(tuple(b) for b in blocks),
            penultimate=_str(d["penultimate"], f"{option}.penultimate"),
            logits=_str(d["logits"], f"{option}.logits"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-container form, the inverse of :meth:`from_dict` (for configs and checkpoints)."""
        return {"stem": self.stem, "stages": list(self.stages), "blocks": [list(b) for b in self.blocks],
                "penultimate": self.penultimate, "logits": self.logits}

    def roles(self, with_blocks: bool = False) -> Iterator[tuple[str, str]]:
        """(role, node) pairs, role being the field path used in error messages."""
        yield "stem", self.stem
        for i, node in enumerate(self.stages):
            yield f"stages[{i}]", node
        if with_blocks:
            for i, stage_blocks in enumerate(self.blocks):
                for j, node in enumerate(stage_blocks):
                    yield f"blocks[{i}][{j}]", node
        yield "penultimate", self.penultimate
        yield "logits", self.logits


def _str(value: Any, option: str) -> str:
    if not isinstance(value, str) or not value:
        raise CKTFError(f"option {option} must be a non-empty node name, got {value!r}")
    return value


def _str_list(value: Any, option: str) -> list[str]:
    if not isinstance(value, list | tuple):
        raise CKTFError(f"option {option} must be a list of node names, got {value!r}")
    return [_str(v, f"{option}[{i}]") for i, v in enumerate(value)]


def layout_spec(model: nn.Module) -> TapSpec:
    """Default spec for the uniform layout ``stem``, ``layer1..N``, ``avgpool``, ``flatten``, ``fc``.

    A stage's blocks are its numbered children, so extra non-block children (VGG's
    leading ``pool``, WRN's final ``bn``/``relu``) are part of the stage but not blocks.
    """
    stages: list[str] = []
    while hasattr(model, f"layer{len(stages) + 1}"):
        stages.append(f"layer{len(stages) + 1}")
    blocks = tuple(
        tuple(f"{stage}.{key}" for key, _ in getattr(model, stage).named_children() if key.isdigit())
        for stage in stages
    )
    return TapSpec(stem="stem", stages=tuple(stages), blocks=blocks, penultimate="flatten", logits="fc")


@dataclass
class TapOutputs:
    """Outputs of one tapped forward pass; ``blocks`` is set only with ``with_blocks=True``."""

    stem: Tensor
    stages: list[Tensor]
    penultimate: Tensor
    logits: Tensor
    blocks: list[list[Tensor]] | None = None


class FeatureTaps(nn.Module):
    """One forward pass -> every module group's output, without editing model code.

    ``model`` is registered as the only child, so ``parameters()``, ``to()`` and
    ``state_dict()`` (keys prefixed ``model.``) are the model's; save ``taps.model``'s
    state dict to get a plain checkpoint. The rewritten graph is kept outside the module
    tree and shares the model's leaf modules and tensors. Switch modes on the taps
    (``taps.train()``/``taps.eval()``): that sets the model's modules and selects the
    matching traced graph.
    """

    def __init__(self, model: nn.Module, spec: TapSpec, with_blocks: bool = False) -> None:
        super().__init__()
        if with_blocks and len(spec.blocks) != len(spec.stages):
            raise CKTFError("with_blocks=True needs one list of block nodes per stage (option taps.blocks), "
                            f"got {len(spec.blocks)} lists for {len(spec.stages)} stages")
        self.model = model
        self.spec = spec
        self.with_blocks = with_blocks
        self.training = model.training
        self._build()

    def _build(self) -> None:
        model = self.model
        with _kept_modes(model.modules()):  # tracing toggles train/eval on every module
            self._nodes = _resolve(model, self.spec, self.with_blocks)
            extractor = create_feature_extractor(
                model,
                train_return_nodes=sorted(set(self._nodes["train"].values())),
                eval_return_nodes=sorted(set(self._nodes["eval"].values())),
                tracer_kwargs=_tracer_kwargs(model),
            )
            extractor.train(self.training)
        self.__dict__["_extractor"] = extractor  # not a child: no duplicate parameters or state_dict keys

    def retrace(self) -> None:
        """Trace the model again after modules inside it were replaced, e.g. BatchNorm by SyncBatchNorm
        (``nn.SyncBatchNorm.convert_sync_batchnorm``): the traced graph holds the modules it was traced with,
        so until then a forward would still run the replaced ones."""
        self._build()

    def __getstate__(self) -> dict[str, Any]:
        # A pickled GraphModule comes back single-graph; re-trace the unpickled model instead.
        state = self.__dict__.copy()
        del state["_extractor"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._build()

    def train(self, mode: bool = True) -> FeatureTaps:
        super().train(mode)
        self._extractor.train(mode)
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> FeatureTaps:
        super()._apply(fn, recurse)
        self._rebind()
        return self

    def _rebind(self) -> None:
        """Re-point tensors read by ``get_attr`` nodes after ``to()``/``double()`` replaced them.

        Leaf modules are shared objects and stay in sync; only tensors held directly by a
        traced-through module (e.g. an index buffer) are copies of the old references.
        """
        ext = self._extractor
        for graph in (ext.train_graph, ext.eval_graph):
            for node in graph.nodes:
                if node.op != "get_attr":
                    continue
                owner, _, attr = node.target.rpartition(".")
                value = getattr(self.model.get_submodule(owner), attr)
                target = ext.get_submodule(owner)
                if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
                    target.register_buffer(attr, value)
                else:
                    setattr(target, attr, value)

    def forward(self, x: Tensor) -> TapOutputs:
        out = self._extractor(x)
        nodes = self._nodes["train" if self._extractor.training else "eval"]
        blocks = None
        if self.with_blocks:
            blocks = [[out[nodes[f"blocks[{i}][{j}]"]] for j in range(len(stage))]
                      for i, stage in enumerate(self.spec.blocks)]
        return TapOutputs(
            stem=out[nodes["stem"]],
            stages=[out[nodes[f"stages[{i}]"]] for i in range(len(self.spec.stages))],
            penultimate=out[nodes["penultimate"]],
            logits=out[nodes["logits"]],
            blocks=blocks,
        )

    @torch.no_grad()
    def _dry_run(self, input_shape: tuple[int, int, int]) -> TapOutputs:
        """Outputs for one zero ``input_shape`` (C, H, W) image, in eval mode, blocks included when named."""
        if len(input_shape) != 3:
            raise CKTFError(f"input shape must be (channels, height, width), got {tuple(input_shape)}")
        taps = self
        if not self.with_blocks and len(self.spec.blocks) == len(self.spec.stages):
            taps = FeatureTaps(self.model, self.spec, with_blocks=True)
        ref = next(iter(self.model.parameters()), None)
        x = torch.zeros(1, *input_shape, device=ref.device if ref is not None else None,
                        dtype=ref.dtype if ref is not None else None)
        with _kept_modes([*taps.modules(), *taps._extractor.modules()]):
            taps.eval()
            return taps(x)

    @torch.no_grad()
    def channels(self, input_shape: tuple[int, int, int]) -> dict[str, Any]:
        """Channel widths of every tap from a dry run on one ``input_shape`` (C, H, W) image.

        Runs in eval mode without gradients and restores each module's previous mode.
        ``blocks`` is ``[]`` when the spec names no blocks.
        """
        out = self._dry_run(input_shape)
        return {
            "stem": _width(out.stem),
            "stages": [_width(t) for t in out.stages],
            "blocks": [[_width(t) for t in stage] for stage in out.blocks or []],
            "penultimate": _width(out.penultimate),
            "logits": _width(out.logits),
        }

    @torch.no_grad()
    def shapes(self, input_shape: tuple[int, int, int]) -> dict[str, Any]:
        """Per-sample shapes (batch dimension dropped) of every tap, structured like :meth:`channels`.

        Heads that flatten a spatially pooled map (``loss.nce.stage_pool reference``) need the spatial size,
        not only the width.
        """
        out = self._dry_run(input_shape)
        return {
            "stem": tuple(out.stem.shape[1:]),
            "stages": [tuple(t.shape[1:]) for t in out.stages],
            "blocks": [[tuple(t.shape[1:]) for t in stage] for stage in out.blocks or []],
            "penultimate": tuple(out.penultimate.shape[1:]),
            "logits": tuple(out.logits.shape[1:]),
        }


@contextmanager
def _kept_modes(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Restore each module's own train/eval flag, which a blanket ``train(mode)`` would clobber
    (e.g. BN layers deliberately frozen inside a training model)."""
    saved = [(m, m.training) for m in modules]
    try:
        yield
    finally:
        for module, mode in saved:
            if isinstance(module, DualGraphModule):
                module.train(mode)  # also selects that mode's graph; flags are reset below
        for module, mode in saved:
            module.training = mode


def _width(t: Tensor) -> int:
    # Token maps [B, N, C] (transformers) carry channels last; images and vectors at dim 1.
    return int(t.shape[-1] if t.dim() == 3 else t.shape[1])


def _tracer_kwargs(model: nn.Module) -> dict[str, Any] | None:
    """Model-specific FX tracer settings: timm's own for timm models (modules it marks untraceable)."""
    if type(model).__module__.split(".", 1)[0] != "timm":
        return None
    from transfer.models.timm_models import tracer_kwargs

    return tracer_kwargs()


def _resolve(model: nn.Module, spec: TapSpec, with_blocks: bool) -> dict[str, dict[str, str]]:
    """Map each role to the exact node it reads, per mode, rejecting unknown names.

    Module paths are resolved here to their last node (torchvision's rule) so that the
    extractor only ever sees exact node names: with prefixes, asking for ``layer1`` and
    ``layer1.2`` together makes torchvision give ``layer1.2`` an earlier node.
    """
    names = dict(zip(_MODES, get_graph_node_names(model, tracer_kwargs=_tracer_kwargs(model),
                                                  suppress_diff_warning=True), strict=True))
    resolved: dict[str, dict[str, str]] = {}
    for mode in _MODES:
        last: dict[str, str] = {}
        for node in names[mode]:
            parts = node.split(".")
            for depth in range(1, len(parts) + 1):
                last[".".join(parts[:depth])] = node
        roles = {}
        for role, query in spec.roles(with_blocks):
            if query not in last:
                raise CKTFError(_unknown_node_message(model, role, query, mode, last))
            roles[role] = last[query]
        resolved[mode] = roles
    return resolved


def _unknown_node_message(model: nn.Module, role: str, query: str, mode: str, known: dict[str, str]) -> str:
    close = difflib.get_close_matches(query, list(known), n=4, cutoff=0.6)
    if close:
        hint = f"close matches: {', '.join(close)}"
    else:
        hint = f"top-level nodes: {', '.join(k for k in known if '.' not in k)}"
    where = "" if mode == "train" else " in eval mode"
    return (f"unknown tap node {query!r} (option taps.{role}) for {type(model).__name__}{where}; {hint} "
            "(see torchvision get_graph_node_names)")
