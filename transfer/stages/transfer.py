"""``cktf transfer``: a frozen teacher teaches a student on the unlabeled target split through loss terms.

The method is the set of terms in ``loss.terms`` (KD, CRD, CKTF, …; ``cktf methods`` lists them). The stage
never looks at a term's name: it provides what the terms *declare* they need (teacher blocks, a stage-count
check, negatives from a sampler, labels, an initialisation phase). Order of work: everything that can fail on
bad input (terms and their options, teacher file, data, model names, stage mapping, K vs N) is checked before
the run directory is touched, so a mistake never leaves a half-written run behind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from transfer.config import TransferConfig
from transfer.data import IndexedSubset, build_dataset, holdout_split
from transfer.data.batch_augment import BatchTransform
from transfer.engine import distributed
from transfer.engine.frozen import Frozen
from transfer.engine.performance import check_runtime, prepare_network
from transfer.engine.rundir import run_path
from transfer.engine.runtime import seed_everything, set_threads
from transfer.engine.trainer import Engine, FitResult
from transfer.errors import CKTFError
from transfer.losses import objective
from transfer.losses.terms import TermContext, build_terms
from transfer.models import FeatureTaps, TapSpec, build_model, tap_spec_for
from transfer.models.checkpoints import LoadedNetwork, load_network
from transfer.models.input_spec import InputSpec, check_channels, follow_recorded_input
from transfer.models.registry import reference_pool
from transfer.sampling import build_sampler, cached_neighbour_table, file_sha256
from transfer.stages.common import (
    RunRequest,
    eval_transform,
    extract_features,
    input_resolution,
    join_ranks,
    make_loader,
    open_run,
    train_pipeline,
)
from transfer.tasks.transfer import TransferTask

CALIBRATION_ITEMS = 64  # seeded items on which a term may decide something before training (layer mapping)


def _spec(name: str, model: torch.nn.Module, taps: dict, option: str) -> TapSpec:
    return TapSpec.from_dict(taps, option=option) if taps else tap_spec_for(name, model)


@torch.no_grad()
def embed_pool(teacher: torch.nn.Module, dataset, batch_size: int, device: torch.device,
               workers: int) -> torch.Tensor:
    """The frozen teacher's penultimate features of every item (eval transform), as [N, C] float32 on CPU."""
    return extract_features(lambda images: teacher(images).penultimate, dataset, batch_size, device, workers)[0]


def resolve_loss_terms(cfg: TransferConfig) -> dict[str, list[str]]:
    """Validate ``loss.terms`` against the term registry and record the resolved options in ``cfg``.

    Returns each declared need with the terms declaring it (e.g. ``{"negatives": ["mckt", "pckt"]}``).
    """
    return objective.resolve_objective(cfg.loss)  # config.yaml then shows every option of every term


def load_teacher(cfg: TransferConfig) -> LoadedNetwork:
    """The teacher network from ``teacher.checkpoint`` (written by ``cktf train-teacher`` or ``import-teacher``).

    The data's input size and normalisation follow what the checkpoint records, unless ``cfg.data`` sets them.
    """
    how = ("train one with `cktf train-teacher` (its best.safetensors), or convert pretrained weights with "
           "`cktf import-teacher --arch ARCH --weights FILE --out teacher.safetensors`")
    path = cfg.teacher.checkpoint
    if path is None:
        raise CKTFError(f"no teacher given: pass --teacher PATH; {how}")
    if not Path(path).is_file():
        raise CKTFError(f"--teacher {path} does not exist; {how}")
    if Path(path).suffix.lower() in (".pth", ".pt", ".bin", ".ckpt", ".tar"):
        raise CKTFError(f"--teacher {path} is a PyTorch file, not a cktf checkpoint (.safetensors written by "
                        f"cktf); {how}")
    teacher = load_network(path, prefix="model.", kinds=("teacher",), option="--teacher")
    follow_recorded_input(cfg.data, teacher.input, f"teacher {cfg.teacher.checkpoint}")
    return teacher


