"""Wiring shared by the stages: datasets with their transforms, loaders, run setup."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from transfer.config import DataConfig, config_to_dict, dump_config
from transfer.data import build_dataset
from transfer.data.batch_augment import BatchTransform, build_batch_transform
from transfer.data.indexed import IndexedSubset, holdout_split
from transfer.data.transforms import build_decode_transform, build_transform
from transfer.engine.checkpoint import load_checkpoint
from transfer.engine.logger import RunLogger
from transfer.engine.rundir import RunDir, prepare_run_dir, write_text_atomic
from transfer.engine.task import Task
from transfer.engine.trainer import Engine
from transfer.errors import CKTFError

# Keys that may differ between an interrupted run and its --resume (they do not change the result).
RESUME_MAY_CHANGE = ("train.epochs", "train.threads", "train.device", "data.root", "data.num_workers",
                     "log.progress", "log.root", "train.eval_batch_size", "train.channels_last", "train.compile")
# Keys added after runs were first written, with the value a config.yaml without them implies.
IMPLIED_BY_OLDER_RUNS = {"data.augment": "per_image"}


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
                build_batch_transform(cfg.name, train=True, image_size=cfg.image_size))
    return build_transform(cfg.name, train=True, image_size=cfg.image_size), None


def build_splits(cfg: DataConfig, seed: int) -> SplitSet:
    """Datasets for ``cfg``: train with training augmentation, val/test with the eval transform.

    Without ``val_split`` a ``val_fraction`` of the train split is held out (fixed by ``seed``), so model
    selection never looks at the test split. With ``data.augment batched`` the training augmentation is
    ``SplitSet.augment``, to be passed to ``Engine.fit``.
    """
    train_tf, augment = train_pipeline(cfg)
    eval_tf = build_transform(cfg.name, train=False, image_size=cfg.image_size)
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


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, num_workers: int, device: torch.device,
                random_items: bool = True) -> DataLoader:
    """A DataLoader with its own generator (reseeded by the engine every epoch for exact resumes).

    Memory is pinned only for CUDA. Workers persist across epochs, except for a training loader whose
    items are random (``random_items``: per-image augmentation), because a persistent worker would carry
    its RNG state into the next epoch instead of being reseeded from ``(seed, epoch)``, and a resumed run
    would then differ. Items are small (uint8 with batched augmentation), so workers prefetch 4 batches.
    """
    workers: dict[str, Any] = {}
    if num_workers > 0:
        workers = {"persistent_workers": not (train and random_items), "prefetch_factor": 4}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) >= batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator() if train else None,
        **workers,
    )


def write_run_config(run: RunDir, cfg: Any, *, resume: bool) -> None:
    """Save the resolved config; on resume, refuse a config that would change the run's result."""
    if resume and run.config.is_file():
        saved = {**IMPLIED_BY_OLDER_RUNS, **_flatten(yaml.safe_load(run.config.read_text()) or {})}
        now = _flatten(config_to_dict(cfg))
        # per-image augmentation draws in the loader's workers, seeded per worker: their number matters then
        may_change = set(RESUME_MAY_CHANGE)
        if now.get("data.augment") == "per_image":
            may_change.discard("data.num_workers")
        for key in sorted(set(saved) | set(now)):
            if key in may_change:
                continue
            if saved.get(key) != now.get(key):
                raise CKTFError(f"--resume with a different config: '{key}' was {saved.get(key)!r} in "
                                f"{run.config}, now {now.get(key)!r}; resume with the original settings")
    write_text_atomic(run.config, dump_config(cfg))


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value and not prefix.startswith("data.options"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def open_run(root: str, name: str, cfg: Any, task: Task, device: torch.device, metadata: dict[str, str], *,
             resume: bool, overwrite: bool, tag_map: Callable[[str], str] | None = None) -> Engine:
    """Create (or reopen, with ``resume``) the run directory and return an engine ready to ``fit``.

    ``cfg`` is the stage's whole config (saved as ``config.yaml`` and in checkpoint metadata); its ``train``
    and ``log`` sections configure the engine and the logger.
    """
    run = prepare_run_dir(root, name, resume=resume, overwrite=overwrite)
    ckpt = load_checkpoint(run.last) if resume else None
    write_run_config(run, cfg, resume=resume)
    logger = RunLogger(run.path, tensorboard=cfg.log.tensorboard, progress=cfg.log.progress, tag_map=tag_map,
                       purge_step=int(ckpt.state["step"]) + 1 if ckpt is not None else None)
    engine = Engine(task, cfg.train, run, logger, device, {**metadata, "config": dump_config(cfg)},
                    log_every=cfg.log.log_every)
    if ckpt is not None:
        engine.load_state(ckpt)
        logger.info(f"resuming {run.path} after epoch {engine.start_epoch}")
    return engine
