"""Model-side performance flags: channels_last, torch.compile and bf16 autocast change speed, not results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.cli_helpers import assert_one_line, invoke, one_line_error
from tests.data_fixtures import write_fashion_idx
from tests.killable_data import KillableDataset
from transfer.config import LossConfig, TrainConfig
from transfer.engine.checkpoint import load_checkpoint, save_checkpoint
from transfer.engine.logger import RunLogger
from transfer.engine.performance import check_runtime, compile_module, prepare_network, use_channels_last
from transfer.engine.rundir import prepare_run_dir
from transfer.engine.runtime import autocast
from transfer.engine.trainer import Engine
from transfer.errors import CKTFError
from transfer.losses.memory_bank import MemoryBank
from transfer.losses.terms import TermContext, build_terms
from transfer.models import FeatureTaps, build_model, tap_spec_for
from transfer.sampling import build_sampler
from transfer.stages.common import make_loader
from transfer.tasks import SupervisedTask
from transfer.tasks.transfer import TransferTask

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs/fashion_split"
CHANNELS_LAST = torch.channels_last


def is_channels_last(t: torch.Tensor) -> bool:
    """NHWC strides; for shapes where NHWC and NCHW coincide (one channel, 1x1 maps) that is all one can ask."""
    both_possible = t.shape[1] == 1 or t.shape[2:].numel() == 1
    return t.is_contiguous(memory_format=CHANNELS_LAST) and (both_possible or not t.is_contiguous())


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Every element within ``tol`` of the tensor's largest magnitude: the scale fp32 rounding works at."""
    error = (actual - expected).abs().max().item()
    assert error <= tol * expected.abs().max().item(), f"max error {error:.2e}, scale {expected.abs().max():.2e}"


def taps_pair(name: str, in_channels: int) -> tuple[FeatureTaps, FeatureTaps]:
    """The same network twice (identical weights), the second converted to channels_last."""
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, num_classes=10)
    twin = build_model(name, in_channels=in_channels, num_classes=10)
    twin.load_state_dict(model.state_dict())
    spec = tap_spec_for(name, model)
    return FeatureTaps(model, spec), use_channels_last(FeatureTaps(twin, spec))


@pytest.mark.parametrize("name,in_channels,size", [("resnet8", 1, 28), ("vgg8", 3, 32)])
def test_channels_last_taps_equal_nchw_in_train_and_eval(name, in_channels, size):
    nchw, nhwc = taps_pair(name, in_channels)
    convs = [m.weight for m in nhwc.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(is_channels_last(w) for w in convs)
    images = torch.randn(8, in_channels, size, size)
    for mode in ("train", "eval"):
        nchw.train(mode == "train")
        nhwc.train(mode == "train")
        a, b = nchw(images), nhwc(images)
        assert is_channels_last(b.stages[0]) and not b.stages[0].is_contiguous()  # NHWC propagates
        for x, y in zip([a.stem, *a.stages, a.penultimate, a.logits], [b.stem, *b.stages, b.penultimate, b.logits],
                        strict=True):
            assert_close_to_scale(y, x, 1e-5)


@pytest.mark.parametrize("name,in_channels,size", [("resnet8", 1, 28), ("vgg8", 3, 16)])
def test_channels_last_gradients_equal_nchw(name, in_channels, size):
    """In float64: in fp32 the two layouts round differently, and a pre-activation that lands on the other side
    of a ReLU's kink (about one in 10^5 per element) legitimately changes a gradient by percents."""
    nchw, nhwc = (taps.double().train() for taps in taps_pair(name, in_channels))
    images = torch.randn(8, in_channels, size, size, dtype=torch.float64)
    nchw(images).logits.square().sum().backward()
    nhwc(images).logits.square().sum().backward()
    for (key, p), q in zip(nchw.named_parameters(), nhwc.parameters(), strict=True):
        assert q.grad.stride() == q.stride(), key
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=key)


