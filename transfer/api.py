"""The transfer losses from Python, for a training loop of your own.

:class:`CKTFLoss` wraps the machinery ``cktf transfer`` uses (feature taps, the loss terms, memory banks and
the negative sampler in a :class:`~transfer.tasks.transfer.TransferTask`) behind one call:
``loss = objective(images, indices)``. The method is the set of non-zero weights, as on the command line:
CKTF ``mckt=0.8, pckt=0.2`` (default), CRD ``mckt=0, pckt=1``, KD ``mckt=0, pckt=0, kd=1``.

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

from transfer.config import LossConfig
from transfer.losses.objective import build_objective
from transfer.models.checkpoints import LoadedNetwork, freeze, load_network
from transfer.models.registry import infer_tap_spec
from transfer.models.taps import FeatureTaps, TapSpec
from transfer.sampling import build_sampler
from transfer.tasks.transfer import TransferTask

__all__ = ["CKTFLoss", "FeatureTaps", "LossConfig", "TapSpec", "load_teacher"]


def _spec(model: nn.Module, taps: TapSpec | Mapping[str, Any] | None, role: str) -> TapSpec:
    if isinstance(taps, TapSpec):
        return taps
    if taps:
        return TapSpec.from_dict(taps, option=f"{role}_taps")
    return infer_tap_spec(model)


class CKTFLoss(nn.Module):
    """The CKTF/CRD/KD transfer objective for a (student, teacher) pair, for use in your own training loop.

    The teacher is frozen (no gradients, eval mode, also after ``train()``). The objective owns projection
    heads (trainable: optimise :meth:`trainable_parameters`, which includes the student's) and one memory
    bank row per dataset item, so every batch must come with the items' dataset indices.

    Args:
        student: the network to train (any model with default taps, e.g. a torchvision ResNet, or give
            ``student_taps``).
        teacher: the pretrained network (frozen here, in place).
        num_items: number of items in the dataset (indices must lie in ``[0, num_items)``).
        sample_input: a ``[B, C, H, W]`` batch of real, preprocessed inputs; sizes the heads and decides the
            layer mapping.
        num_negatives: K negatives per anchor, smaller than ``num_items``.
        shared_negatives: one set of K negatives per batch (fast) instead of K per anchor (CRD's setting).
        student_taps, teacher_taps: tap node names (:class:`TapSpec` or its mapping) for models without
            default taps.
        seed: seeds the layer mapping's random choices.
        **loss: any :class:`~transfer.config.LossConfig` field: ``mckt``, ``pckt``, ``kd``, ``ce``,
            ``temperature``, ``embed_dim``, ``projection``, ``layer_mapping``, …

    Returns:
        Calling it with ``(images, indices[, targets])`` returns the weighted total loss (a scalar); the
        unweighted terms of that call are in :attr:`last_terms`.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, num_items: int, sample_input: torch.Tensor, *,
                 num_negatives: int = 4096, shared_negatives: bool = True,
                 student_taps: TapSpec | Mapping[str, Any] | None = None,
                 teacher_taps: TapSpec | Mapping[str, Any] | None = None, seed: int = 0, **loss: Any) -> None:
        super().__init__()
        cfg = LossConfig(**loss)
        cfg.validate()
        student_tapped = FeatureTaps(student, _spec(student, student_taps, "student"))
        teacher_tapped = freeze(FeatureTaps(freeze(teacher), _spec(teacher, teacher_taps, "teacher"),
                                            with_blocks=cfg.layer_mapping != "last"))
        was_training = student.training
        objective = build_objective(cfg, student_tapped, teacher_tapped, num_items, sample_input, seed=seed,
                                    names=(type(student).__name__, type(teacher).__name__))
        student_tapped.train(was_training)
        sampler = None
        if any(term.needs_negatives for term in objective.terms.values()):
            sampler = build_sampler("uniform", num_items, num_negatives, shared=shared_negatives)
        self.task = TransferTask(student_tapped, teacher_tapped, objective.terms, objective.weights, sampler)
        self.task.train(was_training)
        self.mapping = objective.mapping
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, images: torch.Tensor, indices: torch.Tensor, targets: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The weighted loss of one batch; ``targets`` only matter with ``ce > 0`` (default: unlabeled)."""
        if targets is None:
            targets = torch.full((len(images),), -1, dtype=torch.long, device=images.device)
        out = self.task.training_step(images, targets, indices.to(images.device))
        self.last_terms = out.terms
        return out.loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters and the projection heads' (never the teacher's)."""
        return self.task.trainable_parameters()


def load_teacher(path: str, option: str = "teacher") -> LoadedNetwork:
    """The network of a teacher checkpoint (``cktf train-teacher`` or ``cktf import-teacher``), frozen.

    ``.model`` is the network; ``.input`` the input size and normalisation it expects, when recorded.
    """
    net = load_network(path, prefix="model.", kinds=("teacher",), option=option)
    freeze(net.model)
    return net
