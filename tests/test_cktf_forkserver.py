"""The fast ``cktf`` of tests/cktf_forkserver.py behaves as the installed one and as ``python -m MODULE`` do: the
same output, exit status, working directory and standard input (its deaths by signal are pinned by the SIGKILL
cases of tests/test_interrupts.py and tests/test_loader_workers.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REAL = Path(sys.executable).parent / "cktf"


def run(executable: Path, *args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([str(executable), *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120)


@pytest.mark.slow(reason="starts the fork server and the installed cktf three times to compare with")
def test_the_fast_cktf_prints_and_exits_as_the_real_one(cktf_fast, tmp_path):
    for args in (["--version"], ["transfer", "--config", "missing.yaml"], ["methods"]):
        fast, real = run(cktf_fast, *args, cwd=tmp_path), run(REAL, *args, cwd=tmp_path)
        assert (fast.returncode, fast.stdout, fast.stderr) == (real.returncode, real.stdout, real.stderr), args
    assert real.returncode == 0 and "kd: " in real.stdout  # `cktf methods` ran
    refused = run(cktf_fast, "transfer", "--config", "missing.yaml", cwd=tmp_path)
    assert refused.returncode == 1 and refused.stderr.startswith("Error: config file missing.yaml")


def test_a_module_runs_in_the_clients_directory_with_its_input(cktf_fast, tmp_path):
    (tmp_path / "in.json").write_text('{"b": 1, "a": [2]}')
    done = run(cktf_fast, "-m", "json.tool", "--sort-keys", "in.json", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith('{\n    "a"')
    assert json.loads(done.stdout) == {"a": [2], "b": 1}
    piped = run(cktf_fast, "-m", "json.tool", "--compact", cwd=tmp_path, stdin='{"x": [1, 2]}')
    assert piped.returncode == 0 and piped.stdout == '{"x":[1,2]}\n'
    bad = run(cktf_fast, "-m", "json.tool", cwd=tmp_path, stdin="{")
    assert bad.returncode == 1 and "Expecting property name" in bad.stderr
