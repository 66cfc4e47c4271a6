"""Which torchrun rank this process is, from the environment alone (no torch import: the command line asks
before it knows whether it will train, and ``cktf --help`` must stay fast)."""

from __future__ import annotations

import os


def launched() -> bool:
    """Whether torchrun started this process as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def env_rank() -> int:
    """This process's rank as torchrun announced it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0
