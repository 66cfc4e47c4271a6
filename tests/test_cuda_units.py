"""What breaks only on GPUs, pinned on the CPU: diagnostics on the losses' device in the engine's all-gather,
SyncBatchNorm inside traced taps, resuming on fewer GPUs, the Python API without faiss.
(tests/test_fake_cuda.py runs the forwards themselves on fake CUDA tensors.)"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from transfer.api import CKTFLoss, network_device
from transfer.config import TrainConfig
from transfer.engine import distributed, runtime
from transfer.engine.logger import RunLogger
from transfer.engine.rundir import prepare_run_dir
from transfer.engine.trainer import Engine
from transfer.models import build_model

REPO = Path(__file__).resolve().parents[1]


def test_reduce_step_gathers_terms_that_sit_on_another_device(monkeypatch):
    """A term's diagnostic on the CPU next to losses on the engine's device (``meta`` stands in for CUDA: it
    refuses to be stacked with CPU tensors as CUDA does) is moved before the per-step all-gather."""
    sent = []

    def gather_two_ranks(tensor):
        sent.append(tensor)
        return torch.zeros(2, tensor.shape[1])  # meta tensors hold no values: the gather's values do not matter

    monkeypatch.setattr(distributed, "gather_cat", gather_two_ranks)
    engine = Engine.__new__(Engine)  # only the two attributes _reduce_step reads
    engine.world, engine.device = 2, torch.device("meta")
    terms = {"loss": torch.zeros((), device="meta"), "mapping/stage1": torch.tensor(3.0)}
    means, signum, due = engine._reduce_step(terms, None, False)
    assert sent[0].device.type == "meta" and sent[0].shape == (1, 4)
    assert set(means) == set(terms) and signum is None and due is False


def test_sync_bn_runs_through_the_traced_taps(tmp_path, monkeypatch):
    """``train.sync_bn`` under torchrun: the taps' traced graph must call the SyncBatchNorm layers (it kept the
    replaced BatchNorm2d, and ranks' statistics drifted apart)."""
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", 1, 10), build_model("resnet8", 1, 10)
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in student.modules())
    objective = CKTFLoss(student, teacher, num_items=8, sample_input=torch.rand(2, 1, 28, 28), terms={"kd": 1.0})
    run = prepare_run_dir(tmp_path / "run", resume=False, overwrite=False)
    engine = Engine(objective.task, TrainConfig(epochs=1, batch_size=2, sync_bn=True), run,
                    RunLogger(run.path, tensorboard=False, progress=False), torch.device("cpu"), {})
    for taps in (engine.task.student, engine.task.teacher.module):
        traced = list(taps._extractor.modules())
        assert sum(isinstance(m, nn.SyncBatchNorm) for m in traced) == batchnorms
        assert not any(isinstance(m, nn.BatchNorm2d) for m in traced)
    calls = []
    for module in engine.task.student.model.modules():
        if isinstance(module, nn.SyncBatchNorm):
            module.register_forward_hook(lambda *_: calls.append(1))
    engine.task.student(torch.rand(2, 1, 28, 28))  # no process group here: SyncBatchNorm computes as BatchNorm
    assert len(calls) == batchnorms


def test_resume_on_fewer_gpus_restores_the_states_it_can_and_warns_once(monkeypatch, caplog):
    """A checkpoint written by a process that saw 2 GPUs, resumed where 1 exists (``set_rng_state_all`` raised
    an IndexError for the second)."""
    restored = {}

    def set_state(state, device=0):
        if device >= 1:
            raise IndexError("tuple index out of range")  # torch.cuda.default_generators[device]
        restored[device] = state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_state)
    runtime._warn_fewer_devices.cache_clear()
    state = runtime.rng_state()
    state["cuda"] = [torch.full((8,), i, dtype=torch.uint8) for i in range(2)]
    with caplog.at_level(logging.WARNING, logger="cktf"):
        runtime.set_rng_state(state)
        runtime.set_rng_state(state)
    assert list(restored) == [0] and torch.equal(restored[0], state["cuda"][0])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 devices" in warnings[0] and "sees 1" in warnings[0]


def test_api_import_needs_no_faiss():
    code = "import sys; from transfer.api import CKTFLoss; print('faiss' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_api_refuses_networks_on_two_devices():
    student, teacher = nn.Linear(2, 2), nn.Linear(2, 2, device="meta")
    with pytest.raises(ValueError, match="one device, found cpu, meta"):
        network_device(student, teacher)
    assert network_device(nn.ReLU(), nn.ReLU()) == torch.device("cpu")
