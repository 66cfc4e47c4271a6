"""User-facing errors.

Anything a user can cause (a bad option, a missing file, a malformed checkpoint)
is raised as :class:`CKTFError` with a one-line message that names the file or
option and says what was expected. The CLI prints that line and exits non-zero;
any other exception is a bug and keeps its traceback.
"""


def printable(text: object) -> str:
    """``text`` on one line: line breaks and other control characters escaped (``\\n``), letters kept."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


class CKTFError(Exception):
    """An error caused by the user's input, reported as one line without a traceback.

    The message is kept on one line whatever it quotes (a config key or a file name with a line break in it
    is shown escaped).
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(printable(message))


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