def training_pool(cfg: TransferConfig, teacher: LoadedNetwork,
                  needs: dict[str, list[str]]) -> tuple[Dataset, BatchTransform | None]:
    """The transfer split with the training pipeline, checked against the teacher and the terms' needs."""
    d = cfg.data
    train_tf, augment = train_pipeline(d)
    pool = build_dataset(d.name, d.train_split, d.root, train_tf, **d.options)
    if pool.in_channels != teacher.in_channels:
        raise CKTFError(f"teacher {cfg.teacher.checkpoint} takes {teacher.in_channels}-channel images but "
                        f"{d.name}/{d.train_split} has {pool.in_channels} channels")
    check_channels(d, pool.in_channels)
    if "labels" in needs and bool((torch.as_tensor(pool.targets) < 0).any()):
        term = needs["labels"][0]
        raise CKTFError(f"loss.terms.{term} needs labels, but data split '{d.train_split}' of {d.name} has unlabeled "
                        f"images (target -1); leave loss.terms.{term} out, or transfer on a labeled split")
    if "labels" in needs and pool.num_classes > teacher.num_classes:
        term = needs["labels"][0]
        raise CKTFError(f"loss.terms.{term} needs the transfer split's classes to be the teacher's (the student's "
                        f"classifier has the teacher's {teacher.num_classes}), but {d.name}/{d.train_split} has "
                        f"{pool.num_classes} classes")
    if "memory_banks" in needs and len(pool) < 2:
        raise CKTFError(f"loss.terms.{needs['memory_banks'][0]} keeps a memory bank over the transfer pool, but "
                        f"{d.name}/{d.train_split} has {len(pool)} item(s); it needs at least 2")
    return pool, augment


def build_networks(cfg: TransferConfig, teacher: LoadedNetwork, in_channels: int,
                   needs: dict[str, list[str]]) -> tuple[FeatureTaps, Frozen]:
    """The freshly initialised tapped student (seeded) and the frozen tapped teacher (with its blocks when a
    term needs them).

    The student's classifier has the teacher's (source) classes, as in the paper's step 1.
    """
    seed_everything(cfg.train.seed)
    student_model = build_model(cfg.student.name, in_channels=in_channels, num_classes=teacher.num_classes,
                                option="student.name")
    s_spec = _spec(cfg.student.name, student_model, cfg.student.taps, "student.taps")
    t_spec = _spec(teacher.name, teacher.model, cfg.teacher.taps or teacher.taps, "teacher.taps")
    return objective.tap_pair(student_model, s_spec, teacher.model, t_spec, needs, (cfg.student.name, teacher.name))


def evaluation_pool(cfg: TransferConfig) -> tuple[Dataset, Callable]:
    """The transfer split with the evaluation transform (calibration, neighbour tables, init phases)."""
    d = cfg.data
    eval_tf = eval_transform(d)
    return build_dataset(d.name, d.train_split, d.root, eval_tf, **d.options), eval_tf


@dataclass
class LabeledEvaluation:
    """For a labeled transfer split whose classes are the teacher's (compression with labels, γ > 0): the pools
    without the validation holdout, and the splits the student's classifier is evaluated on every epoch."""

    pool: Dataset
    eval_pool: Dataset
    evals: dict[str, Dataset]


