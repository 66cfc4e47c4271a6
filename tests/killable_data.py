"""An in-memory dataset that can simulate a kill mid-epoch, for the exact-resume tests."""

import torch
from torch.utils.data import Dataset


class KillableDataset(Dataset):
    """``(x[i] + noise·N(0, 1), target, i)`` items; the noise comes from the global torch RNG, as augmentation
    does, so a resumed run only matches an uninterrupted one if the engine reseeds it exactly. The
    ``crash_at``-th item read raises ``KeyboardInterrupt`` (what a SIGINT/kill leaves behind)."""

    def __init__(self, x: torch.Tensor, targets: torch.Tensor, noise: float = 0.1,
                 crash_at: int | None = None) -> None:
        self.x, self.targets, self.noise = x, targets, noise
        self.crash_at = crash_at
        self.calls = 0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise KeyboardInterrupt("simulated kill")
        return self.x[i] + self.noise * torch.randn(self.x[i].shape), int(self.targets[i]), i
