"""User-facing errors.

Anything a user can cause (a bad option, a missing file, a malformed checkpoint)
is raised as :class:`CKTFError` with a one-line message that names the file or
option and says what was expected. The CLI prints that line and exits non-zero;
any other exception is a bug and keeps its traceback.
"""


class CKTFError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


class RunInterrupted(Exception):
    """A run stopped on SIGINT/SIGTERM after writing a checkpoint it can be resumed from.

    Args:
        signum: the signal that stopped it.
        checkpoint: the checkpoint written (``last.safetensors``).
        epoch: the epoch in progress (1-based).
        batch: batches of that epoch completed and saved.
    """

    def __init__(self, signum: int, checkpoint: object, epoch: int, batch: int) -> None:
        super().__init__(f"stopped by signal {signum} at epoch {epoch}, batch {batch}; saved {checkpoint}")
        self.signum, self.checkpoint, self.epoch, self.batch = signum, checkpoint, epoch, batch

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
