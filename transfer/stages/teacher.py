"""``cktf train-teacher``: supervised training of the teacher on the labeled source domain.

Keeps ``last.safetensors`` (every epoch) and ``best.safetensors`` (best accuracy on a validation split held
out of the source train set; the test split is reported, never used for selection).
"""

from __future__ import annotations

import json
import time

from transfer.config import TeacherConfig
from transfer.engine.performance import check_runtime
from transfer.engine.rundir import run_path
from transfer.engine.runtime import seed_everything, set_threads
from transfer.engine.trainer import FitResult
from transfer.models import build_model
from transfer.stages.common import RunRequest, build_splits, input_resolution, join_ranks, make_loader, open_run
from transfer.tasks import SupervisedTask


def train_teacher(cfg: TeacherConfig, request: RunRequest = RunRequest()) -> FitResult:
    """Train the teacher described by ``cfg`` into ``<log.root>/<log.name>``."""
    set_threads(cfg.train.threads)
    device = join_ranks(cfg)
    check_runtime(device, cfg.train)
    splits = build_splits(cfg.data, cfg.train.seed)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model.name, in_channels=splits.train.in_channels, num_classes=splits.train.num_classes)
    task = SupervisedTask(model)
    metadata = {
        "kind": "teacher",
        "model": cfg.model.name,
        "in_channels": str(splits.train.in_channels),
        "num_classes": str(splits.train.num_classes),
        "taps": json.dumps(cfg.model.taps),
        "dataset": cfg.data.name,
    }
    evaluated = (("val", splits.val), ("test", splits.test))
    sizes = ", ".join(f"{name} {len(ds)}" for name, ds in evaluated if ds is not None)
    describe = (f"train-teacher: {cfg.model.name} on {cfg.data.name}/{cfg.data.train_split} ({len(splits.train)} "
                f"images{', ' + sizes if sizes else ''}, {input_resolution(cfg.data)})")
    engine = open_run(run_path(cfg.log.root, cfg.log.name), "log.root/log.name", cfg, task, device, metadata, request,
                      describe=describe, data_root=getattr(splits.train, "root", None))
    workers = cfg.data.num_workers
    train_loader = make_loader(splits.train, cfg.train.batch_size, train=True, num_workers=workers, device=device,
                               random_items=splits.augment is None)
    evals = {}
    if splits.val is not None:
        evals["val"] = make_loader(splits.val, cfg.train.eval_batch_size, train=False, num_workers=workers,
                                   device=device)
    if splits.test is not None:
        evals["test"] = make_loader(splits.test, cfg.train.eval_batch_size, train=False, num_workers=workers,
                                    device=device)
    t0 = time.perf_counter()
    result = engine.fit(train_loader, evals, select="val/acc" if "val" in evals else None, augment=splits.augment)
    engine.logger.close()
    final = result.final
    best_row = result.history[result.best_epoch - 1] if result.best_epoch else final
    engine.write_metrics({
        "kind": "teacher",
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "epochs": len(result.history),
        "final": final,
        "best_epoch": result.best_epoch,
        "best": best_row,
        "train_seconds": result.train_seconds,
        "wall_seconds_this_invocation": time.perf_counter() - t0,
    })
    return result
