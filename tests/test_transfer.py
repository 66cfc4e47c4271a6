"""`cktf transfer` end to end on a tiny Fashion-MNIST fixture, plus the task's gradient contract."""

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.cli_helpers import invoke, one_line_error
from tests.data_fixtures import write_fashion_idx
from transfer.config import LossConfig, NCEConfig
from transfer.engine.checkpoint import load_checkpoint
from transfer.losses.terms import TermContext, build_terms
from transfer.models import FeatureTaps, build_model, tap_spec_for
from transfer.sampling import build_sampler
from transfer.tasks.transfer import TransferTask

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs/fashion_split"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    write_fashion_idx(root / "fashion", n_train=400, n_test=100)
    code, out = invoke("train-teacher", "--config", str(CONFIGS / "teacher.yaml"), "--data.root",
                       str(root / "fashion"), "--log.root", str(root / "runs"), "--log.name", "teacher",
                       "--model.name", "resnet8", "--train.epochs", "1", "--train.batch_size", "32",
                       "--log.tensorboard", "false")
    assert code == 0, out
    return root


def transfer_args(root: Path, method: str, name: str, *extra: str) -> list[str]:
    return ["transfer", "--config", str(CONFIGS / f"{method}.yaml"), "--teacher",
            str(root / "runs/teacher/best.safetensors"), "--data.root", str(root / "fashion"), "--log.root",
            str(root / "runs"), "--log.name", name, "--train.batch_size", "16", "--train.epochs", "2",
            "--sampler.num_negatives", "64", "--sampler.cache_dir", str(root / "cache"), "--log.log_every", "1",
            *extra]


def scalar_tags(run_dir: Path) -> set[str]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.mark.parametrize("method,terms", [
    ("kd", {"train/kd"}),
    ("crd", {"train/pckt"}),
    ("cktf", {"train/pckt", "train/mckt/stem", "train/mckt/stage1", "train/mckt/stage2", "train/mckt/stage3"}),
    ("cktf_kd", {"train/kd", "train/pckt", "train/mckt/stem"}),
])
def test_each_method_runs_and_logs_its_terms(setup, method, terms):
    code, out = invoke(*transfer_args(setup, method, f"t_{method}"))
    assert code == 0, out
    run_dir = setup / "runs" / f"t_{method}"
    tags = scalar_tags(run_dir)
    assert terms <= tags and {"train/loss", "lr", "train/images_per_s"} <= tags
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert ckpt.metadata["kind"] == "transfer" and ckpt.metadata["method"] == method
    assert not any(k.startswith("teacher.") for k in ckpt.state["task"])
    assert any(k.startswith("student.model.") for k in ckpt.state["task"])
    if method != "kd":
        banks = [k for k in ckpt.state["task"] if k.endswith("weight") and "bank_" in k]
        zs = [k for k in ckpt.state["task"] if k.endswith(("z_student", "z_teacher"))]
        assert banks and zs and all(torch.isfinite(ckpt.state["task"][k]).all() for k in zs)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.json").is_file()


def test_contrastive_loss_decreases(setup):
    code, out = invoke(*transfer_args(setup, "crd", "learn", "--train.epochs", "6", "--train.lr", "0.1"))
    assert code == 0, out
    history = load_checkpoint(setup / "runs/learn/last.safetensors").state["history"]
    losses = [row["train/loss_epoch"] for row in history]
    assert losses[-1] < losses[0], losses


