"""``cktf transfer``: KD / CRD / CKTF from a frozen teacher to a student on the unlabeled target split.

Order of work: everything that can fail on bad input (teacher file, data, model names, stage mapping, K vs
N) is checked before the run directory is touched, so a mistake never leaves a half-written run behind.
"""

from __future__ import annotations

import json
import time

import torch
from torch.utils.data import DataLoader

from transfer.config import TransferConfig
from transfer.data import build_dataset
from transfer.engine import distributed
from transfer.engine.performance import check_runtime, prepare_network
from transfer.engine.rundir import run_path
from transfer.engine.runtime import seed_everything, set_threads
from transfer.engine.trainer import FitResult
from transfer.errors import CKTFError
from transfer.losses.objective import build_objective
from transfer.models import FeatureTaps, TapSpec, build_model, tap_spec_for
from transfer.models.checkpoints import freeze, load_network
from transfer.models.input_spec import InputSpec, check_channels, follow_recorded_input
from transfer.models.registry import reference_pool
from transfer.sampling import build_sampler, cached_neighbour_table, file_sha256
from transfer.stages.common import (
    RunRequest,
    eval_transform,
    extract_features,
    make_loader,
    open_run,
    train_pipeline,
)
from transfer.tasks.transfer import TransferTask


def _spec(name: str, model: torch.nn.Module, taps: dict, option: str) -> TapSpec:
    return TapSpec.from_dict(taps, option=option) if taps else tap_spec_for(name, model)


@torch.no_grad()
def embed_pool(teacher: FeatureTaps, dataset, batch_size: int, device: torch.device, workers: int) -> torch.Tensor:
    """The frozen teacher's penultimate features of every item (eval transform), as [N, C] float32 on CPU."""
    return extract_features(lambda images: teacher(images).penultimate, dataset, batch_size, device, workers)[0]


def _calibration_batch(dataset, seed: int, size: int = 64) -> torch.Tensor:
    """A seeded sample of ``size`` items (eval transform) that sizes the heads and decides a ``once`` mapping."""
    ids = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size].tolist()
    return torch.stack([dataset[i][0] for i in ids])


