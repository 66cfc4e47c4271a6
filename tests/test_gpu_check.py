"""benchmarks/gpu_check.sh without a GPU: its steps (``--dry-run``), its argument handling, its loop and exit
status (with a stand-in interpreter), the summary of a results folder, and the CLI chain's commands."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_chain import chain_commands, expected
from benchmarks.gpu_chain import main as chain_main
from benchmarks.gpu_check_summary import summarise

REPO = Path(__file__).resolve().parents[1]


def run_gpu_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env={**os.environ, **env})


def dry_steps() -> dict[str, tuple[int, str]]:
    done = run_gpu_check("--dry-run", "--out", "/tmp/x")
    assert done.returncode == 0, done.stderr
    steps = {}
    for line in done.stdout.splitlines():
        head, command = line.split(": ", 1)
        name, limit = head.split(" (")
        steps[name] = (int(limit.removesuffix(" s)")), command)
    return steps


def test_dry_run_lists_every_step_with_a_timeout_that_fits_ten_minutes():
    steps = dry_steps()
    assert list(steps) == ["wheels", "tests", "chain", "transfer_step_fp32", "transfer_step_bf16", "faiss_gpu_table"]
    assert sum(limit for limit, _ in steps.values()) <= 600
    assert "pip install -q --no-index --no-deps --target /tmp/x/site" in steps["wheels"][1]
    tests = steps["tests"][1].split()
    assert "pytest" in tests and "tests/test_cpu_suite.py" in tests and "tests/test_negative_sampler.py" in tests
    assert all((REPO / t).is_file() for t in tests if t.startswith("tests/"))
    assert ("tests/test_fake_cuda.py" in tests) == (REPO / "tests/test_fake_cuda.py").is_file()
    assert "benchmarks/gpu_chain.py --out /tmp/x/chain --device cuda" in steps["chain"][1]
    for precision in ("fp32", "bf16"):
        command = steps[f"transfer_step_{precision}"][1]
        assert ("--device cuda --settings stl10_vgg --methods kd,crd,cktf --negative-modes shared,per-anchor "
                "--items 100000 --batch 64 --negatives 16384") in command
        assert f"train.precision={precision} --json /tmp/x/transfer_step_{precision}.json" in command
    assert "sampler.py --device cuda --parts tables" in steps["faiss_gpu_table"][1]


def test_bad_arguments_are_refused_and_help_works():
    bad = run_gpu_check("--bogus")
    assert bad.returncode == 2 and "unknown argument '--bogus'" in bad.stderr
    shown = run_gpu_check("--help")
    assert shown.returncode == 0 and "pip download --no-deps --only-binary=:all:" in shown.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_says_so_and_writes_nothing(tmp_path):
    done = run_gpu_check("--out", str(tmp_path / "out"))
    assert done.returncode == 1 and "sees no CUDA device" in done.stderr
    assert not (tmp_path / "out").exists()


def stand_in_python(tmp_path: Path, failing: str) -> Path:
    """An interpreter for the script that says CUDA and faiss are there, fails commands containing
    ``failing`` and runs the summary for real."""
    path = tmp_path / "python"
    path.write_text(f'#!/usr/bin/env bash\ncase "$*" in\n  *gpu_check_summary.py*) exec {sys.executable} "$@" ;;\n'
                    f'  *{failing}*) echo broken >&2; exit 3 ;;\n  *) exit 0 ;;\nesac\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.parametrize("failing,code", [("nothing-matches-this", 0), ("precision=bf16", 1)])
def test_a_failed_step_makes_the_check_fail(tmp_path, failing, code):
    out = tmp_path / "out"
    done = run_gpu_check("--out", str(out), PYTHON=str(stand_in_python(tmp_path, failing)),
                         WHEELS=str(tmp_path / "none"))
    assert done.returncode == code, done.stdout + done.stderr
    status = [line.split("\t") for line in (out / "status.tsv").read_text().splitlines()]
    assert [s[0] for s in status] == ["wheels", "tests", "chain", "transfer_step_fp32", "transfer_step_bf16",
                                      "faiss_gpu_table"]
    failed = [s[0] for s in status if s[1] != "ok"]
    assert failed == ([] if code == 0 else ["transfer_step_bf16"])
    assert (out / "gpu_check.md").is_file() and json.loads((out / "gpu_check.json").read_text())["ok"] == (code == 0)
    if code:
        assert "failed steps: transfer_step_bf16" in done.stderr
        assert "broken" in (out / "transfer_step_bf16.log").read_text()


def fake_results(out: Path, *, failed: bool) -> None:
    out.mkdir()
    rows = [{"setting": "stl10_vgg", "variant": "kd", "batch": 64, "median_s": 0.0123, "phase_median_s": {}},
            {"setting": "stl10_vgg", "variant": "cktf/per-anchor", "batch": 64, "error": "CUDA out of memory"}]
    (out / "transfer_step_fp32.json").write_text(json.dumps({"rows": rows}))
    (out / "sampler.json").write_text(json.dumps({"tables": [{"index": "flat", "items": 100000, "recall": 1.0}]}))
    (out / "chain.json").write_text(json.dumps({"ok": True, "commands": [
        {"name": "teacher", "returncode": 0, "seconds": 9.5, "problem": None}], "probe": {"final_acc": 0.71},
        "teacher": {"final": {"test/acc": 0.9, "train/images_per_s": 12345.6}}}))
    result = "failed (exit 1, see x.log)" if failed else "ok"
    (out / "status.tsv").write_text(f"tests\tok\t40\ntransfer_step_fp32\t{result}\t80\n"
                                    "faiss_gpu_table\tskipped (faiss without GPU support)\t0\n")


@pytest.mark.parametrize("failed", [False, True])
def test_the_summary_shows_every_table_and_fails_with_a_step(tmp_path, failed):
    fake_results(tmp_path / "out", failed=failed)
    report, markdown, ok = summarise(tmp_path / "out")
    assert ok is not failed and report["ok"] is not failed
    assert "| tests | ok | 40 |" in markdown
    assert "| faiss_gpu_table | skipped (faiss without GPU support) | 0 |" in markdown
    assert "### transfer_step_fp32" in markdown and "| setting | variant | batch | median_s | error |" in markdown
    assert "| stl10_vgg | kd | 64 | 0.0123 |  |" in markdown and "CUDA out of memory |" in markdown
    assert "### sampler" in markdown and "| flat | 100000 | 1 |" in markdown  # the sampler writes `tables`
    assert "### chain" in markdown and "| teacher | 0 | 9.5 |" in markdown and "- probe: final_acc 0.71" in markdown
    assert "- teacher: test/acc 0.9, train/images_per_s 1.235e+04" in markdown
    assert report["sampler"]["tables"][0]["index"] == "flat"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check_summary.py", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == int(failed) and (tmp_path / "out/gpu_check.md").read_text() == markdown


def test_the_summary_of_nothing_is_a_failure(tmp_path):
    assert summarise(tmp_path)[2] is False


def test_the_chain_covers_what_gpu_users_run(tmp_path, capsys):
    assert chain_main(["--out", str(tmp_path), "--dry-run"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert list(lines) == ["teacher", "transfer_sigterm", "transfer_resume", "probe"]
    assert all("--train.device cuda" in command for command in lines.values())
    assert "--train.precision fp16 --data.num_workers 2" in lines["teacher"]
    sigterm = lines["transfer_sigterm"]
    assert "-m tests.signal_driver SIGTERM" in sigterm
    for flags in ("--train.precision bf16", "--train.compile true", "--train.checkpoint_every 5",
                  "--sampler.kind hard --sampler.shared false", "--loss.terms.mckt.layer_mapping smallest",
                  "--loss.terms.mckt.mapping_schedule per_batch"):
        assert flags in sigterm, flags
    assert lines["transfer_resume"].endswith(sigterm.split(" transfer ", 1)[1] + " --resume")
    assert f"--student {tmp_path}/runs/cktf/last.safetensors" in lines["probe"]
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_the_chain_checks_that_sigterm_stopped_the_transfer_after_saving():
    assert expected("transfer_sigterm", 143, "epoch 1/3 ...\nstopped by SIGTERM at epoch 2, batch 4: saved x") is None
    assert "expected 143" in expected("transfer_sigterm", 0, "done: runs/cktf")
    assert "stopped by SIGTERM" in expected("transfer_sigterm", 143, "Traceback ...")
    assert expected("probe", 0, "") is None and expected("probe", 1, "") == "exit 1"


def test_chain_commands_stop_inside_the_second_epoch():
    args = type("Args", (), {"device": "cuda", "teacher_precision": "fp16", "compile": "true", "items": 4000})()
    stop_at = int(dict(chain_commands(Path("/o"), args))["transfer_sigterm"][4])
    embedding, steps = 8, 2000 // 64
    assert embedding + steps < stop_at < embedding + 2 * steps


def test_files_that_need_faiss_skip_without_it():
    """A machine without faiss collects them as skipped rather than failing the whole pytest run."""
    blocked = ("import sys, pytest\nsys.modules['faiss'] = None  # import faiss raises ImportError\n"
               "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-rs', *sys.argv[1:]]))\n")
    done = subprocess.run([sys.executable, "-c", blocked, "tests/test_knn.py", "tests/test_neighbours.py"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("2 skipped in ") and done.returncode == 5, done.stdout[-2000:]  # 5: nothing ran
