"""timm models as teachers and students (issue 22): built by name with random weights, tapped from timm's own
feature metadata, imported from .pth and .safetensors files; nothing is downloaded.

Inputs are 32 px (ViT-tiny/16 at 32 px is a 2x2 patch grid plus the class token), batch 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.cli_helpers import invoke, one_line_error
from tests.data_fixtures import write_image_folder
from tests.test_own_teacher_data import CONFIGS, write_unlabeled
from transfer.engine.checkpoint import read_metadata
from transfer.errors import CKTFError
from transfer.models import FeatureTaps, build_model, tap_spec_for
from transfer.models.checkpoints import load_network
from transfer.models.registry import get_entry

timm = pytest.importorskip("timm")

NAMES = ("resnet18", "convnext_atto", "efficientnet_b0", "regnetx_002", "vit_tiny_patch16_224")
CLASSES = 6
SIZE = 32


def _input() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path, Path]]:
    """Each model as timm creates it (6 classes, random weights), saved as a DDP-wrapped .pth and as .safetensors."""
    root = tmp_path_factory.mktemp("timm_weights")
    saved = {}
    for i, name in enumerate(NAMES):
        torch.manual_seed(i)
        model = timm.create_model(name, pretrained=False, num_classes=CLASSES).eval()
        state = model.state_dict()
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, root / f"{name}.pth")
        save_file({k: v.contiguous() for k, v in state.items()}, str(root / f"{name}.safetensors"))
        saved[name] = (model, root / f"{name}.pth", root / f"{name}.safetensors")
    return saved


@pytest.mark.parametrize("name", NAMES)
def test_default_taps_read_timm_own_features(weights, name):
    """Penultimate is forward_head(pre_logits=True), logits the model's output; CNN stages are NCHW maps at
    growing strides, ViT stages token maps [B, N, C] of four evenly spaced blocks."""
    model = build_model(f"timm.{name}", num_classes=CLASSES)
    model.load_state_dict(weights[name][0].state_dict())
    model.eval()
    out = FeatureTaps(model, tap_spec_for(f"timm.{name}", model)).eval()(x := _input())
    with torch.no_grad():
        assert torch.allclose(out.logits, model(x), atol=1e-5)
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.allclose(out.penultimate, pre_logits, atol=1e-5)
    assert out.penultimate.shape == (2, model.num_features)
    if name.startswith("vit"):
        assert [tuple(s.shape) for s in out.stages] == [(2, 5, 192)] * 4 and out.stem.shape == (2, 5, 192)
        assert tap_spec_for(f"timm.{name}", model).stages == ("blocks.2", "blocks.5", "blocks.8", "blocks.11")
    else:
        sides = [s.shape[-1] for s in out.stages]
        assert all(s.dim() == 4 for s in out.stages) and sides == sorted(sides, reverse=True) and sides[-1] == 1
        widths = [info["num_chs"] for info in model.feature_info if info["module"] in
                  tap_spec_for(f"timm.{name}", model).stages]
        assert [s.shape[1] for s in out.stages] == widths and out.stem.dim() == 4


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "resnext26ts"])
def test_default_taps_of_heads_traced_through_and_trailing_feature_entries(name):
    """MobileNetV3's classifier is a timm Linear the tracer goes into; resnext26ts's last feature_info entry is
    a parameterless final_conv after the last stage (still a stage)."""
    torch.manual_seed(0)
    model = build_model(f"timm.{name}", num_classes=3).eval()
    spec = tap_spec_for(f"timm.{name}", model)
    assert len(spec.stages) == 4
    out = FeatureTaps(model, spec).eval()(x := _input())
    with torch.no_grad():
        assert torch.allclose(out.penultimate, model.forward_head(model.forward_features(x), pre_logits=True))
        assert torch.allclose(out.logits, model(x), atol=1e-5)
        assert torch.allclose(out.stages[-1], model.forward_features(x), atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_import_reads_classes_and_pretrained_cfg_and_computes_the_same(weights, tmp_path, name, kind):
    model, pth, safetensors = weights[name]
    out = tmp_path / "t.safetensors"
    code, output = invoke("import-teacher", "--arch", f"timm.{name}", "--weights", str(pth if kind == "pth" else
                                                                                       safetensors),
                          "--out", str(out), "--image-size", str(SIZE))
    assert code == 0, output
    assert f"{CLASSES} classes" in output
    meta = read_metadata(out)
    cfg = model.pretrained_cfg
    assert (meta["model"], meta["num_classes"], meta["image_size"]) == (f"timm.{name}", str(CLASSES), str(SIZE))
    assert json.loads(meta["mean"]) == pytest.approx(list(cfg["mean"]))
    assert json.loads(meta["std"]) == pytest.approx(list(cfg["std"]))
    assert meta["interpolation"] == cfg["interpolation"] and float(meta["crop_pct"]) == cfg["crop_pct"]
    net = load_network(out, prefix="model.", kinds=("teacher",), option="--teacher")
    assert net.input.image_size == SIZE and net.input.crop_pct == cfg["crop_pct"]
    x = torch.randn(1, 3, 224, 224) if name.startswith("vit") else _input()  # timm's own ViT is 224 px only
    with torch.no_grad():
        assert torch.allclose(net.model.eval()(x), model(x), atol=1e-5)


def test_pretrained_cfg_defaults_and_flags_override_them(weights, tmp_path):
    _, pth, _ = weights["convnext_atto"]
    out = tmp_path / "t.safetensors"
    code, output = invoke("import-teacher", "--arch", "timm.convnext_atto", "--weights", str(pth), "--out", str(out),
                          "--mean", "0.5,0.5,0.5")
    assert code == 0, output
    meta = read_metadata(out)
    assert meta["image_size"] == "224" and json.loads(meta["mean"]) == [0.5, 0.5, 0.5]
    assert json.loads(meta["std"]) == pytest.approx([0.229, 0.224, 0.225])


def test_unknown_names_and_misfit_weights_are_one_line(weights, tmp_path):
    out = tmp_path / "t.safetensors"
    one_line_error(*invoke("import-teacher", "--arch", "timm.convnext_atoo", "--weights", str(weights["resnet18"][1]),
                           "--out", str(out)), "unknown timm model 'convnext_atoo'", "--arch", "closest:",
                   "convnext_atto")
    one_line_error(*invoke("import-teacher", "--arch", "timm.resnet34", "--weights", str(weights["resnet18"][2]),
                           "--out", str(out)), "does not fit timm.resnet34", "missing layer1.2.")
    assert not out.exists()
    with pytest.raises(CKTFError, match=r"\(option student.name\); closest: resnet18,"):
        get_entry("timm.resnet18x", "student.name")
    with pytest.raises(CKTFError, match=r"no pretrained tag 'bogus' \(option --arch\); its tags: a1_in1k, "):
        get_entry("timm.resnet18.bogus", "--arch")
    assert get_entry("timm.resnet18.a1_in1k", "--arch").family == "timm"


def test_without_timm_only_timm_names_fail(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    model = build_model("resnet8", num_classes=3)
    assert FeatureTaps(model, tap_spec_for("resnet8", model))(torch.randn(2, 3, 32, 32)).logits.shape == (2, 3)
    with pytest.raises(CKTFError) as info:
        build_model("timm.resnet18")
    assert str(info.value) == "timm models need the timm package: pip install 'cktf[timm]'"


def test_no_module_imports_timm_until_a_timm_name_is_used():
    import subprocess

    code = ("import sys; import transfer.cli, transfer.stages.import_teacher, transfer.stages.transfer, "
            "linear_probe.stage, transfer.api; from transfer.models import build_model, tap_spec_for; "
            "tap_spec_for('resnet8', build_model('resnet8')); assert 'timm' not in sys.modules, 'timm imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr


def test_channels_last_families_need_named_taps():
    with torch.device("meta"):
        model = build_model("timm.swin_tiny_patch4_window7_224", num_classes=3)
    with pytest.raises(CKTFError, match="channels-last.*taps"):
        tap_spec_for("timm.swin_tiny_patch4_window7_224", model)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def folder(tmp_path_factory, weights):
    """An image folder, timm teachers (vit_tiny, convnext_atto) and a cktf teacher (resnet10), all imported.

    The CKTF pairs have four stages on both sides (its stage terms pair stages one to one)."""
    root = tmp_path_factory.mktemp("timm_runs")
    write_unlabeled(root / "images/unlabeled", n=8)
    write_image_folder(root / "images", classes=("cat", "dog"), n_per_class=3, splits=("train", "test"),
                       size=(28, 36))
    torch.manual_seed(0)
    torch.save(build_model("resnet10", num_classes=4).state_dict(), root / "r10.pth")
    for arch, source in (("timm.vit_tiny_patch16_224", weights["vit_tiny_patch16_224"][2]),
                         ("timm.convnext_atto", weights["convnext_atto"][1]), ("resnet10", root / "r10.pth")):
        code, out = invoke("import-teacher", "--arch", arch, "--weights", str(source), "--out",
                           str(root / f"{arch}.safetensors"), "--image-size", str(SIZE))
        assert code == 0, out
    return root


def _transfer(root: Path, method: str, teacher: str, student: str, name: str) -> Path:
    code, out = invoke("transfer", "--config", str(CONFIGS / f"{method}.yaml"), "--teacher",
                       str(root / f"{teacher}.safetensors"), "--student.name", student, "--data.root",
                       str(root / "images"), "--data.num_workers", "0", "--log.root", str(root / "runs"),
                       "--log.name", name, "--train.epochs", "1", "--train.batch_size", "4",
                       "--sampler.num_negatives", "4", "--train.checkpoint_every", "0", "--log.tensorboard", "false",
                       "--train.threads", "1")
    assert code == 0, out
    assert f"{teacher} -> {student}" in out and f"{SIZE}x{SIZE} px" in out
    meta = read_metadata(root / "runs" / name / "last.safetensors")
    assert meta["teacher_model"] == teacher and meta["model"] == student
    return root / "runs" / name / "last.safetensors"


@pytest.mark.parametrize(("method", "teacher", "student"), [
    ("cktf", "timm.vit_tiny_patch16_224", "resnet10"),
    ("kd", "timm.convnext_atto", "resnet8"),
    ("cktf", "resnet10", "timm.regnetx_002"),
    ("kd", "resnet10", "timm.efficientnet_b0"),
])
def test_transfer_between_timm_and_cktf_networks(folder, method, teacher, student):
    """One epoch of each method in both directions; the student's weights move."""
    path = _transfer(folder, method, teacher, student, f"{method}_{teacher}_{student}")
    net = load_network(path, prefix="student.model.", kinds=("transfer",), option="--student")
    fresh = build_model(student, num_classes=4)
    assert net.name == student and any(not torch.equal(v, fresh.state_dict()[k]) for k, v in
                                       net.model.state_dict().items() if v.is_floating_point())


