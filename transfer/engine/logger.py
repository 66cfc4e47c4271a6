"""Run logging: TensorBoard scalars, a progress bar (or, off a terminal, a progress line every
``log.progress_every`` seconds) and one summary line per epoch."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("cktf")


@contextlib.contextmanager
def phase(what: str, after_s: float = 2.0) -> Iterator[None]:
    """Say that ``what`` (a step before or between epochs: filling banks, extracting features) is running once it
    has taken ``after_s`` seconds, and how long it took, so that a long silent wait is never mistaken for a hang;
    a quick step prints nothing. Rank 0 prints under torchrun."""
    from transfer.engine.ranks import env_rank

    if env_rank() != 0:
        yield
        return
    start = time.perf_counter()
    timer = threading.Timer(after_s, log.info, args=(f"{what} …",))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    elapsed = time.perf_counter() - start
    if elapsed >= after_s:
        log.info(f"{what}: done in {elapsed:.1f} s")


class RunLogger:
    """Writes scalars to TensorBoard under the run directory (if enabled) and prints epoch summaries."""

    def __init__(self, run_path: Path, *, tensorboard: bool = True, progress: bool = True,
                 purge_step: int | None = None, tag_map: Callable[[str], str | None] | None = None,
                 progress_every: float = 0.0) -> None:
        self.progress = progress and sys.stderr.isatty()
        self.progress_every = progress_every
        self.tag_map = tag_map or (lambda tag: tag)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_path), purge_step=purge_step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            mapped = self.tag_map(tag)
            if mapped is not None:  # a stage may leave a quantity out (None)
                self.writer.add_scalar(mapped, value, step)

    def bar(self, iterable: Iterable, total: int, desc: str, initial: int = 0) -> Any:
        return tqdm(iterable, total=total, desc=desc, initial=initial, disable=not self.progress, leave=False,
                    dynamic_ncols=True)

    def lines_due(self, seconds_since_last: float) -> bool:
        """Whether a progress line is due: no bar is shown and ``progress_every`` seconds have passed."""
        return not self.progress and self.progress_every > 0 and seconds_since_last >= self.progress_every

    def info(self, message: str) -> None:
        log.info(message)

    def warning(self, message: str) -> None:
        log.warning(message)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
