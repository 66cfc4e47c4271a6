"""The training loop every stage runs.

Each epoch reseeds the global RNGs and the data order from ``(seed, epoch)``, so a run resumed from its
last checkpoint continues exactly as an uninterrupted one would. Checkpoints (``last`` every epoch,
``best`` when the selection metric improves on a *validation* split) hold the task, optimizer, epoch,
best-so-far and RNG states. ``train.checkpoint_every`` and SIGINT/SIGTERM add checkpoints *inside* an
epoch; they also hold how far the epoch got (batches, running loss sums), and resuming from one skips the
batches already done (the epoch's data order is a function of the seed) and restores the RNG state of
that step, so the final numbers equal an uninterrupted run's.

Under torchrun (see :mod:`transfer.engine.distributed`) the task's trainable part runs inside
``DistributedDataParallel`` (gradients averaged, so weights stay identical on every rank), memory banks and
``Z`` take every rank's batch into account, and per step one small all-gather carries the loss terms and the
stop flag, so logged numbers are global means and all ranks stop at the same step after a signal reaches
any of them. Each rank seeds its global RNGs (augmentation, negatives) from ``(seed, epoch, rank)``; the data
order stays a function of ``(seed, epoch)``. BatchNorm running statistics are averaged across ranks at the
end of every epoch (or kept identical by ``train.sync_bn``). Rank 0 alone writes checkpoints and logs; a
checkpoint holds every rank's RNG state and BatchNorm statistics, so a resume inside an epoch is exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from transfer.config import TrainConfig
from transfer.engine import distributed
from transfer.engine.checkpoint import Checkpoint, save_checkpoint
from transfer.engine.logger import RunLogger
from transfer.engine.performance import compile_module, match_state_layouts, prepare_network
from transfer.engine.rundir import RunDir, write_json
from transfer.engine.runtime import (
    autocast,
    check_precision,
    derive_seed,
    rng_state,
    seed_everything,
    set_rng_state,
)
from transfer.engine.schedule import apply_lr, build_optimizer
from transfer.engine.signals import StopRequest
from transfer.engine.task import StepOutput, Task
from transfer.errors import CKTFError, RunInterrupted
from transfer.models.timm_models import convert_sync_batchnorm


@dataclass
class FitResult:
    """What a finished :meth:`Engine.fit` reports (also written to ``metrics.json``)."""

    history: list[dict[str, float]]
    best_epoch: int | None
    best_value: float | None
    train_seconds: float

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


class Engine:
    """Runs a :class:`Task` for ``cfg.epochs`` epochs with SGD, logging and atomic checkpoints."""

    def __init__(self, task: Task, cfg: TrainConfig, run: RunDir, logger: RunLogger, device: torch.device,
                 metadata: Mapping[str, Any], log_every: int = 20) -> None:
        check_precision(device, cfg.precision)
        self.task = prepare_network(task, device, channels_last=cfg.channels_last)
        self.world = distributed.world_size()
        if cfg.sync_bn and self.world > 1:  # the frozen teacher's layers are converted too, but in eval they never sync
            self.task = convert_sync_batchnorm(self.task)  # timm's BatchNormAct keeps its activation
        if cfg.compile:
            for network in self.task.compile_targets():
                compile_module(network, device)
        self.log_every = log_every
        self.cfg = cfg
        self.run = run
        self.logger = logger
        self.device = device
        self.metadata = dict(metadata)
        self.optimizer = build_optimizer(cfg, task.trainable_parameters())
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.autocast = lambda: autocast(device, cfg.precision)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.train_seconds = 0.0
        self.start_epoch = 0
        self.progress: dict[str, Any] | None = None
        self.resumed = False
        self._step: Callable[..., StepOutput] = self.task.training_step
        self._ddp: torch.nn.Module | None = None
        self._rank_state: dict[str, Any] | None = None  # this rank's entry of a mid-epoch checkpoint

    # -- state -----------------------------------------------------------------------------------------------
    def state(self, epoch: int, progress: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint: ``epoch`` completed epochs, plus ``progress`` inside the next one (mid-epoch saves)."""
        return {
            "task": self.task.checkpoint_state(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "step": self.step,
            "best": {"epoch": self.best_epoch, "value": self.best_value},
            "history": self.history,
            "train_seconds": self.train_seconds,
            "rng": rng_state(),
            "progress": progress,
            "world_size": self.world,
        }

    def load_state(self, ckpt: Checkpoint) -> None:
        """Continue from a checkpoint written by this engine (at the end of an epoch or inside one)."""
        state = ckpt.state
        try:
            self.task.load_checkpoint_state(state["task"])
            self.optimizer.load_state_dict(state["optimizer"])
            match_state_layouts(self.optimizer)
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise CKTFError(f"cannot resume from {ckpt.path}: it does not match this run's model "
                            f"({str(err).splitlines()[0]})") from None
        self.resumed = True
        self.start_epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.best_epoch = state["best"]["epoch"]
        self.best_value = state["best"]["value"]
        self.history = list(state["history"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        saved_world = int(state.get("world_size", 1))
        self.progress = state.get("progress")
        if saved_world != self.world and self.progress is not None:
            raise CKTFError(f"{ckpt.path} was saved inside an epoch by {saved_world} process(es); resume it with "
                            f"{saved_world} (torchrun --nnodes x --nproc_per_node), not {self.world}")
        if saved_world != self.world:
            self.logger.warning(f"resuming a run of {saved_world} process(es) with {self.world}: from here on the "
                                "augmentation and negative draws differ from an uninterrupted run")
        mine = state["ranks"][distributed.rank()] if saved_world == self.world and "ranks" in state else None
        rng = mine["rng"] if mine is not None else state["rng"]
        set_rng_state(rng)
        self._rank_state = mine
        if self.progress is not None:
            self.progress["rng"] = rng

    def _save(self, epoch: int, improved: bool, progress: dict[str, Any] | None = None) -> None:
        """Write ``last`` (and ``best``): a collective under torchrun (every rank's RNG state and BatchNorm
        statistics are gathered), written by rank 0 alone."""
        meta = dict(self.metadata, epoch=str(epoch))
        state = self.state(epoch, progress)
        if self.world > 1:
            state["ranks"] = distributed.all_gather_objects(
                {"rng": state["rng"], "batchnorm": distributed.batchnorm_buffers(self.task)})
            if not distributed.is_main():
                return
        # best before last: a kill between the two leaves last one epoch behind, and the resumed epoch
        # rewrites best; the other order could leave a best older than last records
        if improved:
            save_checkpoint(self.run.best, state, meta)
        save_checkpoint(self.run.last, state, meta)

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Write the run's ``metrics.json`` (rank 0 only under torchrun; every rank holds the same numbers)."""
        if distributed.is_main():
            write_json(self.run.metrics, dict(metrics))

    # -- loop ------------------------------------------------------------------------------------------------
    def fit(self, train_loader: DataLoader, eval_loaders: Mapping[str, DataLoader] | None = None,
            select: str | None = None,
            augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> FitResult:
        """Train; evaluate ``eval_loaders`` after every epoch; keep ``best`` by ``select`` (e.g. ``val/acc``).

        ``augment`` maps each training batch of images, once on the device, to the network's input (the
        batched augmentation of ``data.augment batched``); its randomness is reseeded with the epoch's.
        SIGINT/SIGTERM, and ``train.checkpoint_every``, save a checkpoint after the current step; a signal then
        raises :class:`RunInterrupted`.
        """
        eval_loaders = dict(eval_loaders or {})
        if select is not None and select.split("/")[0] not in eval_loaders:
            select = None
        if len(train_loader) == 0:
            raise CKTFError("the training split is smaller than one batch; lower train.batch_size")
        if self.cfg.epochs == 0 and self.start_epoch == 0:
            self._save(0, improved=True)
        self._distribute()
        with StopRequest() as stop:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                seed = derive_seed(self.cfg.seed, epoch)
                seed_everything(distributed.rank_seed(seed))
                if getattr(train_loader, "generator", None) is not None:
                    train_loader.generator.manual_seed(seed)  # the data order: the same on every rank
                lr = apply_lr(self.cfg, self.optimizer, epoch)
                progress, self.progress = self.progress, None
                train_metrics = self._train_epoch(train_loader, epoch, augment, stop, progress)
                if not self.cfg.sync_bn:
                    distributed.average_batchnorm(self.task)
                seconds = train_metrics.pop("_seconds")
                self.train_seconds += seconds
                images = train_metrics.pop("_images")
                row: dict[str, float] = {"epoch": epoch + 1, "lr": lr, **train_metrics,
                                         "train/images_per_s": images / max(seconds, 1e-9)}
                for split, loader in eval_loaders.items():
                    self.task.eval()
                    for name, value in self.task.evaluate(loader, self.device, self.autocast).items():
                        row[f"{split}/{name}"] = value
                improved = False
                if select is not None:
                    value = row.get(select)
                    if value is not None and (self.best_value is None or value > self.best_value):
                        self.best_value, self.best_epoch, improved = value, epoch + 1, True
                self.history.append(row)
                self.logger.scalars({k: v for k, v in row.items() if k != "epoch"}, epoch + 1)
                self.logger.flush()
                self._save(epoch + 1, improved)
                self.logger.info(_summary(row, self.cfg.epochs))
                signum = self._agreed_stop(stop.signum)
                if signum is not None and epoch + 1 < self.cfg.epochs:
                    raise RunInterrupted(signum, self.run.last, epoch + 2, 0)
        result = FitResult(self.history, self.best_epoch, self.best_value, self.train_seconds)
        return result

    def _distribute(self) -> None:
        """Under torchrun: wrap the task's trainable part in DDP (once) and let banks gather across ranks.

        DDP broadcasts rank 0's parameters and buffers when it is built (weights, memory banks, BatchNorm
        statistics: one identical starting point); ``broadcast_buffers=False`` stops it from doing so every
        step, since the banks are kept identical by their own gathered writes and BatchNorm statistics are
        averaged per epoch. Parameters that require no gradient (the frozen teacher) are never synchronised.
        ``static_graph``: a method may leave trainable parameters unused in every step (the student's classifier
        under CRD); DDP finds them in the first step instead of searching the graph every step, and their
        gradients stay ``None`` as in a single process (no weight decay or momentum is applied to them).
        A mid-epoch checkpoint's per-rank BatchNorm statistics are put back after that broadcast.
        """
        if self.world == 1 or self._ddp is not None:
            return
        distributed.enable_gather(self.task)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(
            _TrainingStep(self.task), device_ids=device_ids, static_graph=True,
            **distributed.no_buffer_broadcast())
        self._ddp = ddp
        self._step = lambda *batch: StepOutput(*ddp(*batch))
        if self._rank_state is not None:
            distributed.load_batchnorm_buffers(self.task, self._rank_state["batchnorm"])

    def _agreed_stop(self, signum: int | None) -> int | None:
        """The signal any rank received (every rank then stops at the same step); ``signum`` for one process."""
        if self.world == 1:
            return signum
        flag = torch.tensor([float(signum or 0)], device=self.device)
        return int(distributed.all_reduce_(flag, "max").item()) or None

    def _reduce_step(self, terms: dict[str, torch.Tensor], signum: int | None,
                     due: bool) -> tuple[dict[str, torch.Tensor], int | None, bool]:
        """Global means of a step's logged terms, the agreed stop signal and whether a (time-based) checkpoint
        is due on any rank, in one small all-gather per step; unchanged for one process."""
        if self.world == 1:
            return terms, signum, due
        keys = sorted(terms)
        flags = torch.tensor([float(signum or 0), float(due)], device=self.device)
        local = torch.cat([torch.stack([terms[k].float().reshape(()) for k in keys]), flags])
        gathered = distributed.gather_cat(local[None])
        means = gathered[:, :-2].mean(dim=0)
        flags = gathered[:, -2:].amax(dim=0).tolist()
        return {k: means[i] for i, k in enumerate(keys)}, int(flags[0]) or None, bool(flags[1])

    def _train_epoch(self, loader: DataLoader, epoch: int, augment: Callable[[torch.Tensor], torch.Tensor] | None,
                     stop: StopRequest, progress: dict[str, Any] | None) -> dict[str, float]:
        """One epoch, from the start or from a mid-epoch checkpoint's ``progress``; returns its metrics."""
        self.task.train()
        sums: dict[str, torch.Tensor] = {}
        window: dict[str, torch.Tensor] = {}
        window_steps = done = 0
        images_seen, before = 0.0, 0.0
        if progress is not None:
            done, images_seen, before = int(progress["batches"]), float(progress["images"]), progress["seconds"]
            sums = {k: v.to(self.device) for k, v in progress["sums"].items()}
            skip = getattr(loader.sampler, "skip", None)
            if skip is None:
                raise CKTFError("this training loader cannot resume inside an epoch (its sampler has no skip)")
            skip(done * int(loader.batch_size))
            set_rng_state(progress["rng"])  # this rank's
            if loader.num_workers > 0 and getattr(loader, "random_items", False):
                self.logger.warning("resuming inside an epoch with per-image augmentation in loader workers: the "
                                    "rest of this epoch's augmentation differs from an uninterrupted run")
        every_steps, every_seconds = self.cfg.checkpoint_interval
        start = last_save = last_line = time.perf_counter()
        total = len(loader)
        bar = self.logger.bar(loader, total=total, initial=done, desc=f"epoch {epoch + 1}/{self.cfg.epochs}")
        batch = done
        for images, targets, indices in bar:
            images = images.to(self.device, non_blocking=True)
            if augment is not None:
                images = augment(images)
            targets = targets.to(self.device, non_blocking=True)
            indices = indices.to(self.device, non_blocking=True)
            with self.autocast():
                out = self._step(images, targets, indices)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(out.loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            batch += 1
            images_seen += images.shape[0] * self.world
            terms = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.terms.items()}}
            now = time.perf_counter()
            due = bool((every_steps and self.step % every_steps == 0)
                       or (every_seconds and now - last_save >= every_seconds))
            terms, signum, due = self._reduce_step(terms, stop.signum, due)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value.float()
                window[key] = window.get(key, 0.0) + value.float()
            window_steps += 1
            if self.step % self.log_every == 0:
                means = {f"train/{k}": (v / window_steps).item() for k, v in window.items()}
                if not math.isfinite(means["train/loss"]):
                    raise CKTFError(f"training diverged at epoch {epoch + 1}, step {self.step} (loss is "
                                    f"{means['train/loss']}); lower train.lr")
                self.logger.scalars(means, self.step)
                bar.set_postfix(loss=f"{means['train/loss']:.4f}", img_s=f"{images_seen / (before + now - start):.0f}")
                window, window_steps = {}, 0
            if self.logger.lines_due(now - last_line):
                last_line = now
                self.logger.info(f"epoch {epoch + 1}/{self.cfg.epochs}  batch {batch}/{total}  loss "
                                 f"{(sums['loss'] / batch).item():.4f}  "
                                 f"{images_seen / (before + now - start):.0f} img/s")
            if batch < total and (due or signum is not None):
                seconds = before + now - start
                self._save(epoch, False, {"batches": batch, "images": images_seen, "seconds": seconds,
                                          "sums": {k: v.detach().cpu() for k, v in sums.items()}})
                last_save = now
                if signum is not None:
                    raise RunInterrupted(signum, self.run.last, epoch + 1, batch)
        steps = max(1, total)
        metrics = {f"train/{k}_epoch": (v / steps).item() for k, v in sums.items()}
        if not math.isfinite(metrics["train/loss_epoch"]):
            raise CKTFError(f"training diverged in epoch {epoch + 1} (loss is not finite); lower train.lr")
        metrics["_images"] = images_seen
        metrics["_seconds"] = before + time.perf_counter() - start
        return metrics


class _TrainingStep(torch.nn.Module):
    """The task's training step as a module's ``forward``, which is what DDP wraps and synchronises."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.task = task

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.task.training_step(images, targets, indices)
        return out.loss, out.terms


def _summary(row: Mapping[str, float], epochs: int) -> str:
    parts = [f"epoch {int(row['epoch'])}/{epochs}"]
    for key, value in row.items():
        if key in ("epoch",):
            continue
        if key.endswith("acc"):
            parts.append(f"{key} {100 * value:.2f}%")
        elif key in ("train/loss_epoch", "lr", "train/images_per_s") or key.endswith("/loss"):
            parts.append(f"{key} {value:.4g}")
    return "  ".join(parts)
