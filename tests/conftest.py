"""Shared test setup: tests use tiny tensors, for which one torch thread is faster than two; hypothesis
profiles (see :func:`hypothesis_profile`); every ``slow`` mark gives its reason (:func:`unexplained_slow_marks`);
session fixtures for the lowres teacher and the fast ``cktf`` (tests/cktf_forkserver.py)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# ci: the same examples on every run of a commit (seeded from each test, no example database), so CI's verdict
# cannot flip; dev: new random examples on every run, failures replayed from .hypothesis/; fuzz: `make fuzz`.
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow], "print_blob": True}
settings.register_profile("ci", derandomize=True, database=None, max_examples=150, **_COMMON)
settings.register_profile("dev", max_examples=150, **_COMMON)
settings.register_profile("fuzz", max_examples=5000, **_COMMON)


def hypothesis_profile(env: dict) -> str:
    """The profile for an environment: ``CKTF_HYPOTHESIS_PROFILE`` if set, else ``ci`` under CI, else ``dev``."""
    if env.get("CKTF_HYPOTHESIS_PROFILE"):
        return env["CKTF_HYPOTHESIS_PROFILE"]
    return "ci" if env.get("CI", "").lower() in ("true", "1", "yes") else "dev"


settings.load_profile(hypothesis_profile(dict(os.environ)))


def unexplained_slow_marks(items) -> list[str]:
    """The tests marked ``slow`` without saying why: ``@pytest.mark.slow(reason="…")`` is the only accepted form."""
    return [item.nodeid for item in items for mark in item.iter_markers("slow")
            if mark.args or set(mark.kwargs) != {"reason"} or not str(mark.kwargs["reason"]).strip()]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    unexplained = unexplained_slow_marks(items)
    if unexplained:
        raise pytest.UsageError(f"slow without reason=\"why it needs its time\": {', '.join(unexplained)}")


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def lowres_fixture(tmp_path_factory):
    """A Fashion-MNIST fixture with a teacher trained from configs/fashion_lowres/teacher.yaml
    (tests/lowres_runs.py), shared by every test that runs that folder's transfer configs."""
    from tests.lowres_runs import train_lowres_teacher

    return train_lowres_teacher(tmp_path_factory.mktemp("lowres"))


@pytest.fixture(scope="session")
def cktf_fast(tmp_path_factory) -> Path:
    """A ``cktf`` executable whose commands are forked from one interpreter that has imported the package
    (tests/cktf_forkserver.py): each runs the real command line in its own process without a 5 s torch import.
    For tests of scripts that start many commands."""
    from tests.cktf_forkserver import client_executable

    folder = tmp_path_factory.mktemp("forkserver")
    listening = folder / "cktf.sock"
    repo = Path(__file__).resolve().parents[1]
    server = subprocess.Popen([sys.executable, "-m", "tests.cktf_forkserver", str(listening)], cwd=repo,
                              env={**os.environ, "PYTHONPATH": str(repo)})
    deadline = time.monotonic() + 300
    while not listening.exists():
        assert server.poll() is None and time.monotonic() < deadline, "the cktf fork server did not start"
        time.sleep(0.05)
    yield client_executable(folder / "cktf", listening)
    server.terminate()
    server.wait(timeout=60)