def test_resume_restores_banks_z_and_heads(setup):
    per_anchor = ("--sampler.shared", "false")
    assert invoke(*transfer_args(setup, "cktf", "r_straight", *per_anchor))[0] == 0
    assert invoke(*transfer_args(setup, "cktf", "r_split", "--train.epochs", "1", *per_anchor))[0] == 0
    extend = ("--resume", "--allow-change", "train.epochs")
    code, out = invoke(*transfer_args(setup, "cktf", "r_split", *extend, *per_anchor))
    assert code == 0, out
    a = load_checkpoint(setup / "runs/r_straight/last.safetensors").state["task"]
    b = load_checkpoint(setup / "runs/r_split/last.safetensors").state["task"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_debiased_sampler_builds_then_reuses_neighbour_cache(setup, caplog):
    args = transfer_args(setup, "crd", "deb", "--sampler.kind", "debiased", "--sampler.k", "4",
                         "--train.epochs", "1", "--sampler.shared", "false")
    with caplog.at_level("INFO", logger="cktf"):
        assert invoke(*args)[0] == 0
    tables = list((setup / "cache").glob("neighbours-*.safetensors"))
    assert len(tables) == 1
    stamp = tables[0].stat().st_mtime_ns
    assert invoke(*transfer_args(setup, "crd", "deb2", "--sampler.kind", "debiased", "--sampler.k", "4",
                                 "--train.epochs", "1", "--sampler.shared", "false"))[0] == 0
    assert tables[0].stat().st_mtime_ns == stamp and len(list((setup / "cache").glob("*.safetensors"))) == 1


def test_k_not_smaller_than_the_pool_is_one_line(setup):
    code, out = invoke(*transfer_args(setup, "crd", "bigk", "--sampler.num_negatives", "100000"))
    one_line_error(code, out, "num_negatives")
    assert not (setup / "runs/bigk").exists()


def test_teacher_that_is_not_a_checkpoint(setup, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_text("hello")
    args = transfer_args(setup, "cktf", "junk")
    args[args.index("--teacher") + 1] = str(junk)
    one_line_error(*invoke(*args), "junk.safetensors")
    student_ckpt = setup / "runs/t_kd/last.safetensors"
    if student_ckpt.exists():
        args[args.index("--teacher") + 1] = str(student_ckpt)
        one_line_error(*invoke(*args), "'transfer' checkpoint", "teacher")


def test_student_whose_taps_cannot_be_mapped(setup):
    code, out = invoke(*transfer_args(setup, "cktf", "vgg", "--student.name", "vgg8"))
    one_line_error(code, out, "vgg8", "stages")


def test_gradients_reach_student_and_heads_never_teacher():
    torch.manual_seed(0)
    student = FeatureTaps(build_model("resnet8", 1, 5), tap_spec_for("resnet8"))
    teacher_model = build_model("resnet14", 1, 5)
    teacher = FeatureTaps(teacher_model, tap_spec_for("resnet14"))
    shape = (1, 28, 28)
    ctx = TermContext(student.channels(shape), teacher.channels(shape), num_items=50)
    cfg = LossConfig(terms={"mckt": {"weight": 0.8}, "pckt": {"weight": 0.2}, "kd": {"weight": 1.0}})
    terms, weights = build_terms(cfg, ctx)
    task = TransferTask(student, teacher, terms, weights, build_sampler("uniform", 50, 8))
    task.train()
    assert not teacher.training and all(not m.training for m in teacher_model.modules())
    bn = next(m for m in teacher_model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn_before = bn.running_mean.clone()
    out = task.training_step(torch.randn(6, 1, 28, 28), torch.full((6,), -1), torch.arange(6))
    out.loss.backward()
    assert all(p.grad is None for p in teacher_model.parameters())
    assert all(p.grad is not None for p in student.parameters())
    heads = [p for name, p in task.named_parameters() if "head_" in name]
    assert heads and all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)
    assert {id(p) for p in task.trainable_parameters()} == {id(p) for p in student.parameters()} | {
        id(p) for p in terms.parameters()}
    assert torch.equal(bn.running_mean, bn_before)
    assert set(out.terms) >= {"kd", "pckt", "mckt/stem", "mckt/stage3"}


def test_fill_banks_writes_each_items_initial_embedding():
    torch.manual_seed(0)
    student = FeatureTaps(build_model("resnet8", 1, 5), tap_spec_for("resnet8"))
    teacher = FeatureTaps(build_model("resnet8", 1, 5), tap_spec_for("resnet8"))
    shape = (1, 28, 28)
    ctx = TermContext(student.channels(shape), teacher.channels(shape), num_items=12)
    terms, weights = build_terms(LossConfig(nce=NCEConfig(bank_init="embed")), ctx)
    task = TransferTask(student, teacher, terms, weights, build_sampler("uniform", 12, 4))
    images = torch.randn(12, 1, 28, 28)
    data = [(images[i], -1, i) for i in range(12)]
    assert task.init_phases(torch.utils.data.DataLoader(data, batch_size=5), torch.device("cpu")) == ["mckt", "pckt"]
    pair = terms["pckt"].pair
    task.eval()
    with torch.no_grad():
        expected_s = pair.head_student(student(images).penultimate)
        expected_t = pair.head_teacher(teacher(images).penultimate)
    assert torch.allclose(pair.objective.bank_student.weight, expected_s, atol=1e-5)
    assert torch.allclose(pair.objective.bank_teacher.weight, expected_t, atol=1e-5)
    stem = terms["mckt"].pairs["stem"].objective.bank_teacher.weight
    assert torch.allclose(stem.norm(dim=1), torch.ones(12), atol=1e-5)
    assert torch.isnan(pair.objective.z_student)  # Z is still estimated on the first training batch


def test_shared_negatives_need_the_uniform_sampler(setup):
    code, out = invoke(*transfer_args(setup, "crd", "sh", "--sampler.kind", "hard", "--sampler.shared", "true"))
    one_line_error(code, out, "sampler.shared")
