"""Unsupervised transfer: a frozen teacher teaches a student through pluggable loss terms.

The teacher is frozen (:class:`~transfer.engine.frozen.Frozen`: eval mode, no gradients, not in the transfer
checkpoint: its weights come from the teacher's file) and runs under ``torch.no_grad()`` — not
``inference_mode``, because its outputs feed the trainable teacher-side projection heads, and inference tensors
cannot be saved for their backward. The task
knows nothing about particular terms: it draws negatives when a term declares ``negatives``, checks targets
when one declares ``labels``, sums the weighted losses and runs the declared initialisation phases.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from transfer.engine import distributed
from transfer.engine.frozen import freeze
from transfer.engine.logger import phase as logged_phase
from transfer.engine.task import StepOutput, Task
from transfer.errors import CKTFError
from transfer.losses.terms import InitPhase, TransferBatch
from transfer.models.taps import FeatureTaps
from transfer.tasks.supervised import evaluate_classifier


class TransferTask(Task):
    """Student + the terms' modules (projection heads, memory banks, …), trained against a frozen teacher.

    Args:
        student: the tapped student network (trained).
        teacher: the tapped teacher network (frozen here).
        terms: name → :class:`~transfer.losses.terms.LossTerm`, e.g. from
            :func:`~transfer.losses.terms.build_terms`.
        weights: name → weight of each term.
        sampler: the negative sampler; required when a term declares ``negatives``.
    """

    def __init__(self, student: FeatureTaps, teacher: nn.Module, terms: nn.ModuleDict,
                 weights: dict[str, float], sampler: nn.Module | None) -> None:
        super().__init__()
        self.student = student
        self.teacher = freeze(teacher)
        self.terms = terms
        self.weights = dict(weights)
        self.sampler = sampler
        if sampler is None and any(term.needs.negatives for term in terms.values()):
            raise ValueError("a term declares negatives but no negative sampler was given")
        self._needs_labels = [name for name, term in terms.items() if term.needs.labels]

    def compile_targets(self) -> list[nn.Module]:
        return [self.student, self.teacher]

    def evaluate(self, loader: DataLoader, device: torch.device, autocast: Any) -> dict[str, float]:
        """The student's classifier on a labeled split (compression with labels: top-1, top-5, loss)."""
        return evaluate_classifier(lambda images: self.student(images).logits, loader, device, autocast)

    def objective(self, batch: TransferBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(Σ weight · Σ losses, logged scalars)`` of every term on ``batch``; diagnostics never enter the sum."""
        if self._needs_labels and bool((batch.targets < 0).any()):
            raise CKTFError(f"loss.terms.{self._needs_labels[0]} needs labels, but this batch has unlabeled "
                            "samples (target -1); leave the term out for unlabeled transfer")
        total = batch.student.logits.new_zeros((), dtype=torch.float32)
        logged: dict[str, torch.Tensor] = {}
        for name, term in self.terms.items():
            losses = term(batch)
            total = total + self.weights[name] * sum(losses.values())
            logged.update({key: value.detach() for key, value in losses.items()})
            logged.update(term.diagnostics())
        return total, logged

    def training_step(self, images: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> StepOutput:
        with torch.no_grad():
            teacher = self.teacher(images)
        student = self.student(images)
        negatives = self.sampler(indices) if self.sampler is not None else None
        total, logged = self.objective(TransferBatch(student, teacher, indices, targets, negatives))
        return StepOutput(total, logged)

    def init_phases(self, eval_loader: DataLoader, device: torch.device, train_loader: DataLoader | None = None,
                    augment=None) -> list[str]:
        """Run the initialisation phase of every term that declares one, in order; returns their names.

        The whole task is in eval mode meanwhile (restored afterwards). For example the contrastive terms
        under ``loss.nce.bank_init embed`` fill their memory banks with the networks' initial embeddings of
        every item: CRD starts its banks from uniform noise and writes each row once per epoch with momentum
        0.5, so after k epochs a fraction 0.5^k of every positive is still noise — most of a short schedule.
        Under torchrun a phase that trains synchronises its own steps (:mod:`transfer.losses.init_training`);
        the BatchNorm statistics it moved are averaged across ranks at the end.
        """
        phase = InitPhase(self.student, self.teacher, device, eval_loader, train_loader, augment)
        ran = []
        was_training = self.training
        self.eval()
        try:
            for name, term in self.terms.items():
                if term.needs.init_phase:
                    with logged_phase(f"loss.terms.{name}: initialisation phase ({len(eval_loader.dataset)} images)"):
                        term.init_phase(phase)
                    ran.append(name)
            self.train()  # under torchrun: each rank's BatchNorm statistics moved on its shard (frozen ones did not)
            distributed.average_batchnorm(self)
        finally:
            self.train(was_training)
        return ran

    def metadata(self) -> dict[str, str]:
        """Checkpoint metadata contributed by the terms (e.g. the layer mapping chosen)."""
        out: dict[str, str] = {}
        for term in self.terms.values():
            out.update(term.metadata())
        return out
