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
    assert "test 50, native resolution)" in out  # the start line says the input size (issue 20)
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


TRANSFER_CFG = str(REPO / "configs/fashion_lowres/cktf.yaml")


@pytest.mark.parametrize("args,needles", [
    (["--train.lr"], ["'--train.lr' on the command line needs a value"]),
    (["--train.lr", "--data.root", "/x"], ["'--train.lr' on the command line needs a value"]),
    (["--resum"], ["unknown option '--resum'", "did you mean '--resume'?"]),
    (["--overwrit=1"], ["unknown option '--overwrit'", "did you mean '--overwrite'?"]),
    (["--loss.terms.kd.wieght", "1"], ["'loss.terms.kd.wieght' on the command line", "loss.terms.kd.weight"]),
    (["--teacher", "weights.pth"], ["weights.pth is a PyTorch file", "cktf import-teacher"]),
    (["--teacher", "missing.safetensors"], ["missing.safetensors does not exist", "cktf import-teacher"]),
])
def test_command_line_mistakes_say_what_to_do(tmp_path, monkeypatch, args, needles):
    """Issue 20's friction on the own-data path: each mistake is one line that names the fix."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.pth").write_bytes(b"\x80\x02}q\x00.")
    one_line_error(*invoke("transfer", "--config", TRANSFER_CFG, "--log.root", str(tmp_path), *args), *needles)


def test_a_misspelt_term_option_in_a_file_names_the_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base: {TRANSFER_CFG}\nloss: {{terms: {{kd: {{wieght: 1}}}}}}\n")
    one_line_error(*invoke("transfer", "--config", str(cfg), "--teacher", "t.safetensors"),
                   "'loss.terms.kd.wieght' in", "c.yaml", "loss.terms.kd.weight")


def test_too_many_negatives_for_a_small_pool_names_the_option_and_a_value_that_fits():
    from transfer.errors import CKTFError
    from transfer.sampling.negative_sampler import UniformSampler

    with pytest.raises(CKTFError, match=r"N=400; pass e.g. --sampler.num_negatives 256"):
        UniformSampler(400, 4096)


def test_an_interrupt_says_truthfully_what_it_left(fashion_root, tmp_path, monkeypatch):
    """Ctrl-C outside a training step (e.g. while banks fill before the first batch): no promise of a checkpoint
    that does not exist (issue 20)."""
    from transfer.engine import rundir
    from transfer.engine.trainer import Engine

    monkeypatch.setattr(rundir, "_OPENED", [])
    assert invoke(*tiny(fashion_root, tmp_path, "done", "--train.epochs", "1"))[0] == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "fit", interrupted)
    code, out = invoke(*tiny(fashion_root, tmp_path, "cut"))
    assert code == 130 and f"interrupted before {tmp_path / 'cut'} had a checkpoint; nothing to resume" in out
    code, out = invoke(*tiny(fashion_root, tmp_path, "done", "--resume", "--train.epochs", "1"))
    assert code == 130, out
    assert f"interrupted; {tmp_path / 'done/last.safetensors'} is the last complete checkpoint; continue with: " in out
    monkeypatch.setattr(rundir, "_OPENED", [])
    from transfer.cli import interrupted_line

    assert interrupted_line("transfer") == "interrupted before a run directory was created; nothing to resume"


def test_a_long_phase_before_training_says_what_it_does(caplog):
    import logging
    import time

    from transfer.engine.logger import phase

    with caplog.at_level(logging.INFO, logger="cktf"):
        with phase("quick"):
            pass
        with phase("filling the memory banks (400 images)", after_s=0.05):
            time.sleep(0.3)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "filling the memory banks (400 images) …" and lines[1].endswith(" s") and len(lines) == 2
