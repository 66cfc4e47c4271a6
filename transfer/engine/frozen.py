"""A network that never trains: the one place where freezing is defined.

Frozen means three things, and they belong together: no gradients (``requires_grad`` off, so no optimizer
ever sees the weights), evaluation mode pinned (BatchNorm statistics and dropout never move, whatever
``train()`` a parent calls), and no copy in a task's checkpoint (:meth:`transfer.engine.task.Task.checkpoint_state`
leaves out everything under a :class:`Frozen` module; its weights come from their own file). The transfer
teacher and the probed backbone are frozen this way.

Example::

    teacher = Frozen(FeatureTaps(model, spec))
    teacher.train()          # stays in eval mode
    teacher(images)          # the wrapped module's forward
"""

from __future__ import annotations

from typing import Any

from torch import nn


class Frozen(nn.Module):
    """Wraps ``module``: gradients off, always in eval mode, left out of task checkpoints.

    Args:
        module: the network to freeze (its parameters are switched to ``requires_grad=False`` in place).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.module if isinstance(module, Frozen) else module
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Frozen:
        """Always evaluation mode, whatever ``mode`` is asked (a parent's ``train()`` reaches here)."""
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def freeze(module: nn.Module) -> Frozen:
    """``module`` as a :class:`Frozen` network (itself when it already is one)."""
    return module if isinstance(module, Frozen) else Frozen(module)


def frozen_prefixes(root: nn.Module) -> tuple[str, ...]:
    """``state_dict`` key prefixes (``"teacher."``) of every :class:`Frozen` module below ``root``."""
    return tuple(f"{name}." for name, module in root.named_modules() if name and isinstance(module, Frozen))
