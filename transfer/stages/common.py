"""Wiring shared by the stages: datasets with their transforms, loaders, run setup."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from transfer import __version__
from transfer.config import DataConfig, config_to_dict, dump_config, read_yaml_mapping
from transfer.config.schema import available_cpus
from transfer.data import build_dataset
from transfer.data.batch_augment import BatchTransform, build_batch_transform
from transfer.data.indexed import IndexedSubset, holdout_split
from transfer.data.order import EpochSampler, SeededItems, ShardSampler
from transfer.data.transforms import build_decode_transform, build_transform
from transfer.engine import distributed
from transfer.engine.checkpoint import load_checkpoint
from transfer.engine.logger import RunLogger
from transfer.engine.rundir import RunDir, prepare_run_dir, write_text_atomic
from transfer.engine.task import Task
from transfer.engine.trainer import Engine
from transfer.errors import CKTFError

log = logging.getLogger("cktf")

# Keys that may differ between an interrupted run and its --resume (they do not change the result).
RESUME_MAY_CHANGE = ("train.threads", "train.device", "data.root", "data.num_workers", "train.eval_batch_size",
                     "train.channels_last", "train.compile", "train.checkpoint_every", "log.progress", "log.root",
                     "log.progress_every", "log.log_every", "log.tensorboard")
# Keys added after runs were first written, with the value a config.yaml without them implies.
IMPLIED_BY_OLDER_RUNS = {"data.augment": "per_image", "train.sync_bn": False, "loss.nce.bank_dtype": "fp32",
                         "train.deterministic": False,
                         **{f"loss.terms.{term}.variant": "paper" for term in ("at", "cc", "rkd", "pkt", "ab", "ft")}}


@dataclass
class SplitSet:
    """Train, validation and test datasets of one stage (validation/test may be absent)."""

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    augment: BatchTransform | None = None


def train_pipeline(cfg: DataConfig) -> tuple[Callable | None, BatchTransform | None]:
    """``(per-item transform of the training dataset, batched augmentation for Engine.fit)``.

    ``data.augment batched``: the dataset yields uint8 images and the engine augments each batch on the
    training device; ``per_image``: torchvision transforms per item in the loader, nothing batched.
    """
    if cfg.augment == "batched":
        return (build_decode_transform(cfg.name, cfg.image_size),
                build_batch_transform(cfg.name, train=True, image_size=cfg.image_size, mean=cfg.mean, std=cfg.std))
    return build_transform(cfg.name, train=True, image_size=cfg.image_size, mean=cfg.mean, std=cfg.std), None


def eval_transform(cfg: DataConfig) -> Callable:
    """The deterministic per-item pipeline of ``cfg`` (resize, centre crop, normalise)."""
    return build_transform(cfg.name, train=False, image_size=cfg.image_size, mean=cfg.mean, std=cfg.std)


def build_splits(cfg: DataConfig, seed: int) -> SplitSet:
    """Datasets for ``cfg``: train with training augmentation, val/test with the eval transform.

    Without ``val_split`` a ``val_fraction`` of the train split is held out (fixed by ``seed``), so model
    selection never looks at the test split. With ``data.augment batched`` the training augmentation is
    ``SplitSet.augment``, to be passed to ``Engine.fit``.
    """
    train_tf, augment = train_pipeline(cfg)
    eval_tf = eval_transform(cfg)
    train = build_dataset(cfg.name, cfg.train_split, cfg.root, train_tf, **cfg.options)
    val: Dataset | None = None
    if cfg.val_split is not None:
        val = build_dataset(cfg.name, cfg.val_split, cfg.root, eval_tf, **cfg.options)
    elif cfg.val_fraction > 0:
        keep, held = holdout_split(len(train), cfg.val_fraction, seed)
        val = IndexedSubset(build_dataset(cfg.name, cfg.train_split, cfg.root, eval_tf, **cfg.options), held)
        train = IndexedSubset(train, keep)
    test = None
    if cfg.test_split is not None:
        test = build_dataset(cfg.name, cfg.test_split, cfg.root, eval_tf, **cfg.options)
    return SplitSet(train, val, test, augment)


@torch.no_grad()
def extract_features(features: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, batch_size: int,
                     device: torch.device, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, C] float32 on CPU, targets [N])`` of every item in dataset order; ``features`` maps a batch
    of images to their feature vectors (a frozen network, already in eval mode)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, targets = [], []
    for images, target, _ in loader:
        feats.append(features(images.to(device)).float().cpu())
        targets.append(torch.as_tensor(target))
    return torch.cat(feats), torch.cat(targets).long()


def input_resolution(data: DataConfig) -> str:
    """The network's input size for the start line (a 224 px run on a CPU is ~10x slower than a 64 px one)."""
    return f"{data.image_size}x{data.image_size} px" if data.image_size else "native resolution"


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, num_workers: int, device: torch.device,
                random_items: bool = True) -> DataLoader:
    """A DataLoader; a training loader visits the data through an :class:`EpochSampler` (reseeded by the engine
    every epoch), so a run can resume inside an epoch.

    A training loader reads ``dataset`` through :class:`SeededItems`: with ``random_items`` (per-image
    augmentation) each item's randomness is seeded from the epoch's seed and the item's index, so the number
    of workers, and which of them reads an item, never changes a result. The loader draws its workers' base
    seed from a generator of its own, never from the global RNG or the sampler's.

    Under torchrun ``batch_size`` is the *global* batch: a training loader gives each rank
    ``batch_size / world_size`` items per step (its slice of the global batch), and an evaluation loader
    visits this rank's shard of the split (:class:`ShardSampler`; the task sums the results across ranks).

    Memory is pinned only for CUDA. Workers persist across epochs and prefetch 4 batches (items are small:
    uint8 with batched augmentation).
    """
    workers: dict[str, Any] = {}
    world, rank = distributed.world_size(), distributed.rank()
    _check_worker_count(num_workers)
    if num_workers > 0:
        workers = {"persistent_workers": True, "prefetch_factor": 4}
    sampler: Any = None
    if train:
        sampler = EpochSampler(len(dataset), torch.Generator(), rank=rank, world_size=world,
                               batch_size=distributed.per_rank_batch(batch_size, world))
        dataset = SeededItems(dataset, random_items)
    elif world > 1:
        sampler = ShardSampler(len(dataset), rank, world)
    return DataLoader(
        dataset,
        batch_size=batch_size // world if train else batch_size,
        sampler=sampler,
        drop_last=train and len(dataset) >= batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator() if train else None,
        **workers,
    )


