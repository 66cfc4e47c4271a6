"""Supervised classification: how the teacher learns the labeled source domain."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from transfer.engine import distributed
from transfer.engine.task import StepOutput, Task


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: DataLoader, device: torch.device,
                        autocast: Any) -> dict[str, float]:
    """Top-1 accuracy (``acc``), top-5 accuracy (``acc5``, with at least 5 classes) and mean cross-entropy of
    ``model`` (a callable from images to logits) on a labeled ``loader``."""
    correct = torch.zeros((), dtype=torch.long, device=device)
    correct5 = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count, classes = 0, 0
    for images, targets, _ in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        logits = logits.float()
        classes = logits.shape[1]
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
        correct += (logits.argmax(dim=1) == targets).sum()
        if classes >= 5:
            correct5 += (logits.topk(5, dim=1).indices == targets[:, None]).any(dim=1).sum()
        count += targets.numel()
    totals = distributed.all_reduce_(torch.stack([correct.double(), correct5.double(), loss_sum, torch.tensor(
        float(count), dtype=torch.float64, device=device)]))  # under torchrun: this rank's shard of the split
    correct_all, correct5_all, loss_all, count_all = totals.tolist()
    if count_all == 0:
        return {}
    metrics = {"acc": correct_all / count_all, "loss": loss_all / count_all}
    if classes >= 5:
        metrics["acc5"] = correct5_all / count_all
    return metrics


class SupervisedTask(Task):
    """Cross-entropy on labeled images (``cktf train-teacher``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, images: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> StepOutput:
        logits = self.model(images)
        loss = F.cross_entropy(logits.float(), targets)
        return StepOutput(loss)

    def compile_targets(self) -> list[nn.Module]:
        return [self.model]

    def evaluate(self, loader: DataLoader, device: torch.device, autocast: Any) -> dict[str, float]:
        return evaluate_classifier(self.model, loader, device, autocast)