def test_channels_last_checkpoint_round_trips_bit_identically(tmp_path):
    torch.manual_seed(0)
    model = prepare_network(build_model("resnet8", in_channels=1, num_classes=10), torch.device("cpu"),
                            channels_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    opt.step()  # weights and BN statistics no longer at their initial values
    path = save_checkpoint(tmp_path / "cl.safetensors", {"model": model.state_dict()})
    saved = load_checkpoint(path).state["model"]
    assert set(saved) == set(model.state_dict())
    fresh = build_model("resnet8", in_channels=1, num_classes=10)
    fresh.load_state_dict(saved)
    again = use_channels_last(build_model("resnet8", in_channels=1, num_classes=10))
    again.load_state_dict(saved)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
        assert torch.equal(again.state_dict()[key], value), key
        assert again.state_dict()[key].stride() == value.stride(), key  # loading keeps the model's layout


def squares(n: int = 64, seed: int = 0, crash_at: int | None = None) -> KillableDataset:
    """Tiny 1-channel images of two classes (bright square top-left or bottom-right) with global-RNG noise."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g)
    for i, t in enumerate(targets.tolist()):
        x[i, :, :4, :4] += 1.0 if t == 0 else 0.0
        x[i, :, 4:, 4:] += 1.0 if t == 1 else 0.0
    return KillableDataset(x, targets, crash_at=crash_at)


def conv_net() -> nn.Module:
    """A small CNN with smooth activations, so that fp32 rounding differences stay small through training
    (with ReLU, one pre-activation rounding across 0 is enough to change a gradient by percents)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 8, 3),
                         nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def conv_engine(tmp_path, name: str, epochs: int, resume: bool = False, **train) -> Engine:
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=0.1, milestones=[2], seed=3, **train)
    run = prepare_run_dir(tmp_path / name, resume=resume, overwrite=False)
    logger = RunLogger(run.path, tensorboard=False, progress=False)
    return Engine(SupervisedTask(conv_net()), cfg, run, logger, torch.device("cpu"), {"kind": "test"}, log_every=2)


def squares_loader(crash_at: int | None = None):
    return make_loader(squares(crash_at=crash_at), 16, train=True, num_workers=0, device=torch.device("cpu"))


def test_engine_converts_the_task_and_resumes_a_channels_last_run_exactly(tmp_path):
    engine = conv_engine(tmp_path, "straight", epochs=3, channels_last=True)
    assert is_channels_last(engine.task.model[0].weight)
    engine.fit(squares_loader())
    reference = {k: v.clone() for k, v in engine.task.state_dict().items()}

    engine = conv_engine(tmp_path, "crashy", epochs=3, channels_last=True)
    with pytest.raises(KeyboardInterrupt):
        engine.fit(squares_loader(crash_at=64 + 30))  # dies in the middle of epoch 2
    engine = conv_engine(tmp_path, "crashy", epochs=3, resume=True, channels_last=True)
    engine.load_state(load_checkpoint(engine.run.last))
    assert engine.start_epoch == 1
    for param in engine.task.parameters():  # momentum buffers got their parameter's layout back
        assert engine.optimizer.state[param]["momentum_buffer"].stride() == param.stride()
    engine.fit(squares_loader())
    for key, value in engine.task.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_channels_last_training_matches_nchw(tmp_path):
    results = {}
    for flag in (False, True):
        engine = conv_engine(tmp_path, f"cl_{flag}", epochs=2, channels_last=flag)
        engine.fit(squares_loader())
        results[flag] = engine.task.state_dict()
    for key, value in results[False].items():
        torch.testing.assert_close(results[True][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_bf16_step_runs_the_network_in_bf16_and_keeps_the_loss_fp32(tmp_path):
    engine = conv_engine(tmp_path, "bf16", epochs=1, precision="bf16")
    images = torch.randn(4, 1, 8, 8)
    with engine.autocast():
        logits = engine.task.model(images)
        out = engine.task.training_step(images, torch.tensor([0, 1, 0, 1]), torch.arange(4))
    assert logits.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    result = engine.fit(squares_loader())
    assert torch.isfinite(torch.tensor(result.final["train/loss_epoch"]))
    assert all(p.dtype == torch.float32 for p in engine.task.parameters())


def test_bf16_transfer_step_on_channels_last_networks_keeps_nce_and_banks_fp32():
    torch.manual_seed(0)
    student = FeatureTaps(build_model("resnet8", 1, 5), tap_spec_for("resnet8"))
    teacher = FeatureTaps(build_model("resnet14", 1, 5), tap_spec_for("resnet14"))
    shape = (1, 28, 28)
    ctx = TermContext(student.channels(shape), teacher.channels(shape), num_items=50)
    cfg = LossConfig(terms={"mckt": {"weight": 0.8}, "pckt": {"weight": 0.2}, "kd": {"weight": 1.0}})
    terms, weights = build_terms(cfg, ctx)
    task = use_channels_last(TransferTask(student, teacher, terms, weights, build_sampler("uniform", 50, 8)))
    task.train()
    with autocast(torch.device("cpu"), "bf16"):
        assert student(torch.randn(2, *shape)).stages[0].dtype == torch.bfloat16
        out = task.training_step(torch.randn(6, *shape), torch.full((6,), -1), torch.arange(6))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in out.terms.values())
    banks = [m.weight for m in task.modules() if isinstance(m, MemoryBank)]
    assert banks and all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in banks)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())


def test_fp16_on_cpu_is_a_one_line_error_before_anything_runs(tmp_path):
    with pytest.raises(CKTFError) as excinfo:
        TrainConfig(device="cpu", precision="fp16").validate()
    assert_one_line(excinfo, "train.precision fp16", "CUDA")
    with pytest.raises(CKTFError) as excinfo:
        check_runtime(torch.device("cpu"), TrainConfig(precision="fp16"))
    assert_one_line(excinfo, "train.precision fp16")
    with pytest.raises(CKTFError):
        conv_engine(tmp_path, "fp16", epochs=1, precision="fp16")


