"""Running `cktf` in-process as a user would, and checking its one-line errors."""

import pytest
from click.testing import CliRunner

from tests.devices import on_cpu
from transfer.cli import cli


def invoke(*args: str) -> tuple[int, str]:
    """Exit code and output of ``cktf ARGS`` (on the CPU unless ARGS name a device, see :func:`on_cpu`);
    unexpected exceptions (bugs) propagate with their traceback."""
    result = CliRunner().invoke(cli, on_cpu(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def one_line_error(code: int, output: str, *needles: str) -> None:
    """A failed command printed exactly one ``Error:`` line, without traceback, containing every needle."""
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("Error:"), output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def assert_one_line(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    """A raised user error's message is one line containing every fragment."""
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message