def labeled_evaluation(cfg: TransferConfig, teacher: LoadedNetwork, pool: Dataset,
                       eval_pool: Dataset) -> LabeledEvaluation:
    """Validation and test splits of a labeled transfer (``data.val_split`` or a ``data.val_fraction`` holdout of
    the train split, and ``data.test_split``), evaluated with the student's own classifier (top-1, top-5).

    An unlabeled pool (targets −1), or one whose classes are not the teacher's (the student's classifier has the
    teacher's classes), is not evaluated: the linear probe measures such a student.
    """
    d = cfg.data
    targets = torch.as_tensor(pool.targets)
    if len(targets) == 0 or bool((targets < 0).any()) or pool.num_classes != teacher.num_classes:
        return LabeledEvaluation(pool, eval_pool, {})
    eval_tf = eval_transform(d)
    evals: dict[str, Dataset] = {}
    if d.val_split is not None:
        evals["val"] = build_dataset(d.name, d.val_split, d.root, eval_tf, **d.options)
    elif d.val_fraction > 0:
        keep, held = holdout_split(len(pool), d.val_fraction, cfg.train.seed)
        evals["val"] = IndexedSubset(eval_pool, held)
        pool, eval_pool = IndexedSubset(pool, keep), IndexedSubset(eval_pool, keep)
    if d.test_split is not None:
        evals["test"] = build_dataset(d.name, d.test_split, d.root, eval_tf, **d.options)
    return LabeledEvaluation(pool, eval_pool, evals)


def term_context(cfg: TransferConfig, student: FeatureTaps, teacher: Frozen, teacher_name: str,
                 pool: Dataset) -> TermContext:
    """Tap widths and shapes of both networks, the models' reference pooling windows, the pool size and a lazy
    calibration batch (``CALIBRATION_ITEMS`` seeded items of ``pool``)."""

    def calibration() -> torch.Tensor:
        ids = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.train.seed))
        return torch.stack([pool[i][0] for i in ids[:CALIBRATION_ITEMS].tolist()])

    return objective.term_context(student, teacher, tuple(pool[0][0].shape), len(pool), calibration,
                                  seed=cfg.train.seed,
                                  pools=(reference_pool(cfg.student.name), reference_pool(teacher_name)),
                                  names=(cfg.student.name, teacher_name))


def negative_sampler(cfg: TransferConfig, needs: dict[str, list[str]], teacher: Frozen, pool: Dataset,
                     eval_tf: Callable, device: torch.device) -> torch.nn.Module | None:
    """The negative sampler when a term declares ``negatives`` (with a cached neighbour table unless uniform)."""
    if "negatives" not in needs:
        return None
    s, num_items = cfg.sampler, len(pool)
    neighbours = None
    if s.kind != "uniform":
        table_k = s.k + (s.hard_pool if s.kind == "hard" else 0)
        key = {"teacher_sha256": file_sha256(cfg.teacher.checkpoint), "dataset": cfg.data.name,
               "split": cfg.data.train_split, "options": cfg.data.options, "transform": repr(eval_tf),
               "num_items": num_items}
        place = prepare_network(teacher, device, channels_last=cfg.train.channels_last)
        neighbours = distributed.run_on_main(lambda: cached_neighbour_table(  # built once, by rank 0
            s.cache_dir, key, lambda: embed_pool(place, pool, cfg.train.eval_batch_size, device, cfg.data.num_workers),
            table_k, index=s.index))
    return build_sampler(s.kind, num_items, s.num_negatives, neighbours, exclude=s.k, hard_fraction=s.hard_fraction,
                         hard_pool=s.hard_pool, shared=s.shared)


def open_transfer_run(cfg: TransferConfig, task: TransferTask, teacher: LoadedNetwork, pool: Dataset,
                      device: torch.device, request: RunRequest) -> Engine:
    """The run directory and engine, with the checkpoint metadata that lets the probe rebuild the student
    (and follow the input size/normalisation it was trained on)."""
    metadata = {
        "kind": "transfer",
        "model": cfg.student.name,
        "in_channels": str(pool.in_channels),
        "num_classes": str(teacher.num_classes),
        "taps": json.dumps(cfg.student.taps),
        "method": cfg.loss.method,
        "terms": json.dumps(task.weights),
        "teacher": str(cfg.teacher.checkpoint),
        "teacher_model": teacher.name,
        "dataset": cfg.data.name,
        **InputSpec.of_data(cfg.data).to_metadata(),
        **task.metadata(),
    }
    terms = ", ".join(f"{name} {weight:g}" for name, weight in task.weights.items())
    describe = (f"transfer ({cfg.loss.method}: {terms}): {teacher.name} -> {cfg.student.name} on "
                f"{cfg.data.name}/{cfg.data.train_split} ({len(pool)} images, {input_resolution(cfg.data)})")
    return open_run(run_path(cfg.log.root, cfg.log.name), "log.root/log.name", cfg, task, device, metadata, request,
                    describe=describe, data_root=getattr(pool, "root", None))


