"""Running `cktf` in-process as a user would, and checking its one-line errors."""

from collections.abc import Callable, Sequence

import pytest
from click.testing import CliRunner

from transfer.cli import cli

# Commands that train or evaluate and so take ``--train.device``.
DEVICE_COMMANDS = frozenset({"train-teacher", "transfer", "probe", "demo"})


def on_cpu(args: Sequence[str]) -> list[str]:
    """``args`` of a ``cktf`` command line with ``--train.device cpu`` added unless it names a device itself.

    The suite's runs mean the CPU: their texts ("gloo", "| cpu, fp32"), two ranks on one machine and their
    bit-for-bit comparisons were written for it, while ``train.device`` defaults to ``auto``, which would move
    them onto a GPU where one exists. A test that means ``auto`` or CUDA says so with ``--train.device``.
    """
    args = list(args)
    command = next((a for a in args if not a.startswith("-")), None)
    if command not in DEVICE_COMMANDS or any(a.startswith("--train.device") for a in args):
        return args
    return [*args, "--train.device", "cpu"]


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


REPORT_CUDA_ENV = "CKTF_TEST_REPORT_CUDA"


def report_cuda(patch: Callable[[object, str, object], None] = setattr) -> None:
    """Make torch report one CUDA device on a machine without one (a no-op where CUDA is real).

    ``auto`` then resolves to CUDA as on a GPU machine, and anything that touches CUDA fails ("Found no NVIDIA
    driver"), so a run that completes under it shows that its code path chose the CPU. ``patch`` is
    ``monkeypatch.setattr`` in a test; the drivers (tests/rank_driver.py, tests/signal_driver.py) call it
    with the default when ``$CKTF_TEST_REPORT_CUDA`` is set.
    """
    import torch

    if torch.cuda.is_available():
        return
    patch(torch.cuda, "is_available", lambda: True)
    patch(torch.cuda, "device_count", lambda: 1)
