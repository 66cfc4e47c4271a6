"""The `cktf` command line as a user runs it: help, a tiny teacher run, resume, and one-line errors."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.cli_helpers import invoke, one_line_error
from tests.data_fixtures import write_fashion_idx, write_stl10
from transfer.cli import cli
from transfer.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TEACHER_CFG = str(REPO / "configs/fashion_split/teacher.yaml")


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fashion")
    write_fashion_idx(root, n_train=400, n_test=100)
    return root


def tiny(fashion_root: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return ["train-teacher", "--config", TEACHER_CFG, "--data.root", str(fashion_root), "--log.root", str(runs),
            "--log.name", name, "--model.name", "resnet8", "--train.batch_size", "32", "--train.epochs", "2",
            "--log.tensorboard", "false", *extra]


def test_help_lists_commands_and_config_keys():
    code, out = invoke("--help")
    assert code == 0 and "train-teacher" in out and "transfer" in out
    code, out = invoke("train-teacher", "--help")
    assert code == 0
    for key in ("--data.root", "--train.epochs", "--model.name", "--log.name", "--resume"):
        assert key in out


def test_teacher_run_writes_its_directory(fashion_root, tmp_path):
    code, out = invoke(*tiny(fashion_root, tmp_path, "t"))
    assert code == 0, out
    run_dir = tmp_path / "t"
    for name in ("config.yaml", "last.safetensors", "best.safetensors", "metrics.json"):
        assert (run_dir / name).is_file(), name
    assert "resnet8" in (run_dir / "config.yaml").read_text()
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert ckpt.metadata["kind"] == "teacher" and ckpt.metadata["num_classes"] == "5"
    assert ckpt.state["epoch"] == 2

    code, out = invoke(*tiny(fashion_root, tmp_path, "t"))
    one_line_error(code, out, "already exists", "--resume")


def test_resume_extends_a_run_exactly(fashion_root, tmp_path):
    assert invoke(*tiny(fashion_root, tmp_path, "straight"))[0] == 0
    assert invoke(*tiny(fashion_root, tmp_path, "split", "--train.epochs", "1"))[0] == 0
    code, out = invoke(*tiny(fashion_root, tmp_path, "split", "--resume"))
    one_line_error(code, out, "train.epochs (1 -> 2)", "--allow-change train.epochs")
    code, out = invoke(*tiny(fashion_root, tmp_path, "split", "--resume", "--allow-change", "train.epochs"))
    assert code == 0, out
    record = json.loads((tmp_path / "split/resumes.jsonl").read_text().splitlines()[-1])
    assert record["changed"]["train.epochs"] == {"was": 1, "now": 2}
    assert record["allowed_by_flag"] == ["train.epochs"]
    a = load_checkpoint(tmp_path / "straight/last.safetensors").state["task"]
    b = load_checkpoint(tmp_path / "split/last.safetensors").state["task"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    code, out = invoke(*tiny(fashion_root, tmp_path, "split", "--resume", "--train.lr", "0.5"))
    one_line_error(code, out, "train.lr", "--resume")


def test_nonexistent_data_root(tmp_path):
    code, out = invoke(*tiny(tmp_path / "nowhere", tmp_path, "x"))
    one_line_error(code, out, "nowhere")
    assert not (tmp_path / "x").exists()


def test_typo_in_config_key(fashion_root, tmp_path):
    code, out = invoke(*tiny(fashion_root, tmp_path, "x", "--train.epoch", "3"))
    one_line_error(code, out, "train.epoch", "train.epochs")
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(TEACHER_CFG).read_text().replace("batch_size:", "batchsize:"))
    code, out = invoke("train-teacher", "--config", str(bad), "--log.root", str(tmp_path))
    one_line_error(code, out, "train.batchsize", "bad.yaml")


def test_unknown_model_name(fashion_root, tmp_path):
    code, out = invoke(*tiny(fashion_root, tmp_path, "x", "--model.name", "resnet99"))
    one_line_error(code, out, "resnet99", "resnet20")


def test_truncated_stl10_bin(tmp_path):
    files = write_stl10(tmp_path / "stl", n_train=10, n_test=10, n_unlabeled=4)
    x = Path(files["folder"]) / "train_X.bin"
    x.write_bytes(x.read_bytes()[:-100])
    code, out = invoke("train-teacher", "--config", TEACHER_CFG, "--data.name", "stl10", "--data.root",
                    str(tmp_path / "stl"), "--data.train_split", "train", "--data.test_split", "test",
                    "--data.options", "{}", "--log.root", str(tmp_path), "--log.name", "s")
    one_line_error(code, out, "train_X.bin")


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(cli, ["--debug", *tiny(tmp_path / "nowhere", tmp_path, "x")])
    assert result.exit_code != 0 and type(result.exception).__name__ == "CKTFError"


def test_zero_epochs_saves_the_initialised_network(fashion_root, tmp_path):
    code, out = invoke(*tiny(fashion_root, tmp_path, "untrained", "--train.epochs", "0"))
    assert code == 0, out
    for name in ("last.safetensors", "best.safetensors"):
        ckpt = load_checkpoint(tmp_path / "untrained" / name)
        assert ckpt.state["epoch"] == 0 and ckpt.metadata["kind"] == "teacher"


def test_resume_may_change_workers_with_either_augmentation(fashion_root, tmp_path):
    for augment in ("batched", "per_image"):  # items are seeded per (epoch, index), not per worker
        args = ("--data.augment", augment, "--train.epochs", "1")
        assert invoke(*tiny(fashion_root, tmp_path, augment, *args))[0] == 0
        code, out = invoke(*tiny(fashion_root, tmp_path, augment, "--resume", *args, "--data.num_workers", "1"))
        assert code == 0, out
        assert '"data.num_workers": {"was": 0, "now": 1}' in (tmp_path / augment / "resumes.jsonl").read_text()
