"""The transfer losses from Python, for a training loop of your own.

:class:`CKTFLoss` wraps the machinery ``cktf transfer`` uses (feature taps, the loss terms of
:mod:`transfer.losses.terms`, memory banks and the negative sampler in a
:class:`~transfer.tasks.transfer.TransferTask`, built by :mod:`transfer.losses.objective`) behind one call:
``loss = objective(images, indices)``. The method is its set of terms, named as under ``loss.terms`` in a
config: CKTF ``terms={"mckt": 0.8, "pckt": 0.2}`` (the default), CRD ``{"pckt": 1.0}``, KD ``{"kd": 1.0}``;
a term's value is its weight, or a mapping of its options (``{"kd": {"weight": 1.0, "temperature": 4.0}}``).
The NCE settings shared by the contrastive terms are ``nce={...}`` (``loss.nce``; CKTF's defaults when left
out).

Example::

    objective = CKTFLoss(student, teacher, num_items=len(dataset), sample_input=first_batch_images)
    optimizer = torch.optim.SGD(objective.trainable_parameters(), lr=0.05, momentum=0.9)
    for images, indices in loader:
        loss = objective(images, indices)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from transfer.config import LossConfig, NCEConfig
from transfer.config.loader import build_section
from transfer.config.schema import MOVED_LOSS_KEYS
from transfer.engine.frozen import freeze
from transfer.losses import objective as loss_objective
from transfer.losses.terms import build_terms
from transfer.models.checkpoints import LoadedNetwork, load_network
from transfer.models.registry import infer_tap_spec
from transfer.models.taps import FeatureTaps, TapSpec
from transfer.sampling import build_sampler
from transfer.tasks.transfer import TransferTask

__all__ = ["CKTFLoss", "FeatureTaps", "LossConfig", "NCEConfig", "TapSpec", "load_teacher"]

TermsArg = Mapping[str, float | Mapping[str, Any] | None]


def _spec(model: nn.Module, taps: TapSpec | Mapping[str, Any] | None, role: str) -> TapSpec:
    if isinstance(taps, TapSpec):
        return taps
    if taps:
        return TapSpec.from_dict(taps, option=f"{role}_taps")
    return infer_tap_spec(model)


def _term_options(terms: TermsArg) -> dict[str, dict[str, Any]]:
    """``{"mckt": 0.8, "kd": {"temperature": 2}}`` -> ``{"mckt": {"weight": 0.8}, "kd": {"temperature": 2}}``."""
    if not isinstance(terms, Mapping):
        raise TypeError(f"terms must map term names to a weight or to the term's options, got {terms!r}")
    out: dict[str, dict[str, Any]] = {}
    for name, value in terms.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = {"weight": float(value)}
        elif value is None or isinstance(value, Mapping):
            out[name] = dict(value or {})
        else:
            raise TypeError(f"terms[{name!r}] must be a weight or a mapping of the term's options (e.g. "
                            f"{{'weight': 1.0}}), got {value!r}")
    return out


def _new_form(key: str) -> str:
    """Where an old flat ``LossConfig`` keyword went, spelled as this API's arguments."""
    parts = MOVED_LOSS_KEYS[key].split(";")[0].strip().split(".")  # loss.terms.<term>.<option> / loss.nce.<x>
    if parts[1] == "nce":
        return f"nce={{'{parts[2]}': ...}}"
    if parts[3] == "weight":
        return f"terms={{'{parts[2]}': <weight>}}"
    return f"terms={{'{parts[2]}': {{'{parts[3]}': ...}}}}"


def loss_config(terms: TermsArg | None = None, nce: Mapping[str, Any] | None = None) -> LossConfig:
    """The ``loss`` section that ``terms``/``nce`` of :class:`CKTFLoss` mean, validated like a config's.

    ``terms`` replaces the default set (CKTF: ``mckt`` 0.8 + ``pckt`` 0.2) as a whole, as a config file's
    ``loss.terms`` does; ``nce`` sets some of :class:`~transfer.config.NCEConfig`'s fields, the rest keep
    their defaults (d 128, τ 0.1, momentum 0.5, linear heads, random banks, no stage normalisation, global
    pooling).
    """
    cfg = LossConfig(nce=build_section(NCEConfig, dict(nce or {}), "nce.", "in CKTFLoss(nce=...)"))
    if terms is not None:
        cfg.terms = _term_options(terms)
    cfg.validate()
    return cfg


