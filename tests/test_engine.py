"""The shared engine: exact resume after a crash mid-epoch, best-by-validation, lr schedule, logging."""

import pytest
import torch
from torch import nn

from tests.killable_data import KillableDataset
from transfer.config import TrainConfig
from transfer.engine.checkpoint import load_checkpoint
from transfer.engine.logger import RunLogger
from transfer.engine.rundir import prepare_run_dir
from transfer.engine.schedule import lr_factor
from transfer.engine.trainer import Engine
from transfer.errors import CKTFError
from transfer.stages.common import make_loader
from transfer.tasks import SupervisedTask


def blobs(n: int = 96, seed: int = 0, crash_at: int | None = None) -> KillableDataset:
    """Two Gaussian blobs in 8-d with augmentation noise drawn from the global torch RNG."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) + 2.0 * targets[:, None].float()
    return KillableDataset(x, targets, crash_at=crash_at)


def make_engine(tmp_path, name: str, epochs: int, resume: bool = False, **train):
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=0.1, schedule="step", milestones=[2], seed=7, **train)
    run = prepare_run_dir(tmp_path / name, resume=resume, overwrite=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    logger = RunLogger(run.path, tensorboard=True, progress=False)
    engine = Engine(SupervisedTask(model), cfg, run, logger, torch.device("cpu"), {"kind": "test"}, log_every=2)
    return engine, run


def loaders(crash_at=None):
    train = make_loader(blobs(crash_at=crash_at), 16, train=True, num_workers=0, device=torch.device("cpu"))
    val = make_loader(blobs(n=40, seed=1), 64, train=False, num_workers=0, device=torch.device("cpu"))
    return train, {"val": val}


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
    engine, _ = make_engine(tmp_path, "straight", epochs=4)
    train, evals = loaders()
    engine.fit(train, evals, select="val/acc")
    reference = {k: v.clone() for k, v in engine.task.state_dict().items()}

    engine, run = make_engine(tmp_path, "crashy", epochs=4)
    train, evals = loaders(crash_at=96 * 2 + 40)  # dies in the middle of epoch 3
    with pytest.raises(KeyboardInterrupt):
        engine.fit(train, evals, select="val/acc")
    assert load_checkpoint(run.last).state["epoch"] == 2

    engine, run = make_engine(tmp_path, "crashy", epochs=4, resume=True)
    engine.load_state(load_checkpoint(run.last))
    assert engine.start_epoch == 2
    train, evals = loaders()
    result = engine.fit(train, evals, select="val/acc")
    assert len(result.history) == 4
    for key, value in engine.task.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_best_is_chosen_by_validation_and_last_every_epoch(tmp_path):
    engine, run = make_engine(tmp_path, "sel", epochs=3)
    train, evals = loaders()
    result = engine.fit(train, evals, select="val/acc")
    accs = [row["val/acc"] for row in result.history]
    assert result.best_epoch == 1 + max(range(3), key=lambda i: (accs[i], -i))
    best = load_checkpoint(run.best)
    assert int(best.metadata["epoch"]) == result.best_epoch
    assert load_checkpoint(run.last).state["epoch"] == 3
    assert {"train/loss_epoch", "train/images_per_s", "lr", "val/acc", "val/loss"} <= set(result.final)


def test_tensorboard_events_hold_losses_and_lr(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    engine, run = make_engine(tmp_path, "tb", epochs=2)
    train, evals = loaders()
    engine.fit(train, evals, select="val/acc")
    engine.logger.close()
    acc = EventAccumulator(str(run.path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "lr", "val/acc", "train/images_per_s"} <= tags
    assert not any(tag.startswith("_") for tag in tags)
    assert [e.step for e in acc.Scalars("val/acc")] == [1, 2]


def test_step_schedule_and_cosine():
    cfg = TrainConfig(lr=0.05, schedule="step", milestones=[150, 180, 210], lr_decay=0.1, epochs=240)
    assert [lr_factor(cfg, e) for e in (0, 149, 150, 180, 239)] == pytest.approx([1, 1, 0.1, 0.01, 0.001])
    cos = TrainConfig(schedule="cosine", epochs=10)
    assert lr_factor(cos, 0) == 1.0 and lr_factor(cos, 5) == pytest.approx(0.5)


def test_divergence_is_a_clear_error(tmp_path):
    engine, _ = make_engine(tmp_path, "nan", epochs=1)
    engine.task.model[0].weight.data.fill_(float("nan"))
    train, evals = loaders()
    with pytest.raises(CKTFError, match="diverged"):
        engine.fit(train, evals)


def test_run_dir_protects_existing_runs(tmp_path):
    run = prepare_run_dir(tmp_path / "r", resume=False, overwrite=False)
    (run.path / "last.safetensors").write_bytes(b"x")
    with pytest.raises(CKTFError, match="--resume"):
        prepare_run_dir(tmp_path / "r", resume=False, overwrite=False)
    assert prepare_run_dir(tmp_path / "r", resume=True, overwrite=False).path == run.path
    prepare_run_dir(tmp_path / "r", resume=False, overwrite=True)
    assert not (run.path / "last.safetensors").exists()
