"""Run ``cktf ARGS`` in this process and send it SIGNAL when the N-th batch is loaded.

Usage: ``python -m tests.signal_driver SIGTERM 17 train-teacher --config …`` (N = 0: no signal). Batches of
every loader count (training and evaluation, loaded in the main process or by workers), so N lands anywhere in
a run, as a scheduler's SIGTERM, a user's Ctrl-C or a SIGKILL would. :func:`signal_at` does the same for a run
inside the calling process. ARGS run on the CPU unless they name ``--train.device``, and
``CKTF_TEST_REPORT_CUDA=1`` makes torch report a CUDA device (see ``tests.devices``).
"""

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

from torch.utils.data import dataloader

from tests.devices import REPORT_CUDA_ENV, on_cpu, report_cuda

ITERATORS = (dataloader._SingleProcessDataLoaderIter, dataloader._MultiProcessingDataLoaderIter)


@contextlib.contextmanager
def signal_at(at: int, signum: int) -> Iterator[None]:
    """Send ``signum`` to this process when the ``at``-th batch of any DataLoader is loaded (0: never)."""
    loaded = 0
    originals = [iterator._next_data for iterator in ITERATORS]

    def counting(original):
        def next_data(self):
            nonlocal loaded
            loaded += 1
            if loaded == at:
                os.kill(os.getpid(), signum)
            return original(self)
        return next_data

    for iterator, original in zip(ITERATORS, originals, strict=True):
        iterator._next_data = counting(original)
    try:
        yield
    finally:
        for iterator, original in zip(ITERATORS, originals, strict=True):
            iterator._next_data = original


def main() -> None:
    signum, at, args = getattr(signal, sys.argv[1]), int(sys.argv[2]), on_cpu(sys.argv[3:])
    if os.environ.get(REPORT_CUDA_ENV):
        report_cuda()
    from transfer.cli import cli

    sys.argv = ["cktf", *args]
    with signal_at(at, signum):
        cli.main(args, prog_name="cktf")


if __name__ == "__main__":
    main()