def test_compile_without_a_cpp_compiler_is_a_one_line_error(monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no g++ here")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(CKTFError) as excinfo:
        check_runtime(torch.device("cpu"), TrainConfig(compile=True))
    assert_one_line(excinfo, "train.compile", "C++ compiler")
    check_runtime(torch.device("cpu"), TrainConfig(compile=False))  # nothing to check when it is off


def test_compiled_module_keeps_its_state_dict_keys():
    model = conv_net()
    keys = list(model.state_dict())
    compile_module(model, torch.device("cpu"))  # compilation itself is lazy: nothing is built here
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in model.state_dict())


def compile_available() -> bool:
    try:
        check_runtime(torch.device("cpu"), TrainConfig(compile=True))
    except CKTFError:
        return False
    return True


@pytest.mark.skipif(not compile_available(), reason="torch.compile needs a C++ compiler on CPU")
def test_compiled_training_matches_eager_and_its_checkpoint_loads_into_an_eager_model(tmp_path):
    """Compiles a tiny network for real (about 20 s on a 2-core CPU with a cold inductor cache)."""
    results = {}
    for flag in (False, True):
        engine = conv_engine(tmp_path, f"compile_{flag}", epochs=2, compile=flag)
        engine.fit(squares_loader())
        results[flag] = load_checkpoint(engine.run.last).state["task"]
    assert list(results[True]) == list(results[False])
    for key, value in results[False].items():
        assert_close_to_scale(results[True][key].float(), value.float(), 1e-5)
    SupervisedTask(conv_net()).load_checkpoint_state(results[True])


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("perf")
    write_fashion_idx(root / "fashion", n_train=200, n_test=50)
    return root


def test_bf16_teacher_and_cktf_transfer_end_to_end_keep_banks_fp32(fashion):
    common = ["--data.root", str(fashion / "fashion"), "--log.root", str(fashion / "runs"), "--train.epochs", "1",
              "--train.batch_size", "16", "--log.tensorboard", "false", "--train.precision", "bf16"]
    code, out = invoke("train-teacher", "--config", str(CONFIGS / "teacher.yaml"), "--log.name", "teacher",
                       "--model.name", "resnet8", *common)
    assert code == 0, out
    teacher = load_checkpoint(fashion / "runs/teacher/last.safetensors").state
    assert torch.isfinite(torch.tensor(teacher["history"][-1]["train/loss_epoch"]))
    code, out = invoke("transfer", "--config", str(CONFIGS / "cktf.yaml"), "--teacher",
                       str(fashion / "runs/teacher/last.safetensors"), "--log.name", "cktf",
                       "--sampler.num_negatives", "32", "--sampler.cache_dir", str(fashion / "cache"), *common)
    assert code == 0, out
    state = load_checkpoint(fashion / "runs/cktf/last.safetensors").state
    assert torch.isfinite(torch.tensor(state["history"][-1]["train/loss_epoch"]))
    banks = {k: v for k, v in state["task"].items() if "bank_" in k}
    assert banks and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in banks.values())
    assert all(v.dtype == torch.float32 for v in state["task"].values() if v.is_floating_point())


def test_fp16_on_cpu_fails_in_one_line_before_the_run_dir_is_made(fashion, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto means the CPU, also on a GPU machine
    code, out = invoke("train-teacher", "--config", str(CONFIGS / "teacher.yaml"), "--data.root",
                       str(fashion / "fashion"), "--log.root", str(fashion / "runs"), "--log.name", "fp16",
                       "--model.name", "resnet8", "--train.device", "auto", "--train.precision", "fp16")
    one_line_error(code, out, "train.precision fp16")
    assert not (fashion / "runs/fp16").exists()


@pytest.mark.parametrize("command", ["transfer", "train-teacher", "probe"])
def test_flags_are_listed_in_help(command):
    code, out = invoke(command, "--help")
    assert code == 0, out
    for key in ("--train.channels_last", "--train.compile", "--train.precision"):
        assert key in out, key


@pytest.mark.slow(reason="starts benchmarks/train_step.py as a user would: a torch import, then timed rounds")
def test_train_step_benchmark_runs_tiny(tmp_path):
    out = tmp_path / "train_step.json"
    proc = subprocess.run([sys.executable, "benchmarks/train_step.py", "--cases", "resnet8:1:16", "--batch", "4",
                           "--steps", "2", "--rounds", "2", "--threads", "1", "--clock", "process", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == ["nchw", "channels_last"]
    assert all(r["images_per_s"] > 0 and len(r["rounds"]) == 2 and r["compile_s"] is None for r in rows)
