"""The suite's runs stay on the CPU on a GPU machine too (``train.device`` defaults to ``auto``).

Torch is made to report a CUDA device (``tests.devices.report_cuda``); on this machine anything that
then touches CUDA fails, so a run that completes chose the CPU as it would on a GPU machine. The torchrun and
signal drivers run every launch of tests/test_distributed.py and tests/test_interrupts.py this way.
"""

from pathlib import Path

import pytest

from tests.cli_helpers import invoke
from tests.data_fixtures import write_fashion_idx
from tests.devices import on_cpu, report_cuda
from transfer.engine.runtime import resolve_device

CONFIGS = Path(__file__).resolve().parents[1] / "configs/fashion_split"


def test_on_cpu_names_the_device_of_commands_that_train_unless_they_do():
    assert on_cpu(["transfer", "--config", "c.yaml"]) == ["transfer", "--config", "c.yaml", "--train.device", "cpu"]
    assert on_cpu(["-q", "probe"])[-2:] == ["--train.device", "cpu"]
    assert on_cpu(["demo", "--train.device", "auto"]) == ["demo", "--train.device", "auto"]
    assert on_cpu(["train-teacher", "--train.device=cuda"]) == ["train-teacher", "--train.device=cuda"]
    assert on_cpu(["compare", "runs/a"]) == ["compare", "runs/a"]


def teacher(root: Path, *extra: str) -> list[str]:
    write_fashion_idx(root / "fashion", n_train=60, n_test=20)
    return ["train-teacher", "--config", str(CONFIGS / "teacher.yaml"), "--data.root", str(root / "fashion"),
            "--log.root", str(root / "runs"), "--log.name", "t", "--model.name", "resnet8", "--train.epochs", "1",
            "--train.batch_size", "16", "--log.tensorboard", "false", *extra]


def test_a_run_through_the_helpers_stays_on_the_cpu_when_cuda_is_reported(tmp_path, monkeypatch):
    report_cuda(monkeypatch.setattr)
    assert resolve_device("auto").type == "cuda"  # what train.device's default would pick here
    code, out = invoke(*teacher(tmp_path))
    assert code == 0, out
    assert "| cpu, fp32" in out.splitlines()[0]


def test_reported_cuda_fails_a_run_that_touches_it(tmp_path, monkeypatch):
    """The check above can fail: the same run on ``auto`` reaches for the (absent) GPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a real GPU: nothing is pretended")
    report_cuda(monkeypatch.setattr)
    with pytest.raises((RuntimeError, AssertionError)):
        invoke(*teacher(tmp_path, "--train.device", "auto"))
