"""Run ``cktf ARGS`` as one torchrun rank (or as a plain process), with test instrumentation set by env vars.

Usage: ``torchrun --nproc_per_node 2 -m tests.rank_driver transfer --config …`` (or ``python -m tests.rank_driver …``)

* ``CKTF_TEST_DUMP=DIR``: after the command, write this rank's task state and loss history to
  ``DIR/rank<R>.safetensors`` (a cktf checkpoint), to compare ranks with each other or with one process.
* ``CKTF_TEST_SIGNAL=SIGKILL:17:1``: rank 1 sends itself SIGKILL when its 17th batch is loaded.
* ``CKTF_TEST_RANK_ARGS=1:--train.lr 0.1``: extra arguments for rank 1 only (ranks that disagree).
* ``CKTF_TEST_REPORT_CUDA=1``: torch reports a CUDA device (``tests.devices.report_cuda``), so a run
  that completes shows it chose the CPU as it would on a GPU machine. ARGS run on the CPU unless they name
  ``--train.device`` (``tests.devices.on_cpu``).
* ``CKTF_TEST_COMPARABLE=1``: make one process with batch B comparable to W ranks with B/W each: the student
  without BatchNorm (BatchNorm couples a rank's samples; SyncBatchNorm needs CUDA), no random augmentation, and
  negatives that depend on the anchor only (per-rank RNG draws differ with the world size by design).
"""

import os
import shlex
import signal
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import dataloader

from tests.devices import REPORT_CUDA_ENV, on_cpu, report_cuda


def _signal_at(spec: str, rank: int) -> None:
    name, at, who = spec.split(":")
    if int(who) != rank:
        return
    original = dataloader._SingleProcessDataLoaderIter._next_data
    loaded = 0

    def next_data(self):
        nonlocal loaded
        loaded += 1
        if loaded == int(at):
            os.kill(os.getpid(), getattr(signal, name))
        return original(self)

    dataloader._SingleProcessDataLoaderIter._next_data = next_data


class AnchorKeyedNegatives(nn.Module):
    """Per-anchor negatives that are a fixed function of the anchor's dataset index."""

    def __init__(self, num_items: int, num_negatives: int) -> None:
        super().__init__()
        self.num_items, self.num_negatives = num_items, num_negatives

    def forward(self, anchors: torch.Tensor) -> torch.Tensor:
        k = torch.arange(self.num_negatives, device=anchors.device)
        return (anchors.long()[:, None] * 7919 + k[None] * 104729 + 1) % self.num_items


def _comparable() -> None:
    from transfer.data.batch_augment import build_batch_transform
    from transfer.data.transforms import build_decode_transform
    from transfer.stages import transfer as stage

    build_model = stage.build_model

    def without_batchnorm(*args, **kwargs):
        model = build_model(*args, **kwargs)
        for module in list(model.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    setattr(module, name, nn.Identity())
        return model

    stage.build_model = without_batchnorm
    stage.train_pipeline = lambda cfg: (build_decode_transform(cfg.name, cfg.image_size), build_batch_transform(
        cfg.name, train=False, image_size=cfg.image_size, mean=cfg.mean, std=cfg.std))
    stage.build_sampler = lambda kind, num_items, num_negatives, *a, **kw: AnchorKeyedNegatives(num_items,
                                                                                                num_negatives)


def main() -> None:
    rank = int(os.environ.get("RANK", "0"))
    args = on_cpu(sys.argv[1:])
    if os.environ.get(REPORT_CUDA_ENV):
        report_cuda()
    extra = os.environ.get("CKTF_TEST_RANK_ARGS")
    if extra and int(extra.split(":", 1)[0]) == rank:
        args += shlex.split(extra.split(":", 1)[1])
    if os.environ.get("CKTF_TEST_SIGNAL"):
        _signal_at(os.environ["CKTF_TEST_SIGNAL"], rank)
    if os.environ.get("CKTF_TEST_COMPARABLE"):
        _comparable()
    from transfer.engine.checkpoint import save_checkpoint
    from transfer.engine.trainer import Engine

    engines = []
    fit = Engine.fit

    def capture(self, *a, **kw):
        engines.append(self)
        return fit(self, *a, **kw)

    Engine.fit = capture
    from transfer.cli import cli

    sys.argv = ["cktf", *args]
    code = 0
    try:
        cli.main(args, prog_name="cktf")
    except SystemExit as stop:
        code = stop.code or 0
    dump = os.environ.get("CKTF_TEST_DUMP")
    if dump and code == 0 and engines:
        engine = engines[-1]
        save_checkpoint(Path(dump) / f"rank{rank}.safetensors",
                        {"task": engine.task.checkpoint_state(), "history": engine.history})
    sys.exit(code)


if __name__ == "__main__":
    main()
