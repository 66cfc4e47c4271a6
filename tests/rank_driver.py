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
* ``CKTF_TEST_SEQUENCE=FILE``: instead of ARGS, run the commands listed in FILE (JSON, see :func:`run_sequence`)
  one after another in the same ranks, each joining and leaving the process group as a launch would. Every launch
  costs each rank a torch import (~10 s of CPU for two ranks and torchrun's agent); commands whose outcome does
  not depend on fresh processes (refusals before training, complete runs) share one launch this way.
"""

import contextlib
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


def run_command(args: list[str], rank: int) -> tuple[int, list]:
    """``cktf ARGS`` in this process: its exit code and the engines it ran (the last one holds the final state)."""
    from transfer.cli import cli
    from transfer.engine.trainer import Engine

    engines = []
    fit = Engine.fit

    def capture(self, *a, **kw):
        engines.append(self)
        return fit(self, *a, **kw)

    extra = os.environ.get("CKTF_TEST_RANK_ARGS")
    if extra and int(extra.split(":", 1)[0]) == rank:
        args = [*args, *shlex.split(extra.split(":", 1)[1])]
    Engine.fit = capture
    sys.argv = ["cktf", *args]
    code = 0
    try:
        cli.main(args, prog_name="cktf")
    except SystemExit as stop:
        code = stop.code or 0
    finally:
        Engine.fit = fit
    return code, engines


def dump_state(folder: str | Path, rank: int, engine) -> None:
    """The engine's task state and loss history as ``folder/rank<R>.safetensors``."""
    from transfer.engine.checkpoint import save_checkpoint

    save_checkpoint(Path(folder) / f"rank{rank}.safetensors",
                    {"task": engine.task.checkpoint_state(), "history": engine.history})


@contextlib.contextmanager
def output_to(folder: Path, rank: int):
    """Send this process's stdout and stderr (file descriptors 1 and 2) to ``folder/rank<R>.out`` / ``.err``."""
    folder.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(folder / f"rank{rank}.out", "w") as out, open(folder / f"rank{rank}.err", "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_sequence(path: str, rank: int) -> None:
    """Run each command of the JSON list at ``path`` in turn: ``{"args": [...], "out": DIR, "master_port": PORT,
    "rank_args": {"1": "--train.lr 0.1"}, "dump": true}``. Its output goes to ``DIR/rank<R>.out``/``.err``, its exit
    code to ``DIR/rank<R>.code``; ``rank_args`` are extra arguments for one rank, ``dump`` writes
    ``DIR/rank<R>.safetensors`` as ``CKTF_TEST_DUMP`` does. Each command meets the other ranks at its own
    ``MASTER_PORT``, where rank 0 hosts a new store: in torchrun's agent store, a process group created after the
    last one was destroyed would find that group's keys and connect to the ranks' old addresses."""
    for command in json.loads(Path(path).read_text()):
        out = Path(command["out"])
        os.environ.update(MASTER_PORT=str(command["master_port"]), TORCHELASTIC_USE_AGENT_STORE="False")
        extra = command.get("rank_args", {}).get(str(rank), "")
        with output_to(out, rank):
            code, engines = run_command(on_cpu([*command["args"], *shlex.split(extra)]), rank)
        (out / f"rank{rank}.code").write_text(str(code))
        if command.get("dump") and code == 0 and engines:
            dump_state(out, rank, engines[-1])


def main() -> None:
    rank = int(os.environ.get("RANK", "0"))
    if os.environ.get(REPORT_CUDA_ENV):
        report_cuda()
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
    if os.environ.get("CKTF_TEST_SEQUENCE"):
        run_sequence(os.environ["CKTF_TEST_SEQUENCE"], rank)
        sys.exit(0)
    mappings = _record_mappings() if os.environ.get("CKTF_TEST_SEEN") else []
    code, engines = run_command(on_cpu(sys.argv[1:]), rank)
    if os.environ.get("CKTF_TEST_SEEN"):
        _write_seen(os.environ["CKTF_TEST_SEEN"], rank, code, engines, mappings)
    dump = os.environ.get("CKTF_TEST_DUMP")
    if dump and code == 0 and engines:
        dump_state(dump, rank, engines[-1])
    sys.exit(code)


if __name__ == "__main__":
    main()
