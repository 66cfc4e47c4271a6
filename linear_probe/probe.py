"""The linear probe: a linear classifier (standardised inputs by default) on frozen features, trained by the shared
engine."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from transfer.engine.frozen import freeze
from transfer.engine.task import StepOutput, Task
from transfer.tasks.supervised import evaluate_classifier


class LinearProbe(nn.Module):
    """``Linear((x - mean) / std)``; the statistics are fixed from the probe-train features.

    Standardising makes one learning rate work for every backbone (penultimate features of different
    networks differ in scale by orders of magnitude) without adding anything learnable beyond the linear map.
    Without ``mean``/``std`` the probe is a plain ``Linear(x)`` on the raw features (``probe.standardize
    false``, the published CKTF code's protocol); the buffers then hold 0 and 1 so checkpoints keep one layout.
    """

    def __init__(self, in_dim: int, num_classes: int, mean: torch.Tensor | None = None,
                 std: torch.Tensor | None = None) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (standardised probe) or neither (raw features)")
        mean = torch.zeros(in_dim) if mean is None else mean
        std = torch.ones(in_dim) if std is None else std
        self.register_buffer("mean", mean.reshape(1, -1).float())
        self.register_buffer("std", std.reshape(1, -1).float().clamp_min(1e-6))
        self.linear = nn.Linear(in_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features.float() - self.mean) / self.std)


class ProbeTask(Task):
    """Frozen ``backbone`` (identity for cached features) followed by a trainable :class:`LinearProbe`.

    Only the probe is trained and checkpointed: the backbone is :class:`~transfer.engine.frozen.Frozen`.
    """

    def __init__(self, backbone: nn.Module, probe: LinearProbe) -> None:
        super().__init__()
        self.backbone = freeze(backbone)
        self.probe = probe

    def compile_targets(self) -> list[nn.Module]:
        return [self.backbone] if any(True for _ in self.backbone.parameters()) else []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.backbone(images)
        return self.probe(features)

    def training_step(self, images: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> StepOutput:
        return StepOutput(F.cross_entropy(self(images).float(), targets))

    def evaluate(self, loader: DataLoader, device: torch.device, autocast: Any) -> dict[str, float]:
        return evaluate_classifier(self, loader, device, autocast)