def write_transfer_metrics(engine: Engine, cfg: TransferConfig, result: FitResult, started: float) -> None:
    """``metrics.json`` of the run: method, terms with their resolved options, first/final epoch, times."""
    engine.write_metrics({
        "kind": "transfer",
        "method": cfg.loss.method,
        "terms": cfg.loss.terms,
        "student": cfg.student.name,
        "teacher": str(cfg.teacher.checkpoint),
        "epochs": len(result.history),
        "final": result.final,
        "first": result.history[0] if result.history else {},
        "train_seconds": result.train_seconds,
        "wall_seconds_this_invocation": time.perf_counter() - started,
        **evaluated_metrics(cfg, result),
    })


def evaluated_metrics(cfg: TransferConfig, result: FitResult) -> dict:
    """What ``cktf compare`` reads of a transfer evaluated on a labeled test split (as of a probe): the last
    epoch's and the best-validation epoch's test accuracy; nothing for an unevaluated (unlabeled) transfer."""
    if "test/acc" not in result.final:
        return {}
    best = result.history[result.best_epoch - 1] if result.best_epoch else None
    return {"seed": cfg.train.seed, "final_acc": result.final["test/acc"], "final_acc5": result.final.get("test/acc5"),
            "best_epoch": result.best_epoch, "best_val_acc": result.best_value,
            "test_acc_at_best": best.get("test/acc") if best else None, "transfer_seconds": result.train_seconds}


def run_transfer(cfg: TransferConfig, request: RunRequest = RunRequest()) -> FitResult:
    """Train the student of ``cfg`` into ``<log.root>/<log.name>``."""
    needs = resolve_loss_terms(cfg)
    set_threads(cfg.train.threads)
    device = join_ranks(cfg)
    check_runtime(device, cfg.train)
    teacher_net = load_teacher(cfg)
    pool, augment = training_pool(cfg, teacher_net, needs)
    student, teacher = build_networks(cfg, teacher_net, pool.in_channels, needs)
    eval_pool, eval_tf = evaluation_pool(cfg)
    labeled = labeled_evaluation(cfg, teacher_net, pool, eval_pool)
    pool, eval_pool = labeled.pool, labeled.eval_pool
    terms, weights = build_terms(cfg.loss, term_context(cfg, student, teacher, teacher_net.name, eval_pool))
    sampler = negative_sampler(cfg, needs, teacher, eval_pool, eval_tf, device)
    task = TransferTask(student, teacher, terms, weights, sampler)

    engine = open_transfer_run(cfg, task, teacher_net, pool, device, request)
    loader = make_loader(pool, cfg.train.batch_size, train=True, num_workers=cfg.data.num_workers, device=device,
                         random_items=augment is None)
    if "init_phase" in needs and not engine.resumed:
        eval_loader = DataLoader(eval_pool, batch_size=cfg.train.eval_batch_size, num_workers=cfg.data.num_workers)
        engine.task.init_phases(eval_loader, device, loader, augment)
    evals = {name: make_loader(ds, cfg.train.eval_batch_size, train=False, num_workers=cfg.data.num_workers,
                               device=device) for name, ds in labeled.evals.items()}
    started = time.perf_counter()
    result = engine.fit(loader, evals, select="val/acc" if "val" in evals else None, augment=augment)
    engine.logger.close()
    write_transfer_metrics(engine, cfg, result, started)
    return result
