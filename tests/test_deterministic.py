"""``train.deterministic``: deterministic kernels for bit-identical reruns and resumes on CUDA."""

import os
from pathlib import Path

import pytest
import torch
import yaml

from tests.cli_helpers import invoke, one_line_error
from tests.data_fixtures import write_fashion_idx
from transfer.engine.runtime import use_deterministic_kernels

CONFIGS = Path(__file__).resolve().parents[1] / "configs/fashion_split"


@pytest.fixture(autouse=True)
def _torch_defaults_after(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    use_deterministic_kernels(False)


def switched() -> tuple[bool, bool, bool, bool]:
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)


def test_the_switch_sets_every_knob_and_back():
    use_deterministic_kernels(True)
    assert switched() == (True, True, True, False)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    use_deterministic_kernels(False)
    assert switched()[0] is False and switched()[2:] == (False, False)


def test_a_workspace_the_user_chose_is_kept(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    use_deterministic_kernels(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def teacher(root: Path, *extra: str) -> list[str]:
    return ["train-teacher", "--config", str(CONFIGS / "teacher.yaml"), "--data.root", str(root / "fashion"),
            "--log.root", str(root / "runs"), "--log.name", "t", "--model.name", "resnet8", "--train.epochs", "1",
            "--train.batch_size", "16", "--log.tensorboard", "false", *extra]


def test_a_run_applies_it_records_it_and_resumes_only_with_it(tmp_path):
    write_fashion_idx(tmp_path / "fashion", n_train=60, n_test=20)
    code, out = invoke(*teacher(tmp_path, "--train.deterministic", "true"))
    assert code == 0, out
    assert switched()[:3] == (True, True, True)  # the stage switched torch over
    config = tmp_path / "runs/t/config.yaml"
    assert yaml.safe_load(config.read_text())["train"]["deterministic"] is True
    code, out = invoke(*teacher(tmp_path, "--resume", "--train.epochs", "2"))
    one_line_error(code, out, "train.deterministic", "--allow-change")

    saved = yaml.safe_load(config.read_text())
    del saved["train"]["deterministic"]  # a run written before the key existed ran without it
    config.write_text(yaml.safe_dump(saved))
    code, out = invoke(*teacher(tmp_path, "--resume"))
    assert code == 0, out
    assert switched()[0] is False
