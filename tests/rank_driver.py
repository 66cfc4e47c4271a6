"""Run ``cktf ARGS`` as one torchrun rank (or as a plain process), with test instrumentation set by env vars.

Usage: ``torchrun --nproc_per_node 2 -m tests.rank_driver transfer --config …`` (or ``python -m tests.rank_driver …``)

* ``CKTF_TEST_DUMP=DIR``: after the command, write this rank's task state and loss history to
  ``DIR/rank<R>.safetensors`` (a cktf checkpoint), to compare ranks with each other or with one process.
* ``CKTF_TEST_SIGNAL=SIGKILL:17:1``: rank 1 sends itself SIGKILL when its 17th batch is loaded
  (``SIGTERM:17:1:2``: two SIGTERMs at once, as a scheduler and torchrun both send one).
* ``CKTF_TEST_SAVE_DELAY=3``: rank 0 sleeps 3 s before writing each checkpoint (slow storage).
* ``CKTF_TEST_SEEN=DIR``: when the command ends, write ``DIR/rank<R>.json``: its exit code, the engine's step,
  the step of ``last.safetensors`` as this rank finds it on disk at that moment, and every teacher-block choice
  of the layer mapping (``mappings``).
* ``CKTF_TEST_NAN_MSE=1:3``: rank 1's 3rd call of ``torch.nn.functional.mse_loss`` returns NaN.
* ``CKTF_TEST_SIMILARITY_NOISE=1``: the per-batch layer mapping's similarities get seeded noise, different on
  every rank and call and larger than their gaps (sub-batches that would each pick other blocks).
* ``CKTF_TEST_RANK_ARGS=1:--train.lr 0.1``: extra arguments for rank 1 only (ranks that disagree).
* ``CKTF_TEST_REPORT_CUDA=1``: torch reports a CUDA device (``tests.devices.report_cuda``), so a run
  that completes shows it chose the CPU as it would on a GPU machine. ARGS run on the CPU unless they name
  ``--train.device`` (``tests.devices.on_cpu``).
* ``CKTF_TEST_COMPARABLE=1``: make one process with batch B comparable to W ranks with B/W each: the student
  without BatchNorm (BatchNorm couples a rank's samples; SyncBatchNorm needs CUDA), no random augmentation, and
  negatives that depend on the anchor only (per-rank RNG draws differ with the world size by design).
"""

import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import dataloader

from tests.devices import REPORT_CUDA_ENV, on_cpu, report_cuda


def _signal_at(spec: str, rank: int) -> None:
    name, at, who, *times = spec.split(":")
    if int(who) != rank:
        return
    original = dataloader._SingleProcessDataLoaderIter._next_data
    loaded = 0

    def next_data(self):
        nonlocal loaded
        loaded += 1
        if loaded == int(at):
            for _ in range(int(times[0]) if times else 1):
                os.kill(os.getpid(), getattr(signal, name))
        return original(self)

    dataloader._SingleProcessDataLoaderIter._next_data = next_data


def _slow_saves(seconds: float, rank: int) -> None:
    if rank != 0:
        return
    from transfer.engine import trainer

    save = trainer.save_checkpoint

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return save(*args, **kwargs)

    trainer.save_checkpoint = slow


def _nan_mse(spec: str, rank: int) -> None:
    who, at = spec.split(":")
    if int(who) != rank:
        return
    original = F.mse_loss
    calls = 0

    def mse_loss(*args, **kwargs):
        nonlocal calls
        calls += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls == int(at) else loss

    F.mse_loss = mse_loss


def _record_mappings() -> list:
    from transfer.losses.layer_mapping import LayerMapper

    choices: list = []
    forward = LayerMapper.forward

    def recording(self, *args, **kwargs):
        choice = forward(self, *args, **kwargs)
        choices.append(list(choice))
        return choice

    LayerMapper.forward = recording
    return choices


def _similarity_noise(rank: int) -> None:
    from transfer.losses import layer_mapping

    cosine = layer_mapping.batch_map_cosine
    generator = torch.Generator().manual_seed(1000 + rank)

    def noisy(student, teacher):
        return cosine(student, teacher) + 10 * torch.rand((), generator=generator)

    layer_mapping.batch_map_cosine = noisy


def _write_seen(folder: str, rank: int, code: int, engines: list, mappings: list) -> None:
    from transfer.engine.checkpoint import load_checkpoint

    step = saved = None
    if engines:
        step = engines[-1].step
        last = engines[-1].run.last
        saved = int(load_checkpoint(last).state["step"]) if last.is_file() else None
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps({"code": code, "step": step, "saved_step": saved,
                                                               "mappings": mappings}))


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
    if os.environ.get("CKTF_TEST_SAVE_DELAY"):
        _slow_saves(float(os.environ["CKTF_TEST_SAVE_DELAY"]), rank)
    if os.environ.get("CKTF_TEST_NAN_MSE"):
        _nan_mse(os.environ["CKTF_TEST_NAN_MSE"], rank)
    if os.environ.get("CKTF_TEST_SIMILARITY_NOISE"):
        _similarity_noise(rank)
    mappings = _record_mappings() if os.environ.get("CKTF_TEST_SEEN") else []
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
    if os.environ.get("CKTF_TEST_SEEN"):
        _write_seen(os.environ["CKTF_TEST_SEEN"], rank, code, engines, mappings)
    dump = os.environ.get("CKTF_TEST_DUMP")
    if dump and code == 0 and engines:
        engine = engines[-1]
        save_checkpoint(Path(dump) / f"rank{rank}.safetensors",
                        {"task": engine.task.checkpoint_state(), "history": engine.history})
    sys.exit(code)


if __name__ == "__main__":
    main()
