"""Which device the suite's runs use: the CPU, also on a machine with a GPU (no pytest import: the drivers and
benchmarks/gpu_chain.py use this on machines without pytest)."""

from collections.abc import Callable, Sequence

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
