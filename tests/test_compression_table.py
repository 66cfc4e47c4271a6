"""The CPU evidence table of compression with labels (configs/fashion_labeled, benchmarks/compression_table.sh):
the configs say what the docs say they do, and the script runs end to end on a Fashion-MNIST fixture."""

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.paired_table import render
from tests.cli_helpers import invoke
from tests.data_fixtures import write_fashion_idx
from tests.lowres_runs import lowres_transfer
from transfer.config import TeacherConfig, TransferConfig, load_config

REPO = Path(__file__).resolve().parents[1]
LABELED = REPO / "configs/fashion_labeled"
LOWRES = REPO / "configs/fashion_lowres"
COMPANIONS = ("fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "nst", "fsp")


def transfer(name: str) -> TransferConfig:
    return load_config(LABELED / f"{name}.yaml", TransferConfig)


def test_every_student_learns_from_the_labeled_teacher_on_its_data():
    teacher = load_config(LABELED / "teacher.yaml", TeacherConfig)
    assert teacher.model.name == "resnet14" and teacher.data.train_split == "source_train"
    names = ["student", "kd", "crd", "cktf", *COMPANIONS, *(f"cktf_{x}" for x in COMPANIONS)]
    assert sorted(p.stem for p in LABELED.glob("[!_]*.yaml")) == sorted([*names, "teacher"])
    for name in names:
        cfg = transfer(name)
        assert cfg.data == teacher.data, name  # the same labeled images, holdout and test split
        assert cfg.teacher.checkpoint == f"{teacher.log.root}/{teacher.log.name}/best.safetensors", name
        assert (cfg.student.name, cfg.loss.method, cfg.log.name) == ("resnet8", name, f"fashion_labeled_{name}")


def weights(cfg: TransferConfig) -> dict[str, float]:
    return {name: options["weight"] for name, options in cfg.loss.terms.items()}


def test_the_loss_weights_are_the_documented_ones():
    assert weights(transfer("student")) == {"ce": 1.0}
    assert weights(transfer("kd")) == {"ce": 0.1, "kd": 0.9}  # RepDistiller's -r 0.1 -a 0.9
    assert weights(transfer("crd")) == {"ce": 1.0, "pckt": 0.8}  # -r 1 -b 0.8
    cktf = transfer("cktf")
    assert weights(cktf) == {"ce": 1.0, "mckt": 0.8, "pckt": 0.2}  # the paper's α1, α2
    assert cktf.loss.nce == load_config(LOWRES / "cktf.yaml", TransferConfig).loss.nce
    for x in COMPANIONS:
        options = load_config(LOWRES / f"{x}.yaml", TransferConfig).loss.terms[x]
        alone, combined = transfer(x), transfer(f"cktf_{x}")
        if "init_epochs" in options:
            options = {**options, "init_epochs": 1}
        assert alone.loss.terms == {"ce": {"weight": 1.0}, x: options}, x
        assert combined.loss.terms == {**cktf.loss.terms, x: options}, x  # θ = 1: X at its usual weight β
        assert combined.loss.nce == cktf.loss.nce, x


@pytest.mark.parametrize("name", COMPANIONS)
def test_each_cktf_x_config_trains_and_tests_the_student(lowres_fixture, name):
    """Every configs/fashion_labeled/cktf_X.yaml, as committed, on the fixture (the teacher there is a resnet8)."""
    run = f"labeled_cktf_{name}"
    code, out = lowres_transfer(lowres_fixture, LABELED / f"cktf_{name}.yaml", run)
    assert code == 0, out
    metrics = json.loads((lowres_fixture / "runs" / run / "metrics.json").read_text())
    assert metrics["method"] == f"cktf_{name}" and 0.0 <= metrics["final_acc"] <= metrics["final_acc5"] <= 1.0
    assert metrics["best_epoch"] == 1


def test_the_paired_table_puts_each_method_next_to_cktf_plus_it():
    header = ("method,n_seeds,seeds,final_acc_mean_pct,final_acc_std_pct,test_acc_at_best_mean_pct,"
              "test_acc_at_best_std_pct")
    rows = list(csv.DictReader([header, "student,3,0;1;2,80.0,0.5,79.0,0.25", "sp,1,0,81.5,,81.0,",
                                "cktf_sp,1,0,83.0,,80.0,", "kd,1,0,82.0,,,"]))
    teacher = {"model": "resnet14", "epochs": 12, "final": {"test/acc": 0.9}, "best": {"test/acc": 0.91}}
    text = render(rows, teacher)
    assert "| teacher (resnet14, 12 epochs) | 1 | 90.00 | 91.00 |" in text
    assert "| student | 3 | 80.00 ± 0.50 | 79.00 ± 0.25 |" in text and "| kd | 1 | 82.00 | — |" in text
    assert "| sp | 81.50 | 83.00 | +1.50 | 81.00 | 80.00 | -1.00 |" in text
    assert "| sp | 1 |" not in text and "cktf_sp |" not in text


def recording_cktf(folder: Path, log: Path, real: Path, skip_logged: Path | None = None) -> Path:
    """An executable ``cktf`` that appends its arguments (one shell-quoted line) to ``log`` and runs ``real``.

    With ``skip_logged`` (an earlier ``log``), a ``train-teacher``/``transfer`` command that already completed there
    with the same arguments exits 0 at once, as the real ``cktf … --resume`` does for a finished run (a rerun of
    the script then costs its few new commands)."""
    skip = "" if skip_logged is None else (
        f'case $1 in train-teacher|transfer) grep -qxF -- "$line" {shlex.quote(str(skip_logged))} && exit 0;; esac\n')
    path = folder / ("cktf_again" if skip_logged else "cktf_first")
    path.write_text(f'#!/usr/bin/env bash\nline=$(printf "%q " "$@")\necho "$line" >> {shlex.quote(str(log))}\n'
                    f"{skip}exec {shlex.quote(str(real))} \"$@\"\n")
    path.chmod(0o755)
    return path


SCRIPT = pytest.mark.slow(reason="benchmarks/compression_table.sh on a fixture: a resnet14 teacher and 10 students, "
                                  "each a cktf process")


def table_script(cktf: Path, runs: Path, out: Path, companions: str, seeds: str, *args: str
                 ) -> subprocess.CompletedProcess:
    env = {**os.environ, "CKTF": str(cktf), "PYTHON": sys.executable, "SEEDS": seeds, "COMPANIONS": companions,
           "PYTHONPATH": str(REPO)}
    return subprocess.run(["bash", "benchmarks/compression_table.sh", str(runs), str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def same_run_metrics(run: Path) -> dict:
    """metrics.json without what measures the invocation itself."""
    metrics = json.loads((run / "metrics.json").read_text())
    return {key: value for key, value in metrics.items() if not key.endswith("_this_invocation")}


def logged(log: Path, *commands: str) -> list[str]:
    return sorted(line for line in log.read_text().splitlines() if line.split(" ", 1)[0] in commands)


@pytest.fixture(scope="module")
def table(tmp_path_factory, cktf_fast) -> dict:
    """One run of the script on a fixture (seeds 0 and 1, companion sp), its commands logged; each command is the
    real cktf, forked without a torch import of its own (``cktf_fast``, tests/conftest.py)."""
    root = tmp_path_factory.mktemp("table")
    write_fashion_idx(root / "fashion", n_train=200, n_test=40)
    small = ["--data.root", str(root / "fashion"), "--train.epochs", "1", "--train.batch_size", "16",
             "--sampler.num_negatives", "32", "--train.device", "cpu"]
    proc = table_script(recording_cktf(root, root / "first.log", cktf_fast), root / "runs", root / "out", "sp", "0 1",
                        *small)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root, "runs": root / "runs", "small": small, "proc": proc, "cktf": cktf_fast}


@SCRIPT
def test_the_script_runs_end_to_end_on_a_fixture(table):
    runs, out = table["runs"], table["root"] / "out"
    teacher = json.loads((runs / "fashion_labeled_teacher/metrics.json").read_text())
    assert teacher["epochs"] == 1  # the data/train overrides reached the teacher too
    for name in ("student_s0", "student_s1", "kd_s1", "crd_s0", "cktf_s1", "sp_s0", "cktf_sp_s0"):
        metrics = json.loads((runs / f"fashion_labeled_{name}/metrics.json").read_text())
        assert 0.0 <= metrics["final_acc"] <= 1.0 and metrics["seed"] == int(name[-1]), name
    assert not (runs / "fashion_labeled_sp_s1").exists()  # companions: seed 0 only
    table_md = (out / "comparison.md").read_text()
    for method, n in (("student", 2), ("kd", 2), ("crd", 2), ("cktf", 2), ("sp", 1), ("cktf_sp", 1)):
        assert f"| {method} | " in table_md and f"({n}) |" in table_md.split(f"| {method} | ")[1].split("\n")[0], method
    paired = (out / "paired.md").read_text()
    assert "| teacher (resnet14, 1 epochs) |" in paired and "\n| sp | " in paired
    assert paired == table["proc"].stdout[-len(paired):]  # also printed


@SCRIPT
def test_a_rerun_keeps_the_finished_runs(table, monkeypatch):
    """The rerun repeats every command of the first run, each with --resume (the logged first commands are not run
    again, see recording_cktf), and writes the same tables; the real cktf accepts such a repeat of a finished run
    without training it again (checked in-process on the teacher's and one student's command)."""
    root, runs = table["root"], table["runs"]
    first = root / "first.log"
    cktf = recording_cktf(root, root / "again.log", table["cktf"], skip_logged=first)
    again = table_script(cktf, runs, root / "out_again", "sp", "0 1", *table["small"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    trained = logged(first, "train-teacher", "transfer")
    assert len(trained) == 11 and all(" --resume " in f" {line} " for line in trained), trained
    assert logged(root / "again.log", "train-teacher", "transfer") == trained
    assert (root / "out_again/paired.md").read_text() == (root / "out/paired.md").read_text()
    monkeypatch.chdir(REPO)  # the script's config paths are relative to the repository
    for command in ("train-teacher", "transfer"):
        args = shlex.split(logged(first, command)[0])
        run = runs / args[args.index("--log.name") + 1] if "--log.name" in args else runs / "fashion_labeled_teacher"
        stamps = {name: (run / name).stat().st_mtime_ns for name in ("last.safetensors", "best.safetensors")}
        metrics = same_run_metrics(run)
        code, out = invoke(*args)
        assert code == 0, out
        assert {name: (run / name).stat().st_mtime_ns for name in stamps} == stamps, command  # not trained again
        assert same_run_metrics(run) == metrics, command


@SCRIPT
def test_an_unknown_companion_fails_the_script_with_its_name(table):
    root = table["root"]
    proc = table_script(recording_cktf(root, root / "nosuch.log", table["cktf"],
                                       skip_logged=root / "first.log"), table["runs"],
                        root / "out_nosuch", "nosuch", "", *table["small"])
    assert proc.returncode != 0 and "FAILED: nosuch seed 0" in proc.stderr
    assert "nosuch.yaml" in proc.stderr and "Traceback" not in proc.stderr
