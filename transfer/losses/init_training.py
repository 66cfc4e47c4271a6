"""The pre-training loop of two-stage transfer methods (AB's connectors, FT's paraphraser, FSP's student).

AB, FT and FSP first train something on their own objective before the main loop (:meth:`LossTerm.init_phase`):
plain SGD with momentum 0.9 and weight decay 5e-4 over the transfer stage's training loader (its batched
augmentation applied, as in the main loop), for a given number of epochs, as RepDistiller's ``helper/pretrain.py``
does. A parameter that gets no gradient from the objective (e.g. the student's classifier under AB) is left
untouched: SGD skips parameters whose ``grad`` is ``None``.

Under torchrun these phases run before the main loop's DDP wrap, so they synchronise by themselves: every step
averages the gradients and the loss across ranks (:func:`~transfer.engine.distributed.average_step`), which
keeps the ranks' weights identical and equal to one process's with the global batch, and a non-finite loss
stops every rank with the same line.

Example::

    losses = pretrain(phase, list(self.paraphraser.parameters()), lambda images: reconstruction(images),
                      epochs=2, lr=0.01, key="loss.terms.ft")
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from transfer.engine import distributed
from transfer.losses.terms.base import InitPhase

log = logging.getLogger("cktf")

MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


def pretrain(phase: InitPhase, params: Iterable[nn.Parameter], loss_fn: Callable[[torch.Tensor], torch.Tensor], *,
             epochs: int, lr: float, key: str) -> list[float]:
    """Minimise ``loss_fn(images)`` over ``params`` for ``epochs`` passes of ``phase.train_loader``.

    Args:
        phase: the networks, device, training loader and batched augmentation of the transfer stage.
        params: what the phase trains (the caller sets their modules' train/eval modes).
        loss_fn: the pre-training objective of one batch of (augmented, on-device) images.
        epochs: passes over the loader; ``lr``: the SGD learning rate.
        key: the term's config key (``loss.terms.ab``), for messages.

    Returns:
        The mean loss of every epoch.

    Raises:
        CKTFError: the loss is not finite (one line naming ``<key>.init_lr``; on every rank under torchrun).
    """
    if phase.train_loader is None:
        raise ValueError(f"{key}: the pre-training phase needs InitPhase.train_loader")
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    means = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        for images, _targets, _indices in phase.train_loader:
            images = images.to(phase.device, non_blocking=True)
            if phase.augment is not None:
                images = phase.augment(images)
            loss = loss_fn(images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            value = float(distributed.average_step(params, loss))  # the same on every rank
            if not math.isfinite(value):
                raise distributed.RankError(f"{key}: the pre-training phase diverged at epoch {epoch + 1} (loss "
                                            f"{value}); lower {key}.init_lr")
            optimizer.step()
            total, count = total + value * len(images), count + len(images)
        means.append(total / max(count, 1))
        log.info(f"{key} pre-training: epoch {epoch + 1}/{epochs}  loss {means[-1]:.4f}")
    return means
