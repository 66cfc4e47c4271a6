"""The linear probe: it learns, it never moves the frozen student, its two modes agree, bad input is one line."""

import json
from pathlib import Path

import pytest
import torch

from linear_probe.features import FeatureDataset
from linear_probe.probe import LinearProbe, ProbeTask
from tests.cli_helpers import invoke, one_line_error
from tests.data_fixtures import write_fashion_idx
from transfer.config import TrainConfig
from transfer.engine.checkpoint import load_checkpoint
from transfer.engine.logger import RunLogger
from transfer.engine.rundir import prepare_run_dir
from transfer.engine.trainer import Engine
from transfer.sampling import file_sha256
from transfer.stages.common import make_loader

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs/fashion_split"


def test_probe_separates_linearly_separable_features(tmp_path):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 4
    labels = torch.randint(0, 4, (400,), generator=g)
    feats = centers[labels] + torch.randn(400, 16, generator=g) * 0.3
    train, test = FeatureDataset(feats[:300], labels[:300]), FeatureDataset(feats[300:], labels[300:])
    probe = LinearProbe(16, 4, feats[:300].mean(0), feats[:300].std(0))
    task = ProbeTask(torch.nn.Identity(), probe)
    cfg = TrainConfig(epochs=10, batch_size=32, lr=0.1, schedule="cosine")
    run = prepare_run_dir(tmp_path / "p", resume=False, overwrite=False)
    engine = Engine(task, cfg, run, RunLogger(run.path, tensorboard=False, progress=False), torch.device("cpu"), {})
    cpu = torch.device("cpu")
    result = engine.fit(make_loader(train, 32, train=True, num_workers=0, device=cpu),
                        {"test": make_loader(test, 100, train=False, num_workers=0, device=cpu)})
    assert result.final["test/acc"] >= 0.99


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    write_fashion_idx(root / "fashion", n_train=600, n_test=200)
    common = ["--data.root", str(root / "fashion"), "--log.root", str(root / "runs"), "--train.epochs", "1",
              "--train.batch_size", "32", "--log.tensorboard", "false"]
    assert invoke("train-teacher", "--config", str(CONFIGS / "teacher.yaml"), "--log.name", "teacher",
                  "--model.name", "resnet8", *common)[0] == 0
    code, out = invoke("transfer", "--config", str(CONFIGS / "kd.yaml"), "--teacher",
                       str(root / "runs/teacher/best.safetensors"), "--log.name", "kd", *common)
    assert code == 0, out
    return root


def probe_args(root: Path, *extra: str) -> list[str]:
    return ["probe", "--config", str(CONFIGS / "probe.yaml"), "--student", str(root / "runs/kd/last.safetensors"),
            "--data.root", str(root / "fashion"), "--data.options.labels_per_class", "10", "--train.epochs", "4",
            "--train.batch_size", "16", "--overwrite", *extra]


def student_buffers(path: Path) -> dict:
    state = load_checkpoint(path).state["task"]
    return {k: v.clone() for k, v in state.items() if k.startswith("student.")}


