"""Preemption as a cluster or a user causes it: SIGINT, SIGTERM or SIGKILL at a random batch of a real
`cktf` process, then `--resume` — the run must end bit-identical to an uninterrupted one."""

import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import invoke
from tests.data_fixtures import write_fashion_idx
from tests.devices import REPORT_CUDA_ENV
from transfer.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs/fashion_split"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupts")
    write_fashion_idx(root / "fashion", n_train=400, n_test=60)
    code, out = invoke("train-teacher", "--config", str(CONFIGS / "teacher.yaml"), "--data.root", str(root / "fashion"),
                       "--log.root", str(root / "runs"), "--log.name", "teacher", "--model.name", "resnet8",
                       "--train.epochs", "0", "--log.tensorboard", "false")
    assert code == 0, out
    return root


def stage_args(data: Path, stage: str, runs: Path) -> list[str]:
    common = ["--data.root", str(data / "fashion"), "--log.root", str(runs), "--log.name", "run",
              "--train.batch_size", "16", "--train.threads", "1", "--train.checkpoint_every", "3"]
    if stage == "train-teacher":
        return ["train-teacher", "--config", str(CONFIGS / "teacher.yaml"), *common, "--model.name", "resnet8",
                "--train.epochs", "3", "--log.tensorboard", "false"]
    return ["transfer", "--config", str(CONFIGS / "cktf.yaml"), *common, "--teacher",
            str(data / "runs/teacher/best.safetensors"), "--train.epochs", "2", "--sampler.num_negatives", "64"]


def cktf(fast: Path, signame: str, at: int, args: list[str]) -> subprocess.CompletedProcess:
    """``python -m tests.signal_driver SIGNAME AT ARGS`` as a process of its own, forked without a torch import
    (``fast`` is the ``cktf_fast`` fixture, tests/cktf_forkserver.py)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), REPORT_CUDA_ENV: "1"}  # on the CPU although CUDA is reported
    return subprocess.run([str(fast), "-m", "tests.signal_driver", signame, str(at), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def final_state(run: Path) -> tuple[dict, list]:
    state = load_checkpoint(run / "last.safetensors").state
    history = [{k: v for k, v in row.items() if not k.endswith("per_s")} for row in state["history"]]
    return state["task"], history


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory, cktf_fast):
    states = {}
    for stage in ("train-teacher", "transfer"):
        runs = tmp_path_factory.mktemp(f"straight_{stage}")
        done = cktf(cktf_fast, "SIGTERM", 0, stage_args(data, stage, runs))
        assert done.returncode == 0, done.stderr
        states[stage] = final_state(runs / "run")
    return states


@pytest.mark.slow(reason="a cktf process per run (2 uninterrupted, then each stopped and resumed), compared bit "
                         "for bit over 2-3 epochs")
@pytest.mark.parametrize("stage,signame", [("train-teacher", "SIGINT"), ("train-teacher", "SIGTERM"),
                                           ("train-teacher", "SIGKILL"), ("transfer", "SIGTERM"),
                                           ("transfer", "SIGKILL")])
def test_signal_then_resume_equals_uninterrupted(data, uninterrupted, tmp_path, cktf_fast, stage, signame):
    batches = 3 * (11 + 2) if stage == "train-teacher" else 2 * 12
    at = random.Random(f"{stage}{signame}").randint(2, batches - 2)
    args = stage_args(data, stage, tmp_path)
    stopped = cktf(cktf_fast, signame, at, args)
    signum = getattr(signal, signame)
    if signame == "SIGKILL":
        assert stopped.returncode == -signum
    else:
        assert stopped.returncode == 128 + signum, (at, stopped.stderr)
        last = stopped.stderr.strip().splitlines()[-1]
        assert last.startswith(f"stopped by {signame}") and "Traceback" not in stopped.stderr, stopped.stderr
        assert "continue with: cktf " in last and last.endswith("--resume")
        saved = load_checkpoint(tmp_path / "run/last.safetensors").state
        assert saved["step"] > 0
    resumed = cktf(cktf_fast, "SIGTERM", 0, [*args, "--resume"])
    assert resumed.returncode == 0, (at, resumed.stderr)
    if signame != "SIGKILL":
        epoch, batch = last.split(" at epoch ")[1].split(":")[0].split(", batch ")
        where = f"batch {batch} of epoch {epoch}" if batch != "0" else f"epoch {int(epoch) - 1}"
        assert f"resuming {tmp_path / 'run'} after {where}" in resumed.stderr, (last, resumed.stderr)
    task, history = final_state(tmp_path / "run")
    want_task, want_history = uninterrupted[stage]
    assert history == want_history, at
    assert task.keys() == want_task.keys()
    for key in task:
        assert torch.equal(task[key], want_task[key]), (at, key)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("torchrun", [True, False])
def test_a_repeated_signal_under_torchrun_keeps_the_save_only_within_the_window(monkeypatch, torchrun):
    """Under torchrun a scheduler and torchrun each send SIGTERM: a second signal within REPEAT_WINDOW_S of the
    first is ignored, a later one (or any second one in a single process) stops at once."""
    from transfer.engine.signals import REPEAT_WINDOW_S, StopRequest

    if torchrun:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    clock = FakeClock()
    with StopRequest(clock=clock) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        clock.now += REPEAT_WINDOW_S - 0.5
        if torchrun:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum == signal.SIGTERM
            clock.now += 1.0
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert REPEAT_WINDOW_S <= 10
