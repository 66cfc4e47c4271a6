"""User-facing errors.

Anything a user can cause (a bad option, a missing file, a malformed checkpoint)
is raised as :class:`CKTFError` with a one-line message that names the file or
option and says what was expected. The CLI prints that line and exits non-zero;
any other exception is a bug and keeps its traceback.
"""


class CKTFError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""