def _check_worker_count(num_workers: int) -> None:
    """One line of cktf's when ``data.num_workers`` exceeds the CPUs this process may use (instead of torch's
    warning once per loader)."""
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
    cpus = available_cpus()
    if num_workers > cpus and num_workers not in _WARNED_WORKERS:
        _WARNED_WORKERS.add(num_workers)
        log.warning(f"data.num_workers {num_workers} is more than the {cpus} CPU(s) this process may use, which "
                    "slows loading down; --data.num_workers auto picks a number that fits")


_WARNED_WORKERS: set[int] = set()


def write_run_config(run: RunDir, cfg: Any, *, resume: bool, allow_change: tuple[str, ...] = ()) -> None:
    """Save the resolved config; on resume, refuse a config that would change the run's result.

    Keys in :data:`RESUME_MAY_CHANGE` never change the result and may differ; any other difference is refused,
    all differing keys listed, unless named in ``allow_change`` (``--allow-change KEY``, e.g. ``train.epochs``
    to extend a finished run). Every accepted difference is recorded in ``resumes.jsonl``.
    """
    if resume and run.config.is_file():
        now = flatten_config(config_to_dict(cfg))
        implied = {key: value for key, value in IMPLIED_BY_OLDER_RUNS.items() if key in now}
        saved = {**implied, **flatten_config(read_yaml_mapping(run.config, "the config of the run to resume"))}
        changed = {key: (saved.get(key), now.get(key)) for key in sorted(set(saved) | set(now))
                   if saved.get(key) != now.get(key)}
        refused = [key for key in changed if key not in RESUME_MAY_CHANGE and key not in allow_change]
        if refused:
            listed = ", ".join(f"{key} ({changed[key][0]!r} -> {changed[key][1]!r})" for key in refused)
            raise CKTFError(f"--resume with a different config than {run.config}: {listed}; resume with the "
                            f"original settings, or pass --allow-change KEY for each key you mean to change "
                            f"(e.g. --allow-change train.epochs to extend a run)")
        if changed:
            record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "changed": {key: {"was": old, "now": new} for key, (old, new) in changed.items()},
                      "allowed_by_flag": sorted(set(changed) & set(allow_change))}
            previous = run.resumes.read_text() if run.resumes.is_file() else ""
            write_text_atomic(run.resumes, previous + json.dumps(record) + "\n")
    write_text_atomic(run.config, config_header() + dump_config(cfg))


