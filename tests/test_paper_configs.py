"""The paper-setting configs run end to end on tiny fixtures in the real on-disk formats:
VGG-19 teacher on Tiny-ImageNet → CKTF to VGG-8 / VGG-19 on STL-10's unlabeled split (64×64) → STL-10 probe,
with every setting of the published code (batch-dim normalised stage maps, per-batch mapping, plain SGD, the
teacher's last epoch, raw-feature probe)."""

import json
from pathlib import Path

import pytest
import yaml

from tests.cli_helpers import invoke
from tests.data_fixtures import write_stl10, write_tinyimagenet
from transfer.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs/tinyimagenet_to_stl10"


def read(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_configs_follow_the_published_code():
    teacher = read("teacher_vgg19.yaml")
    assert teacher["data"]["val_fraction"] == 0.0 and teacher["train"]["nesterov"] is False
    for method in ("kd", "crd", "cktf"):
        for student in ("vgg8", "vgg19"):
            cfg = read(f"{method}_vgg19_{student}.yaml")
            assert cfg["train"]["nesterov"] is False and cfg["train"]["momentum"] == 0.9
            assert cfg["teacher"]["checkpoint"].endswith("tinyimagenet_vgg19_teacher/last.safetensors")
            assert cfg["loss"]["nce"]["temperature"] == 0.07 and cfg["sampler"]["shared"] is False
            assert set(cfg["loss"]["terms"]) == {"kd": {"kd"}, "crd": {"pckt"}, "cktf": {"mckt", "pckt"}}[method]
    cktf = read("cktf_vgg19_vgg8.yaml")["loss"]
    assert (cktf["terms"]["mckt"]["weight"], cktf["terms"]["pckt"]["weight"], cktf["nce"]["stage_norm"],
            cktf["nce"]["stage_pool"]) == (0.04, 1.0, "batch", "reference")
    probe = read("probe.yaml")
    assert probe["probe"] == {"mode": "augment", "standardize": False, "knn_k": 20}
    assert (probe["train"]["epochs"], probe["train"]["milestones"], probe["train"]["batch_size"],
            probe["train"]["lr"], probe["train"]["nesterov"]) == (240, [150, 180, 210], 64, 0.05, False)
    for path in sorted((REPO / "configs").glob("*/cktf_*_*.yaml")):
        if path.parent.name not in ("cifar100", "tinyimagenet"):
            continue
        compression = yaml.safe_load(path.read_text())
        if "base" in compression:
            continue  # a Table 2 CKTF+X row building on its Table 1 row (tests/test_compression.py)
        weights = {name: options["weight"] for name, options in compression["loss"]["terms"].items()}
        assert weights == {"ce": 1.0, "pckt": 0.8, "mckt": 0.1}, path
        assert compression["data"]["val_fraction"] == 0.1 and compression["data"]["test_split"], path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    write_tinyimagenet(root / "tin", n_train=4, n_val=2, n_test=1)
    write_stl10(root / "stl", n_train=20, n_test=10, n_unlabeled=24)
    code, out = invoke("train-teacher", "--config", str(CONFIGS / "teacher_vgg19.yaml"), "--data.root",
                       str(root / "tin"), *small(root))
    assert code == 0, out
    run = root / "runs/tinyimagenet_vgg19_teacher"
    assert not (run / "best.safetensors").exists()  # trained on the whole train split: nothing to select on
    assert load_checkpoint(run / "last.safetensors").metadata["num_classes"] == "3"
    return root


def small(root: Path) -> list[str]:
    return ["--train.epochs", "1", "--train.batch_size", "4", "--data.num_workers", "0", "--log.root",
            str(root / "runs")]


@pytest.mark.slow(reason="a VGG-19 teacher (module fixture), a VGG-8/VGG-19 student at 64 px and an augmenting "
                         "probe")
@pytest.mark.parametrize("student", ["vgg8", "vgg19"])
def test_tinyimagenet_teacher_to_stl10_student_and_probe(teacher, student):
    root = teacher
    config = CONFIGS / f"cktf_vgg19_{student}.yaml"
    code, out = invoke("transfer", "--config", str(config), "--data.root", str(root / "stl"), "--teacher",
                       str(root / "runs/tinyimagenet_vgg19_teacher/last.safetensors"), "--sampler.num_negatives",
                       "8", *small(root))
    assert code == 0, out
    run = root / f"runs/stl10_cktf_vgg19_{student}"
    saved = yaml.safe_load((run / "config.yaml").read_text())["loss"]
    assert (saved["nce"]["stage_norm"], saved["nce"]["stage_pool"], saved["terms"]["mckt"]["mapping_schedule"]) == (
        "batch", "reference", "per_batch")
    ckpt = load_checkpoint(run / "last.safetensors")
    # stem + 4 VGG stages + penultimate = the paper's six objectives
    pairs = {k.split(".")[3] for k in ckpt.state["task"] if k.startswith("terms.mckt.pairs.")}
    assert pairs == {"stem", "stage1", "stage2", "stage3", "stage4"}
    assert any(k.startswith("terms.pckt.") for k in ckpt.state["task"])
    assert ckpt.metadata["num_classes"] == "3"  # the student's head has the teacher's (source) classes
    # VGG: the reference pools globally, so a stage head reads the channels (stage 2 of VGG: 256)
    head = ckpt.state["task"]["terms.mckt.pairs.stage2.head_student.net.weight"]
    assert head.shape[1] == 256

    code, out = invoke("probe", "--config", str(CONFIGS / "probe.yaml"), "--student", str(run / "last.safetensors"),
                       "--data.root", str(root / "stl"), "--train.epochs", "2", "--train.milestones", "[1]",
                       "--train.batch_size", "4", "--data.num_workers", "0", "--probe.knn_k", "3")
    assert code == 0, out
    metrics = json.loads((run / "probe/metrics.json").read_text())
    assert metrics["method"] == "cktf" and metrics["train_items"] == 20 and metrics["test_items"] == 10
    assert metrics["mode"] == "augment" and metrics["standardize"] is False and metrics["epochs"] == 2
    assert metrics["best_epoch"] is None  # no validation split: the last epoch is the result, never a test max
    probe = load_checkpoint(run / "probe/last.safetensors").state["task"]
    assert float(probe["probe.mean"].abs().sum()) == 0.0 and float((probe["probe.std"] - 1).abs().sum()) == 0.0
