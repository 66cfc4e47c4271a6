"""Optimizer and learning-rate schedule from a :class:`TrainConfig`.

The schedule is a pure function of the epoch, so resuming needs no scheduler
state beyond the epoch counter stored in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from transfer.config import TrainConfig


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """Multiplier of the base learning rate during 0-based ``epoch``."""
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    return cfg.lr_decay ** sum(1 for m in cfg.milestones if epoch >= m)


def build_optimizer(cfg: TrainConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with (Nesterov) momentum and weight decay, as in the CKTF/CRD papers."""
    return torch.optim.SGD(list(params), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def apply_lr(cfg: TrainConfig, optimizer: torch.optim.Optimizer, epoch: int) -> float:
    """Set every param group's lr for ``epoch`` and return it."""
    lr = cfg.lr * lr_factor(cfg, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
