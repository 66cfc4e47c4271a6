"""Stopping a run cleanly on SIGINT (Ctrl-C) and SIGTERM (what clusters send before preempting a job).

The first signal only sets a flag: the engine finishes the step it is in, writes a checkpoint atomically and
raises :class:`~transfer.errors.RunInterrupted`, which the command line turns into one line and the
conventional exit status (128 + signal number: 130 for SIGINT, 143 for SIGTERM). A second signal stops at
once (``KeyboardInterrupt``); the last complete checkpoint is still there to resume from.

Under torchrun (``WORLD_SIZE`` > 1) one stop often reaches a rank twice: a scheduler signals every process of
the job (Slurm on a time limit or ``scancel``) and torchrun forwards the SIGTERM it got itself; Ctrl-C in a
terminal reaches torchrun and every rank alike. There a second signal within :data:`REPEAT_WINDOW_S` seconds
of the first is logged and ignored, so the checkpoint is still written; a later one stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from transfer.engine.ranks import launched

log = logging.getLogger("cktf")

HANDLED = (signal.SIGINT, signal.SIGTERM)
REPEAT_WINDOW_S = 5.0  # under torchrun: a second signal this soon after the first is the same stop request


class StopRequest:
    """Context manager that records the first SIGINT/SIGTERM in :attr:`signum` instead of dying.

    Outside the main thread (where Python cannot install handlers) it does nothing and signals keep their
    default behaviour.

    Args:
        repeat_window: seconds after the first signal during which another one is ignored; ``None``:
            :data:`REPEAT_WINDOW_S` under torchrun, 0 (a second signal always stops at once) otherwise.
        clock: the monotonic clock the window is measured with.

    Example::

        with StopRequest() as stop:
            for batch in loader:
                step(batch)
                if stop.signum is not None:
                    save(); break
    """

    def __init__(self, repeat_window: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.signum: int | None = None
        self.repeat_window = (REPEAT_WINDOW_S if launched() else 0.0) if repeat_window is None else repeat_window
        self._clock = clock
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if self._clock() - self._first_at < self.repeat_window:
                log.warning(f"{name} received again within {self.repeat_window:g} s of the first: still saving "
                            "the checkpoint (send it again later to stop at once)")
                return
            raise KeyboardInterrupt
        self.signum = signum
        self._first_at = self._clock()
        later = f" more than {self.repeat_window:g} s later" if self.repeat_window > 0 else ""
        log.warning(f"{name} received: saving a checkpoint after this step (send it again{later} to stop at once)")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
