"""The contract between the engine and a method.

A :class:`Task` owns everything trainable and stateful of one stage (the
network, projection heads, memory banks as buffers) and turns a batch into a
loss. Networks it only reads (a teacher, a probed backbone) are wrapped in
:class:`~transfer.engine.frozen.Frozen`: never trained, always in eval mode,
not in its checkpoints. The engine owns the loop, optimisation, logging and
checkpoints, so
teacher training, KD/CRD/CKTF transfer and probing share one loop and differ
only in their task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from transfer.engine.frozen import frozen_prefixes


@dataclass
class StepOutput:
    """A training step's loss plus detached scalar terms to log (as ``train/<name>``)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class Task(nn.Module):
    """Base class of everything the engine trains."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters handed to the optimizer (default: all that require grad)."""
        return [p for p in self.parameters() if p.requires_grad]

    def training_step(self, images: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> StepOutput:
        raise NotImplementedError

    def compile_targets(self) -> list[nn.Module]:
        """Networks whose forward ``train.compile`` compiles (default: none).

        Only the networks: they are the fixed-shape bulk of a step, while the loss code (memory-bank writes,
        host syncs, custom autograd functions) would break a compiled graph into pieces for no gain.
        """
        return []

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores of this task: the ``state_dict`` without its ``Frozen`` modules."""
        frozen = frozen_prefixes(self)
        return {k: v for k, v in self.state_dict().items() if not (frozen and k.startswith(frozen))}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`checkpoint_state` output: every key must match, frozen modules aside."""
        frozen = frozen_prefixes(self)
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (frozen and k.startswith(frozen))]
        if missing or unexpected:
            raise RuntimeError(f"{type(self).__name__} state mismatch: missing {missing[:3]}, unexpected "
                               f"{list(unexpected)[:3]}")

    @torch.no_grad()
    def evaluate(self, loader: DataLoader, device: torch.device, autocast: Any) -> dict[str, float]:
        """Metrics on ``loader`` (e.g. ``{"acc": …}``); the engine logs them as ``<split>/<name>``."""
        return {}
