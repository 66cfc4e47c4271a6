"""Run ``cktf ARGS`` in this process and send it SIGNAL when the N-th batch is loaded.

Usage: ``python -m tests.signal_driver SIGTERM 17 train-teacher --config …`` (N = 0: no signal). Batches of
every loader count (training and evaluation), so N lands anywhere in a run, as a scheduler's SIGTERM, a
user's Ctrl-C or a SIGKILL would. ARGS run on the CPU unless they name ``--train.device``, and
``CKTF_TEST_REPORT_CUDA=1`` makes torch report a CUDA device (see ``tests.devices``).
"""

import os
import signal
import sys

from torch.utils.data import dataloader

from tests.devices import REPORT_CUDA_ENV, on_cpu, report_cuda


def main() -> None:
    signum, at, args = getattr(signal, sys.argv[1]), int(sys.argv[2]), on_cpu(sys.argv[3:])
    if os.environ.get(REPORT_CUDA_ENV):
        report_cuda()
    original = dataloader._SingleProcessDataLoaderIter._next_data
    loaded = 0

    def next_data(self):
        nonlocal loaded
        loaded += 1
        if loaded == at:
            os.kill(os.getpid(), signum)
        return original(self)

    dataloader._SingleProcessDataLoaderIter._next_data = next_data
    from transfer.cli import cli

    sys.argv = ["cktf", *args]
    cli.main(args, prog_name="cktf")


if __name__ == "__main__":
    main()
