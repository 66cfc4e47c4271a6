"""The paper-setting configs run end to end on tiny fixtures in the real on-disk formats:
VGG-19 teacher on Tiny-ImageNet → CKTF to VGG-8 on STL-10's unlabeled split (64×64) → STL-10 probe."""

import json
from pathlib import Path

from tests.cli_helpers import invoke
from tests.data_fixtures import write_stl10, write_tinyimagenet
from transfer.engine.checkpoint import load_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs/tinyimagenet_to_stl10"


def test_tinyimagenet_teacher_to_stl10_student_and_probe(tmp_path):
    write_tinyimagenet(tmp_path / "tin", n_train=4, n_val=2, n_test=1)
    write_stl10(tmp_path / "stl", n_train=20, n_test=10, n_unlabeled=24)
    small = ["--train.epochs", "1", "--train.batch_size", "4", "--data.num_workers", "0", "--log.root",
             str(tmp_path / "runs")]
    code, out = invoke("train-teacher", "--config", str(CONFIGS / "teacher_vgg19.yaml"), "--data.root",
                       str(tmp_path / "tin"), "--data.val_fraction", "0.25", *small)
    assert code == 0, out
    teacher = tmp_path / "runs/tinyimagenet_vgg19_teacher/best.safetensors"
    assert load_checkpoint(teacher).metadata["num_classes"] == "3"

    code, out = invoke("transfer", "--config", str(CONFIGS / "cktf_vgg19_vgg8.yaml"), "--data.root",
                       str(tmp_path / "stl"), "--teacher", str(teacher), "--sampler.num_negatives", "8", *small)
    assert code == 0, out
    run = tmp_path / "runs/stl10_cktf_vgg19_vgg8"
    ckpt = load_checkpoint(run / "last.safetensors")
    # stem + 4 VGG stages + penultimate = the paper's six objectives
    pairs = {k.split(".")[3] for k in ckpt.state["task"] if k.startswith("terms.mckt.pairs.")}
    assert pairs == {"stem", "stage1", "stage2", "stage3", "stage4"}
    assert any(k.startswith("terms.pckt.") for k in ckpt.state["task"])
    assert ckpt.metadata["num_classes"] == "3"  # the student's head has the teacher's (source) classes

    code, out = invoke("probe", "--config", str(CONFIGS / "probe.yaml"), "--student", str(run / "last.safetensors"),
                       "--data.root", str(tmp_path / "stl"), "--train.epochs", "1", "--train.batch_size", "4",
                       "--data.num_workers", "0", "--probe.knn_k", "3")
    assert code == 0, out
    metrics = json.loads((run / "probe/metrics.json").read_text())
    assert metrics["method"] == "cktf" and metrics["train_items"] == 20 and metrics["test_items"] == 10
