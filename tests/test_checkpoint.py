"""Checkpoints: nested state round trip without pickle, atomic writes, clear errors on bad files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from transfer.engine.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from transfer.engine.runtime import rng_state, set_rng_state
from transfer.errors import CKTFError


def test_round_trip_of_nested_state(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "pair": (1, "a"),
             "best": {"epoch": None, "value": 0.5}, "list": [torch.ones(2), 2.5]}
    path = save_checkpoint(tmp_path / "c.safetensors", state, {"kind": "teacher", "extra": {"a": 1}})
    ckpt = load_checkpoint(path)
    assert ckpt.metadata["kind"] == "teacher" and json.loads(ckpt.metadata["extra"]) == {"a": 1}
    assert ckpt.state["epoch"] == 3 and ckpt.state["pair"] == (1, "a") and ckpt.state["best"]["epoch"] is None
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.state["model"][key], value)
    # integer keys of the optimizer state survive, so the optimizer accepts it
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ckpt.state["optimizer"])
    momentum = opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], momentum)


def test_shared_and_strided_tensors_are_stored(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    state = {"a": base, "b": base, "t": base.t(), "view": base[1]}
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "s.safetensors", state))
    assert torch.equal(ckpt.state["t"], base.t()) and torch.equal(ckpt.state["view"], base[1])
    assert torch.equal(ckpt.state["b"], base)


def test_atomic_write_keeps_previous_file_on_failure(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", {"x": torch.ones(3)})
    with pytest.raises(TypeError):
        save_checkpoint(path, {"x": object()})
    assert torch.equal(load_checkpoint(path).state["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not safetensors")
    with pytest.raises(CKTFError, match="junk.safetensors") as info:
        load_checkpoint(junk)
    assert "\n" not in str(info.value)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(1)}, str(plain))
    with pytest.raises(CKTFError, match="not a cktf checkpoint"):
        read_metadata(plain)
    with pytest.raises(CKTFError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    state = rng_state()
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    saved = load_checkpoint(save_checkpoint(tmp_path / "r.safetensors", {"rng": state})).state["rng"]
    set_rng_state(saved)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected
