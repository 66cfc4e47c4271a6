"""cktf never deletes what it did not write, never traps an interrupted run, and answers bad paths and
config files in one line."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from tests.cli_helpers import invoke, one_line_error
from tests.data_fixtures import write_fashion_idx
from tests.devices import on_cpu
from transfer.cli import cli
from transfer.engine.rundir import MARKER, prepare_run_dir

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs/fashion_split"


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fashion")
    write_fashion_idx(root, n_train=200, n_test=60)
    return root


def teacher(fashion: Path, root: Path, name: str, *extra: str) -> list[str]:
    return ["train-teacher", "--config", str(CONFIGS / "teacher.yaml"), "--data.root", str(fashion), "--log.root",
            str(root), "--log.name", name, "--model.name", "resnet8", "--train.batch_size", "32",
            "--train.epochs", "1", *extra]


def probe(fashion: Path) -> list[str]:
    return ["probe", "--config", str(CONFIGS / "probe.yaml"), "--data.root", str(fashion),
            "--data.options.labels_per_class", "5"]


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["", ".", "..", "a/../..", "/abs"])
def test_run_names_that_leave_or_are_the_log_root_are_refused(fashion, tmp_path, name):
    root = tmp_path / "runs"
    root.mkdir()
    (root / "precious.txt").write_text("mine")
    code, out = invoke(*teacher(fashion, root, name, "--overwrite"))
    one_line_error(code, out, "log.name", "not a run name")
    assert snapshot(tmp_path) == {"runs/precious.txt": b"mine"}


def test_overwrite_refuses_a_directory_cktf_did_not_create(fashion, tmp_path):
    mine = tmp_path / "runs" / "notes"
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    (mine / "last.safetensors").write_text("not ours either")
    before = snapshot(tmp_path)
    code, out = invoke(*teacher(fashion, tmp_path / "runs", "notes", "--overwrite"))
    one_line_error(code, out, str(mine), "not a cktf run directory")
    assert snapshot(tmp_path) == before


def test_the_current_directory_and_its_parents_are_never_run_directories(fashion, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "keep.py").write_text("code")
    monkeypatch.chdir(work / "sub")
    before = snapshot(tmp_path)
    for args in (["--log.root", ".", "--log.name", "."], ["--log.root", "..", "--log.name", "sub"],
                 ["--log.root", str(tmp_path), "--log.name", "work"]):
        code, out = invoke(*teacher(fashion, tmp_path, "x", "--overwrite", *args))
        assert code != 0 and "Traceback" not in out, out
    code, out = invoke(*probe(fashion),
                       "--probe.backbone", "pixels", "--probe.out", ".", "--overwrite")
    one_line_error(code, out, "probe.out", "is the current directory")
    code, out = invoke(*probe(fashion),
                       "--probe.backbone", "pixels", "--probe.out", str(work), "--overwrite")
    one_line_error(code, out, "probe.out", "contains the current directory")
    assert snapshot(tmp_path) == before


def test_overwrite_deletes_only_what_cktf_wrote(fashion, tmp_path):
    assert invoke(*teacher(fashion, tmp_path, "t"))[0] == 0
    run = tmp_path / "t"
    (run / "my_notes.md").write_text("keep me")
    (run / "probe").mkdir()
    (run / "probe" / MARKER).write_text("{}")
    (run / "probe" / "metrics.json").write_text("{}")
    (run / "plots").mkdir()
    (run / "plots" / "metrics.json").write_text("a user's file with one of cktf's names")
    old = (run / "last.safetensors").read_bytes()
    code, out = invoke(*teacher(fashion, tmp_path, "t", "--overwrite", "--train.seed", "3"))
    assert code == 0, out
    assert (run / "my_notes.md").read_text() == "keep me"
    assert (run / "plots" / "metrics.json").read_text() == "a user's file with one of cktf's names"
    assert not (run / "probe").exists()
    assert (run / "last.safetensors").read_bytes() != old
    assert len(list(run.glob("events.out.tfevents.*"))) == 1


def test_a_run_interrupted_before_its_first_checkpoint_starts_fresh(fashion, tmp_path):
    run = prepare_run_dir(tmp_path / "t", resume=False, overwrite=False)
    (run.path / "config.yaml").write_text("train: {epochs: 9}\n")
    (run.path / "events.out.tfevents.1.host").write_bytes(b"stale")
    code, out = invoke(*teacher(fashion, tmp_path, "t"))
    assert code == 0, out
    assert not (run.path / "events.out.tfevents.1.host").exists()
    (run.path / "last.safetensors").unlink()
    code, out = invoke(*teacher(fashion, tmp_path, "t", "--resume"))
    assert code == 0 and "nothing to resume" in out, out


def test_bad_paths_are_one_line(fashion, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, out = invoke(*teacher(fashion, a_file, "t"))
    one_line_error(code, out, str(a_file), "log.root/log.name")
    code, out = invoke(*teacher(a_file, tmp_path, "t"))
    one_line_error(code, out, str(a_file), "data.root", "is a file")
    code, out = invoke(*teacher(fashion, tmp_path, "t", "--data.name", "cifar7"))
    one_line_error(code, out, "unknown dataset 'cifar7'", "data.name")
    code, out = invoke(*probe(fashion),
                       "--probe.backbone", "pixels", "--probe.out", str(a_file / "p"))
    one_line_error(code, out, "probe.out", str(a_file))
    code, out = invoke("compare", str(tmp_path), "--out", str(a_file / "report"))
    one_line_error(code, out, "--out", "is a file")
    assert a_file.read_text() == "x"


def test_binary_and_empty_config_files(tmp_path):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    code, out = invoke("train-teacher", "--config", str(binary))
    one_line_error(code, out, str(binary), "not a text file")
    empty = tmp_path / "empty.yaml"
    empty.write_text("  \n# only a comment\n")
    code, out = invoke("transfer", "--config", str(empty))
    one_line_error(code, out, str(empty), "is empty")


def test_resume_lists_every_changed_key(fashion, tmp_path):
    assert invoke(*teacher(fashion, tmp_path, "t"))[0] == 0
    code, out = invoke(*teacher(fashion, tmp_path, "t", "--resume", "--train.lr", "0.5", "--train.seed", "4"))
    one_line_error(code, out, "train.lr (0.05 -> 0.5)", "train.seed (0 -> 4)", "--allow-change")
    code, out = invoke(*teacher(fashion, tmp_path, "t", "--resume", "--train.threads", "2"))
    assert code == 0, out
    assert "train.threads" in json.loads((tmp_path / "t/resumes.jsonl").read_text())["changed"]


def test_saved_config_says_what_was_used_and_files_share_one_mode(fashion, tmp_path):
    code, out = invoke(*teacher(fashion, tmp_path, "t", "--train.threads", "0", "--train.device", "auto"))
    assert code == 0, out
    run = tmp_path / "t"
    text = (run / "config.yaml").read_text()
    saved = yaml.safe_load(text)
    assert saved["train"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # auto, resolved
    assert saved["train"]["threads"] >= 1
    assert saved["data"]["root"] == str(fashion)
    assert "# written by cktf" in text and "torch " in text
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}


def test_verbosity_flags_after_the_subcommand_and_probe_names_its_keys(fashion, tmp_path):
    code, out = invoke("train-teacher", "-q", "--config", str(tmp_path / "none.yaml"))
    one_line_error(code, out, "does not exist")
    result = CliRunner().invoke(cli, ["train-teacher", "--config", str(tmp_path / "none.yaml"), "--debug"])
    assert type(result.exception).__name__ == "CKTFError"
    code, out = invoke("probe", "--help")
    assert code == 0 and "probe.out" in out and "log.name" not in out


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transfer.cli", *on_cpu(args)], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


@pytest.mark.slow(reason="two real interpreters: what they print from the first import on is what it checks")
def test_output_is_quiet_and_says_what_runs(fashion, tmp_path):
    done = run_cli(*probe(fashion),
                   "--probe.backbone", "pixels", "--probe.out", str(tmp_path / "p"), "--train.epochs", "2",
                   "--log.progress_every", "1e-9", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert not any("faiss" in line.lower() for line in lines), lines
    assert lines[0].startswith("probe (cached): pixels on fashion_split/target_train") and "| cpu, fp32" in lines[0]
    assert any(line.startswith("epoch 1/2  batch 1/") for line in lines), lines
    shown = run_cli("compare", str(tmp_path / "p"), "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr.strip() == "", shown.stderr


def test_help_and_a_bad_config_do_not_import_torch(tmp_path):
    probe = ("import sys\nfrom transfer.cli import cli\n"
             "try:\n    cli.main(sys.argv[1:], prog_name='cktf')\nexcept SystemExit:\n    pass\n"
             "print('torch imported' if 'torch' in sys.modules else 'no torch')\n")
    for args in (["transfer", "--help"], ["probe", "--help"], ["train-teacher", "--config", "missing.yaml"]):
        done = subprocess.run([sys.executable, "-c", probe, *args], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
        assert done.stdout.strip().endswith("no torch"), (args, done.stdout, done.stderr)


def test_the_resume_hint_is_the_same_command_without_overwrite():
    from transfer.cli import resume_command

    argv = ["/usr/bin/cktf", "transfer", "--config", "c y.yaml", "--overwrite", "--train.epochs", "3"]
    assert resume_command(argv) == "cktf transfer --config 'c y.yaml' --train.epochs 3 --resume"
    assert resume_command(["cktf", "demo", "--seeds", "3"], flag=False) == "cktf demo --seeds 3"
