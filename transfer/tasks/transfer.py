"""Unsupervised transfer: a frozen teacher teaches a student through pluggable loss terms.

The teacher stays in ``eval()`` and runs under ``torch.no_grad()`` — not ``inference_mode``, because its
outputs feed the trainable teacher-side projection heads, and inference tensors cannot be saved for their
backward. Its weights are not part of the transfer checkpoint (they come from the teacher's file).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from transfer.engine.task import StepOutput, Task
from transfer.losses.terms import TransferBatch
from transfer.models.taps import FeatureTaps


class TransferTask(Task):
    """Student + projection heads + memory banks, trained against a frozen teacher."""

    def __init__(self, student: FeatureTaps, teacher: FeatureTaps, terms: nn.ModuleDict,
                 weights: dict[str, float], sampler: nn.Module | None) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.terms = terms
        self.weights = dict(weights)
        self.sampler = sampler
        if sampler is None and any(getattr(t, "needs_negatives", False) for t in terms.values()):
            raise ValueError("contrastive terms need a negative sampler")

    def train(self, mode: bool = True) -> TransferTask:
        super().train(mode)
        self.teacher.eval()
        return self

    def compile_targets(self) -> list[nn.Module]:
        return [self.student, self.teacher]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("teacher.")]

    def training_step(self, images: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> StepOutput:
        with torch.no_grad():
            teacher = self.teacher(images)
        student = self.student(images)
        negatives = self.sampler(indices) if self.sampler is not None else None
        batch = TransferBatch(student, teacher, indices, targets, negatives)
        total = images.new_zeros((), dtype=torch.float32)
        logged: dict[str, torch.Tensor] = {}
        for name, term in self.terms.items():
            losses = term(batch)
            total = total + self.weights[name] * sum(losses.values())
            logged.update({key: value.detach() for key, value in losses.items()})
            logged.update(term.diagnostics())  # logged, never added to the loss
        return StepOutput(total, logged)

    @torch.no_grad()
    def fill_banks(self, loader: DataLoader, device: torch.device) -> None:
        """Fill every memory bank with the networks' initial embeddings of each item (``loss.bank_init embed``).

        CRD starts its banks from uniform noise and writes each row once per epoch with momentum 0.5, so after
        k epochs a fraction 0.5^k of every positive is still noise — most of a short schedule. Filled banks
        give meaningful positives and negatives from the first step: the teacher side starts as a random
        projection of the teacher's features, which preserves their geometry.
        """
        was_training = self.training
        self.eval()
        for images, targets, indices in loader:
            images, indices = images.to(device), indices.to(device)
            batch = TransferBatch(self.student(images), self.teacher(images), indices, targets, None)
            for term in self.terms.values():
                term.fill_banks(batch)
        self.train(was_training)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise RuntimeError(f"transfer state mismatch: missing {missing[:3]}, unexpected {list(unexpected)[:3]}")