class CKTFLoss(nn.Module):
    """The CKTF/CRD/KD transfer objective for a (student, teacher) pair, for use in your own training loop.

    The teacher is frozen (no gradients, eval mode, also after ``train()``). The objective owns the terms'
    trainable modules (projection heads: optimise :meth:`trainable_parameters`, which includes the student's)
    and one memory-bank row per dataset item, so every batch must come with the items' dataset indices.
    Heads and banks are created on the networks' device (move both networks there first, e.g. ``.cuda()``);
    each batch is moved there when the objective is called, and ``objective.to(device)`` moves everything.

    Args:
        student: the network to train (any model with default taps, e.g. a torchvision ResNet, or give
            ``student_taps``).
        teacher: the pretrained network (frozen here, in place).
        num_items: number of items in the dataset (indices must lie in ``[0, num_items)``).
        sample_input: a ``[B, C, H, W]`` batch of real, preprocessed inputs; sets the input size the heads are
            sized for and is the calibration batch of a layer mapping decided before training.
        terms: the terms of the objective by name, as ``loss.terms`` in a config (``cktf methods`` lists them):
            each value is the term's weight or a mapping of its options, e.g. ``{"mckt": 0.8, "pckt": 0.2}``
            (default: CKTF), ``{"pckt": 1.0}`` (CRD), ``{"kd": {"weight": 1.0, "temperature": 4.0}}`` (KD),
            ``{"mckt": {"weight": 0.8, "layer_mapping": "largest"}, "pckt": 0.2}``. A term left out (or with
            weight 0) is not built.
        nce: the NCE settings shared by the contrastive terms, as ``loss.nce`` (``embed_dim``, ``temperature``,
            ``momentum``, ``projection``, ``bank_init``, ``stage_norm``, ``stage_pool``); omitted fields keep
            CKTF's defaults. ``stage_pool reference`` pools globally here (the windows belong to registry
            models, and this API takes modules).
        num_negatives: K negatives per anchor, smaller than ``num_items``.
        shared_negatives: one set of K negatives per batch (fast) instead of K per anchor (CRD's setting).
        student_taps, teacher_taps: tap node names (:class:`TapSpec` or its mapping) for models without
            default taps.
        seed: seeds the terms' own random choices (e.g. a random layer mapping).

    Bad term names, options or values are the config's one-line errors (:class:`~transfer.errors.CKTFError`
    naming ``loss.terms.<name>.<option>`` or ``nce.<field>``); the old flat keywords (``mckt=0.8``,
    ``temperature=0.07``, …) are a ``TypeError`` giving the new form.

    Returns:
        Calling it with ``(images, indices[, targets])`` returns the weighted total loss (a scalar); the
        unweighted terms of that call are in :attr:`last_terms`.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, num_items: int, sample_input: torch.Tensor, *,
                 terms: TermsArg | None = None, nce: Mapping[str, Any] | None = None, num_negatives: int = 4096,
                 shared_negatives: bool = True, student_taps: TapSpec | Mapping[str, Any] | None = None,
                 teacher_taps: TapSpec | Mapping[str, Any] | None = None, seed: int = 0, **old_form: Any) -> None:
        super().__init__()
        for key in old_form:
            if key in MOVED_LOSS_KEYS:
                raise TypeError(f"CKTFLoss({key}=...) is the old form: it is now {_new_form(key)}")
            raise TypeError(f"CKTFLoss() got an unexpected keyword argument {key!r}")
        if sample_input.dim() != 4 or len(sample_input) == 0:
            raise ValueError(f"sample_input must be a non-empty [B, C, H, W] batch, got shape "
                             f"{tuple(sample_input.shape)}")
        self.loss_config = loss_config(terms, nce)
        needs = loss_objective.resolve_objective(self.loss_config)
        names = (type(student).__name__, type(teacher).__name__)
        device = network_device(student, teacher)
        sample_input = sample_input.to(device)
        was_training = student.training
        student_tapped, teacher_frozen = loss_objective.tap_pair(
            student, _spec(student, student_taps, "student"), teacher, _spec(teacher, teacher_taps, "teacher"),
            needs, names)
        ctx = loss_objective.term_context(student_tapped, teacher_frozen, tuple(sample_input.shape[1:]), num_items,
                                          lambda: sample_input, seed=seed, names=names)
        with torch.device(device):  # heads and banks are created where the networks are, never copied there
            built, weights = build_terms(self.loss_config, ctx)
        sampler = None
        if "negatives" in needs:
            sampler = build_sampler("uniform", num_items, num_negatives, shared=shared_negatives)
        self.task = TransferTask(student_tapped, teacher_frozen, built, weights, sampler)
        self.task.train(was_training)
        self.last_terms: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        """Where the networks, heads and banks are (the networks' device when built; ``.to()`` moves them all)."""
        return network_device(self.task.student, self.task.teacher)

    @property
    def weights(self) -> dict[str, float]:
        """The weight of every term built (name -> weight)."""
        return dict(self.task.weights)

    def forward(self, images: torch.Tensor, indices: torch.Tensor, targets: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The weighted loss of one batch; ``targets`` only matter for a term that needs labels (``ce``;
        default: unlabeled). The batch is moved to :attr:`device` (e.g. a loader's CPU tensors)."""
        device = self.device
        images = images.to(device, non_blocking=True)
        if targets is None:
            targets = torch.full((len(images),), -1, dtype=torch.long, device=device)
        out = self.task.training_step(images, targets.to(device, non_blocking=True),
                                      indices.to(device, non_blocking=True))
        self.last_terms = out.terms
        return out.loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters and the terms' (projection heads; never the teacher's)."""
        return self.task.trainable_parameters()


def network_device(student: nn.Module, teacher: nn.Module) -> torch.device:
    """The one device both networks' parameters and buffers are on (the CPU for networks without any)."""
    found = {t.device for net in (student, teacher) for t in (*net.parameters(), *net.buffers())}
    if len(found) > 1:
        raise ValueError(f"the student and teacher must be on one device, found {', '.join(sorted(map(str, found)))}; "
                         "move both there (e.g. .to('cuda')) before building CKTFLoss")
    return found.pop() if found else torch.device("cpu")


def load_teacher(path: str, option: str = "teacher") -> LoadedNetwork:
    """The network of a teacher checkpoint (``cktf train-teacher`` or ``cktf import-teacher``), frozen
    (no gradients, eval mode).

    ``.model`` is the network; ``.input`` the input size and normalisation it expects, when recorded.
    """
    net = load_network(path, prefix="model.", kinds=("teacher",), option=option)
    freeze(net.model)
    return net