def run_transfer(cfg: TransferConfig, request: RunRequest = RunRequest()) -> FitResult:
    """Train the student of ``cfg`` into ``<log.root>/<log.name>``."""
    set_threads(cfg.train.threads)
    device = distributed.setup(cfg.train.device)
    check_runtime(device, cfg.train)

    def place(module: torch.nn.Module) -> torch.nn.Module:
        return prepare_network(module, device, channels_last=cfg.train.channels_last)

    if cfg.teacher.checkpoint is None:
        raise CKTFError("no teacher given: pass --teacher PATH (a best.safetensors written by cktf train-teacher)")
    teacher_net = load_network(cfg.teacher.checkpoint, prefix="model.", kinds=("teacher",), option="--teacher")
    teacher_taps = cfg.teacher.taps or teacher_net.taps
    follow_recorded_input(cfg.data, teacher_net.input, f"teacher {cfg.teacher.checkpoint}")

    train_tf, augment = train_pipeline(cfg.data)
    eval_tf = eval_transform(cfg.data)
    pool = build_dataset(cfg.data.name, cfg.data.train_split, cfg.data.root, train_tf, **cfg.data.options)
    if pool.in_channels != teacher_net.in_channels:
        raise CKTFError(f"teacher {cfg.teacher.checkpoint} takes {teacher_net.in_channels}-channel images but "
                        f"{cfg.data.name}/{cfg.data.train_split} has {pool.in_channels} channels")
    check_channels(cfg.data, pool.in_channels)
    num_items = len(pool)

    seed_everything(cfg.train.seed)
    student_model = build_model(cfg.student.name, in_channels=pool.in_channels, num_classes=teacher_net.num_classes)
    student = FeatureTaps(student_model, _spec(cfg.student.name, student_model, cfg.student.taps, "student.taps"))
    t_spec = _spec(teacher_net.name, teacher_net.model, teacher_taps, "teacher.taps")
    teacher = FeatureTaps(freeze(teacher_net.model), t_spec, with_blocks=cfg.loss.layer_mapping != "last")
    freeze(teacher)

    probe_ds = build_dataset(cfg.data.name, cfg.data.train_split, cfg.data.root, eval_tf, **cfg.data.options)
    pools = ((reference_pool(cfg.student.name), reference_pool(teacher_net.name))
             if cfg.loss.stage_pool == "reference" else (None, None))
    objective = build_objective(cfg.loss, student, teacher, num_items, _calibration_batch(probe_ds, cfg.train.seed),
                                seed=cfg.train.seed, pools=pools, names=(cfg.student.name, teacher_net.name))
    terms, weights, mapping = objective.terms, objective.weights, objective.mapping

    sampler = None
    if any(term.needs_negatives for term in terms.values()):
        neighbours = None
        if cfg.sampler.kind != "uniform":
            table_k = cfg.sampler.k + (cfg.sampler.hard_pool if cfg.sampler.kind == "hard" else 0)
            key = {"teacher_sha256": file_sha256(cfg.teacher.checkpoint), "dataset": cfg.data.name,
                   "split": cfg.data.train_split, "options": cfg.data.options, "transform": repr(eval_tf),
                   "num_items": num_items}
            neighbours = distributed.run_on_main(lambda: cached_neighbour_table(  # built once, by rank 0
                cfg.sampler.cache_dir, key,
                lambda: embed_pool(place(teacher), probe_ds, cfg.train.eval_batch_size, device,
                                   cfg.data.num_workers),
                table_k, index=cfg.sampler.index))
        sampler = build_sampler(cfg.sampler.kind, num_items, cfg.sampler.num_negatives, neighbours,
                                exclude=cfg.sampler.k, hard_fraction=cfg.sampler.hard_fraction,
                                hard_pool=cfg.sampler.hard_pool, shared=cfg.sampler.shared)
    task = TransferTask(student, teacher, terms, weights, sampler)

    metadata = {
        "kind": "transfer",
        "model": cfg.student.name,
        "in_channels": str(pool.in_channels),
        "num_classes": str(teacher_net.num_classes),
        "taps": json.dumps(cfg.student.taps),
        "method": cfg.loss.method,
        "teacher": str(cfg.teacher.checkpoint),
        "teacher_model": teacher_net.name,
        "layer_mapping": json.dumps(mapping if cfg.loss.mapping_schedule == "once" else cfg.loss.mapping_schedule),
        "dataset": cfg.data.name,
        **InputSpec.of_data(cfg.data).to_metadata(),
    }
    describe = (f"transfer ({cfg.loss.method}): {teacher_net.name} -> {cfg.student.name} on "
                f"{cfg.data.name}/{cfg.data.train_split} ({num_items} images)")
    engine = open_run(run_path(cfg.log.root, cfg.log.name), "log.root/log.name", cfg, task, device, metadata, request,
                      describe=describe, data_root=getattr(pool, "root", None))
    if cfg.loss.bank_init == "embed" and not engine.resumed:
        engine.task.fill_banks(DataLoader(probe_ds, batch_size=cfg.train.eval_batch_size,
                                          num_workers=cfg.data.num_workers), device)
    loader = make_loader(pool, cfg.train.batch_size, train=True, num_workers=cfg.data.num_workers, device=device,
                         random_items=augment is None)
    t0 = time.perf_counter()
    result = engine.fit(loader, augment=augment)
    engine.logger.close()
    engine.write_metrics({
        "kind": "transfer",
        "method": cfg.loss.method,
        "student": cfg.student.name,
        "teacher": str(cfg.teacher.checkpoint),
        "epochs": len(result.history),
        "final": result.final,
        "first": result.history[0] if result.history else {},
        "train_seconds": result.train_seconds,
        "wall_seconds_this_invocation": time.perf_counter() - t0,
    })
    return result
