"""Tasks: what the engine trains in each stage (supervised teacher, transfer methods, probes)."""

from transfer.tasks.supervised import SupervisedTask, evaluate_classifier

__all__ = ["SupervisedTask", "evaluate_classifier"]