def test_probe_of_timm_students(folder):
    student = _transfer(folder, "cktf", "timm.convnext_atto", "timm.resnet18", "cktf_to_timm_resnet18")
    common = ("--config", str(CONFIGS / "probe.yaml"), "--data.root", str(folder / "images"), "--train.epochs", "1",
              "--train.batch_size", "4", "--probe.knn_k", "3", "--log.tensorboard", "false", "--train.threads", "1",
              "--data.num_workers", "0")
    code, out = invoke("probe", "--student", str(student), *common)
    assert code == 0 and "probe test acc" in out, out
    code, out = invoke("probe", "--probe.backbone", "random", "--probe.model", "timm.vit_tiny_patch16_224",
                       "--probe.out", str(folder / "probe_random_vit"), "--data.image_size", str(SIZE), *common)
    assert code == 0 and "probe test acc" in out, out


def test_python_api_with_a_timm_teacher():
    from transfer.api import CKTFLoss

    torch.manual_seed(0)
    teacher = timm.create_model("convnext_atto", pretrained=False, num_classes=5)
    student = build_model("resnet10", num_classes=5)
    images = torch.rand(8, 3, SIZE, SIZE)
    objective = CKTFLoss(student, teacher, num_items=8, sample_input=images[:4], num_negatives=4,
                         terms={"mckt": 0.8, "pckt": 0.2, "kd": 1.0})
    optimizer = torch.optim.SGD(objective.trainable_parameters(), lr=0.05)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss = objective(images[:4], torch.arange(4))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and {"pckt", "kd", "mckt/stem", "mckt/stage4"} <= set(objective.last_terms)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_unknown_timm_student_and_probe_model_name_their_option(folder):
    code, out = invoke("transfer", "--config", str(CONFIGS / "kd.yaml"), "--teacher",
                       str(folder / "resnet10.safetensors"), "--student.name", "timm.resnt18", "--data.root",
                       str(folder / "images"), "--log.root", str(folder / "runs"), "--log.name", "typo")
    one_line_error(code, out, "unknown timm model 'resnt18' (option student.name); closest: resnet18,")
    assert not (folder / "runs/typo").exists()
    code, out = invoke("probe", "--probe.backbone", "random", "--probe.model", "timm.resnt18", "--config",
                       str(CONFIGS / "probe.yaml"), "--data.root", str(folder / "images"), "--probe.out",
                       str(folder / "probe_typo"), "--data.num_workers", "0")
    one_line_error(code, out, "(option probe.model); closest: resnet18,")


def test_sync_batchnorm_conversion_keeps_timm_norm_activations():
    """timm's BatchNormAct2d (EfficientNet, RegNet) applies its activation; torch's SyncBatchNorm conversion would
    drop it, so train.sync_bn would silently train another network."""
    from transfer.models.timm_models import convert_sync_batchnorm

    torch.manual_seed(0)
    model = build_model("timm.efficientnet_b0", num_classes=3).eval()
    x = _input()
    with torch.no_grad():
        expected = model(x)
        converted = convert_sync_batchnorm(model).eval()
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
        assert torch.allclose(converted(x), expected, atol=1e-5)
