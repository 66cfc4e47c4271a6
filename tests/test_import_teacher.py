"""`cktf import-teacher`: pretrained weights (state dict or safetensors) become a teacher checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from tests.cli_helpers import invoke, one_line_error
from tests.data_fixtures import CodePayload
from transfer.engine.checkpoint import read_metadata
from transfer.models.checkpoints import load_network
from transfer.models.importer import WeightsError, read_state_dict


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A torchvision resnet18 with 7 classes, saved as a wrapped DDP-style .pth and as .safetensors."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    state = model.state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, root / "r18.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "r18.safetensors"))
    return root, model


def _import(weights: Path, out: Path, *extra: str) -> tuple[int, str]:
    return invoke("import-teacher", "--arch", "torchvision.resnet18", "--weights", str(weights), "--out", str(out),
                  *extra)


@pytest.mark.parametrize("name", ["r18.pth", "r18.safetensors"])
def test_imported_teacher_loads_like_a_trained_one_and_computes_the_same(resnet, tmp_path, name):
    root, model = resnet
    out = tmp_path / "t.safetensors"
    code, output = _import(root / name, out, "--image-size", "32")
    assert code == 0, output
    assert "7 classes" in output and "3 channels" in output
    meta = read_metadata(out)
    assert meta["kind"] == "teacher" and meta["model"] == "torchvision.resnet18"
    assert (meta["in_channels"], meta["num_classes"], meta["image_size"]) == ("3", "7", "32")
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    net = load_network(out, prefix="model.", kinds=("teacher",), option="--teacher")
    assert net.input.image_size == 32 and net.input.std == pytest.approx((0.229, 0.224, 0.225))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net.model.eval()(x), model(x), atol=1e-5)


def test_existing_out_needs_overwrite_and_missing_folder_is_refused(resnet, tmp_path):
    root, _ = resnet
    out = tmp_path / "t.safetensors"
    out.write_bytes(b"keep me")
    one_line_error(*_import(root / "r18.safetensors", out), str(out), "--overwrite")
    assert out.read_bytes() == b"keep me"
    code, output = _import(root / "r18.safetensors", out, "--overwrite", "--image-size", "32")
    assert code == 0, output
    assert read_metadata(out)["kind"] == "teacher"
    one_line_error(*_import(root / "r18.safetensors", tmp_path / "no" / "t.safetensors"), "does not exist")
    (tmp_path / "file").write_text("x")
    one_line_error(*_import(root / "r18.safetensors", tmp_path / "file" / "t.safetensors"), "not a directory")
    assert not (tmp_path / "no").exists()


def test_a_pickle_carrying_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "extra": CodePayload(marker)}, evil)
    out = tmp_path / "t.safetensors"
    one_line_error(*_import(evil, out), str(evil), "refused", "weights_only")
    assert not marker.exists() and not out.exists()
    with pytest.raises(WeightsError):
        read_state_dict(evil)
    assert not marker.exists()


def test_wrong_architecture_missing_keys_and_shapes_are_one_line(resnet, tmp_path):
    root, model = resnet
    out = tmp_path / "t.safetensors"
    code, output = invoke("import-teacher", "--arch", "torchvision.resnet34", "--weights", str(root / "r18.pth"),
                          "--out", str(out))
    one_line_error(code, output, "does not fit torchvision.resnet34", "missing layer1.2.", "more")
    state = model.state_dict()
    del state["layer4.1.conv2.weight"]
    torch.save(state, tmp_path / "missing.pth")
    one_line_error(*_import(tmp_path / "missing.pth", out), "missing layer4.1.conv2.weight")
    one_line_error(*_import(root / "r18.pth", out, "--num-classes", "9"), "fc.weight (7, 512) vs (9, 512)")
    bad = model.state_dict()
    bad["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    one_line_error(*_import(tmp_path / "bad.pth", out), "unexpected extra.weight",
                   "layer1.0.conv1.weight (64, 64, 1, 1) vs (64, 64, 3, 3)")
    one_line_error(*invoke("import-teacher", "--arch", "resnet9000", "--weights", str(root / "r18.pth"), "--out",
                           str(out)), "--arch", "resnet9000")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    one_line_error(*_import(tmp_path / "junk.pth", out), "junk.pth")
    torch.save({"epoch": 3}, tmp_path / "nostate.pth")
    one_line_error(*_import(tmp_path / "nostate.pth", out), "no state dict")
    assert not out.exists()


def test_registry_model_sizes_are_read_off_the_weights(tmp_path):
    from transfer.models import build_model

    model = build_model("resnet8", in_channels=1, num_classes=4)
    torch.save(model.state_dict(), tmp_path / "r8.pt")
    out = tmp_path / "t.safetensors"
    code, output = invoke("import-teacher", "--arch", "resnet8", "--weights", str(tmp_path / "r8.pt"), "--out",
                          str(out))
    assert code == 0, output
    meta = read_metadata(out)
    assert (meta["in_channels"], meta["num_classes"]) == ("1", "4") and "image_size" not in meta
    one_line_error(*invoke("import-teacher", "--arch", "resnet8", "--weights", str(tmp_path / "r8.pt"), "--out",
                           str(tmp_path / "u.safetensors"), "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2"),
                   "3 values", "1-channel")
