"""Stopping a run cleanly on SIGINT (Ctrl-C) and SIGTERM (what clusters send before preempting a job).

The first signal only sets a flag: the engine finishes the step it is in, writes a checkpoint atomically and
raises :class:`~transfer.errors.RunInterrupted`, which the command line turns into one line and the
conventional exit status (128 + signal number: 130 for SIGINT, 143 for SIGTERM). A second signal stops at
once (``KeyboardInterrupt``); the last complete checkpoint is still there to resume from.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger("cktf")

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager that records the first SIGINT/SIGTERM in :attr:`signum` instead of dying.

    Outside the main thread (where Python cannot install handlers) it does nothing and signals keep their
    default behaviour.

    Example::

        with StopRequest() as stop:
            for batch in loader:
                step(batch)
                if stop.signum is not None:
                    save(); break
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(f"{signal.Signals(signum).name} received: saving a checkpoint after this step "
                    "(send it again to stop at once)")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