def config_header() -> str:
    """Comment lines on top of a saved ``config.yaml``: when, and with which package versions."""
    lines = [f"# written by cktf {__version__} on {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
             "# " + ", ".join(f"{name} {version}" for name, version in package_versions().items())]
    return "\n".join(lines) + "\n"


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages whose behaviour a run's numbers depend on."""
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "faiss-cpu", "faiss-gpu", "safetensors"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    return versions


def record_resolved(cfg: Any, device: torch.device, data_root: str | os.PathLike | None) -> None:
    """Replace ``auto``/``null``/0 in ``cfg`` by what the run actually uses: device, data root, thread count."""
    cfg.train.device = str(device)
    cfg.train.threads = torch.get_num_threads()
    if data_root is not None:
        cfg.data.root = str(data_root)


def flatten_config(values: dict, prefix: str = "") -> dict[str, Any]:
    """A saved config as ``{"train.epochs": 2, ...}`` (``data.options`` and other free mappings kept whole)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value and not prefix.startswith("data.options"):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def join_ranks(cfg: Any) -> torch.device:
    """Join torchrun's process group (:func:`~transfer.engine.distributed.setup`) and return this rank's device.

    Under torchrun the ranks' configs are compared first, before any other collective: ranks that disagree on,
    e.g., ``sampler.kind`` would otherwise call different collectives (one broadcasts a neighbour table, the
    other does not) and hang instead of stopping with one line. :func:`open_run` compares them again, after
    the stage has filled in what it reads from files (a teacher's recorded input).
    """
    device = distributed.setup(cfg.train.device)
    distributed.check_same_config(dump_config(cfg))
    return device


@dataclass(frozen=True)
class RunRequest:
    """How the user asked to start a run: ``--resume``, ``--overwrite``, ``--allow-change KEY``…"""

    resume: bool = False
    overwrite: bool = False
    allow_change: tuple[str, ...] = ()


def open_run(path: str | os.PathLike, option: str, cfg: Any, task: Task, device: torch.device,
             metadata: dict[str, str], request: RunRequest, *, describe: str,
             data_root: str | os.PathLike | None = None, tag_map: Callable[[str], str] | None = None) -> Engine:
    """Create (or reopen, to resume) the run directory ``path`` and return an engine ready to ``fit``.

    ``cfg`` is the stage's whole config (saved, with the values actually used, as ``config.yaml`` and in
    checkpoint metadata); its ``train`` and ``log`` sections configure the engine and the logger. ``option``
    names the config key(s) that chose ``path``; ``describe`` is the start line's account of what runs.
    A run directory without a checkpoint starts afresh even with ``--resume``.
    """
    # checked on every rank before rank 0 touches the run directory
    distributed.check_same_config(dump_config(cfg))
    distributed.per_rank_batch(cfg.train.batch_size)
    distributed.check_sync_bn(cfg.train.sync_bn, device)
    record_resolved(cfg, device, data_root)

    def prepare() -> tuple[str, bool]:
        run = prepare_run_dir(path, resume=request.resume, overwrite=request.overwrite, option=option)
        resuming = request.resume and run.last.is_file()
        write_run_config(run, cfg, resume=resuming, allow_change=request.allow_change)
        return str(run.path), resuming

    where, resuming = distributed.run_on_main(prepare)  # created by rank 0; the others wait
    run = RunDir(Path(where))
    ckpt = load_checkpoint(run.last) if resuming else None  # every rank loads
    main = distributed.is_main()
    logger = RunLogger(run.path, tensorboard=cfg.log.tensorboard and main, progress=cfg.log.progress and main,
                       tag_map=tag_map, purge_step=int(ckpt.state["step"]) + 1 if ckpt is not None else None,
                       progress_every=cfg.log.progress_every if main else 0.0)
    engine = Engine(task, cfg.train, run, logger, device,
                    {**metadata, "config": dump_config(cfg), "versions": json.dumps(package_versions())},
                    log_every=cfg.log.log_every)
    ranks = distributed.describe(cfg.train.batch_size)
    logger.info(f"{describe} | {device}, {cfg.train.precision}, {cfg.train.threads} threads"
                f"{' | ' + ranks if ranks else ''} | {run.path}")
    if ckpt is not None:
        engine.load_state(ckpt)
        where = f"epoch {engine.start_epoch}"
        if engine.progress is not None:
            where = f"batch {engine.progress['batches']} of epoch {engine.start_epoch + 1}"
        logger.info(f"resuming {run.path} after {where}")
    return engine