def test_probe_writes_curve_and_metrics_and_never_moves_the_student(student):
    before = student_buffers(student / "runs/kd/last.safetensors")
    code, out = invoke(*probe_args(student, "--probe.mode", "augment"))
    assert code == 0, out
    after = student_buffers(student / "runs/kd/last.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    metrics = json.loads((student / "runs/kd/probe/metrics.json").read_text())
    assert metrics["method"] == "kd" and metrics["epochs"] == 4 and 0 <= metrics["final_acc"] <= 1
    assert metrics["transfer_seconds"] > 0 and metrics["knn_acc"] is not None

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(student / "runs/kd/probe"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("probe/test_acc")] == [1, 2, 3, 4]
    assert {"probe/train_loss", "probe/knn_acc"} <= set(acc.Tags()["scalars"])
    assert not [tag for tag in acc.Tags()["scalars"] if tag.startswith("probe/train/")]  # one tag per quantity


def test_linear_probe_without_statistics_is_a_plain_linear_map():
    x = torch.randn(5, 3) * 50 + 7
    raw = LinearProbe(3, 2)
    assert torch.allclose(raw(x), x @ raw.linear.weight.T + raw.linear.bias)
    standardised = LinearProbe(3, 2, x.mean(0), x.std(0))
    standardised.linear.load_state_dict(raw.linear.state_dict())
    expected = ((x - x.mean(0)) / x.std(0)) @ raw.linear.weight.T + raw.linear.bias
    assert torch.allclose(standardised(x), expected, atol=1e-5)
    assert not torch.allclose(standardised(x), raw(x))
    with pytest.raises(ValueError, match="mean and std"):
        LinearProbe(3, 2, x.mean(0))


def test_probe_on_raw_features(student, tmp_path):
    """probe.standardize false (the reference protocol) trains on the raw penultimate features."""
    runs = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        code, text = invoke(*probe_args(student, "--probe.standardize", flag, "--probe.out", str(out),
                                        "--train.epochs", "2"))
        assert code == 0, text
        runs[flag] = (load_checkpoint(out / "last.safetensors").state["task"],
                      json.loads((out / "metrics.json").read_text()))
    raw_state, raw_metrics = runs["false"]
    assert torch.equal(raw_state["probe.mean"], torch.zeros_like(raw_state["probe.mean"]))
    assert torch.equal(raw_state["probe.std"], torch.ones_like(raw_state["probe.std"]))
    assert raw_metrics["standardize"] is False and runs["true"][1]["standardize"] is True
    assert not torch.equal(runs["true"][0]["probe.mean"], raw_state["probe.mean"])  # the default standardises


def test_backbone_batchnorm_is_bit_identical_during_augment_probe(student, monkeypatch):
    from linear_probe import stage

    seen = {}
    original = stage.network_features

    def spy(model, name, taps):
        seen["model"] = model
        seen["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        return original(model, name, taps)

    monkeypatch.setattr(stage, "network_features", spy)
    assert invoke(*probe_args(student, "--probe.mode", "augment"))[0] == 0
    after = seen["model"].state_dict()
    assert any("running_mean" in k for k in after)
    assert all(torch.equal(seen["before"][k], after[k]) for k in after)


def test_cached_and_augment_agree_without_augmentation(student, monkeypatch):
    from linear_probe import stage

    monkeypatch.setattr(stage, "train_pipeline", lambda d: (stage.build_transform(d.name, False, d.image_size), None))
    accs = {}
    for mode in ("cached", "augment"):
        assert invoke(*probe_args(student, "--probe.mode", mode))[0] == 0
        accs[mode] = json.loads((student / "runs/kd/probe/metrics.json").read_text())["final_acc"]
    assert abs(accs["cached"] - accs["augment"]) <= 0.05, accs  # 200 test images: 0.05 = 10 images


def test_cached_and_augment_are_identical_on_pixels(student, monkeypatch, tmp_path):
    """Pixel features are exact in both modes, so the two training runs (same order, same features) coincide."""
    from linear_probe import stage

    monkeypatch.setattr(stage, "train_pipeline", lambda d: (stage.build_transform(d.name, False, d.image_size), None))
    curves = {}
    for mode in ("cached", "augment"):
        args = probe_args(student, "--probe.mode", mode, "--probe.backbone", "pixels", "--probe.out",
                          str(tmp_path / mode), "--train.epochs", "6")
        assert invoke(*args)[0] == 0
        curves[mode] = [row["test/acc"] for row in load_checkpoint(tmp_path / mode / "last.safetensors")
                        .state["history"]]
    assert len(curves["cached"]) == 6 and len(set(curves["cached"])) > 1
    assert curves["cached"] == pytest.approx(curves["augment"], abs=1e-9)


def test_controls_random_init_and_pixels(student, tmp_path):
    for extra in (["--probe.backbone", "random", "--probe.model", "resnet8"], ["--probe.backbone", "pixels"]):
        args = probe_args(student, *extra, "--probe.out", str(tmp_path / extra[1]))
        args.remove("--student")
        args.remove(str(student / "runs/kd/last.safetensors"))
        code, out = invoke(*args)
        assert code == 0, out
        metrics = json.loads((tmp_path / extra[1] / "metrics.json").read_text())
        assert metrics["method"] == {"random": "random_init", "pixels": "pixels"}[extra[1]]


def test_probe_of_a_checkpoint_that_is_not_a_transfer_checkpoint(student, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    args = probe_args(student)
    args[args.index("--student") + 1] = str(junk)
    one_line_error(*invoke(*args), "junk.safetensors")
    assert invoke(*probe_args(student, "--train.epochs", "1"))[0] == 0
    args[args.index("--student") + 1] = str(student / "runs/kd/probe/last.safetensors")
    one_line_error(*invoke(*args), "'probe' checkpoint")


def test_probe_split_without_labels(student):
    one_line_error(*invoke(*probe_args(student, "--data.train_split", "target_unlabeled")), "target_unlabeled",
                   "labeled")


def test_compare_cli_writes_report_and_rejects_empty_run_dir(student, tmp_path):
    assert invoke(*probe_args(student))[0] == 0
    code, out = invoke("compare", str(student / "runs/kd"), "--out", str(tmp_path / "report"))
    assert code == 0, out
    assert (tmp_path / "report/convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "kd" in (tmp_path / "report/comparison.md").read_text()
    empty = tmp_path / "empty_run"
    empty.mkdir()
    one_line_error(*invoke("compare", str(empty), "--out", str(tmp_path / "r2")), "empty_run")
    assert not (tmp_path / "r2").exists()


def test_stl10_probe_with_the_paper_config(tmp_path):
    from tests.data_fixtures import write_stl10

    write_stl10(tmp_path / "stl", n_train=40, n_test=20, n_unlabeled=4)
    code, out = invoke("probe", "--config", str(REPO / "configs/tinyimagenet_to_stl10/probe.yaml"),
                       "--data.root", str(tmp_path / "stl"), "--probe.backbone", "random", "--probe.model", "vgg8",
                       "--probe.out", str(tmp_path / "p"), "--train.epochs", "2", "--train.batch_size", "8",
                       "--data.num_workers", "0", "--probe.knn_k", "3")
    assert code == 0, out
    metrics = json.loads((tmp_path / "p/metrics.json").read_text())
    assert metrics["train_items"] == 40 and metrics["test_items"] == 20 and metrics["mode"] == "augment"


def test_probes_of_two_checkpoints_never_mix(student, tmp_path):
    """A probe directory belongs to one network: --resume with another checkpoint is refused naming both, and
    two checkpoints side by side outside a run directory get a probe directory each (issue 20)."""
    import shutil

    folder = tmp_path / "teachers"
    folder.mkdir()
    shutil.copy(student / "runs/teacher/best.safetensors", folder / "a.safetensors")
    shutil.copy(student / "runs/kd/last.safetensors", folder / "b.safetensors")
    base = probe_args(student)[:-1]  # without --overwrite
    base[base.index("--student") + 1] = str(folder / "a.safetensors")
    base[base.index("--train.epochs") + 1] = "1"
    assert invoke(*base)[0] == 0
    assert (folder / "probe_a/metrics.json").is_file()
    other = list(base)
    other[other.index("--student") + 1] = str(folder / "b.safetensors")
    assert invoke(*other)[0] == 0
    assert (folder / "probe_b/metrics.json").is_file()
    for extra in ([], ["--resume"]):
        code, out = invoke(*other, "--probe.out", str(folder / "probe_a"), *extra)
        one_line_error(code, out, "holds the probe of", "a.safetensors", "b.safetensors", "--probe.out")
    code, out = invoke(*base, "--resume")
    assert code == 0, out
    metrics = json.loads((folder / "probe_a/metrics.json").read_text())
    assert metrics["run"].endswith("a.safetensors") and metrics["backbone_sha256"] == file_sha256(
        folder / "a.safetensors")


def test_a_run_directorys_checkpoint_is_probed_into_its_probe_folder(student):
    from linear_probe.stage import default_probe_dir

    assert default_probe_dir(student / "runs/kd/last.safetensors") == student / "runs/kd/probe"
    assert default_probe_dir(Path("/x/r18.safetensors")) == Path("/x/probe_r18")
