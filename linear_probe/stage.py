"""``cktf probe``: freeze a network, fit a linear classifier on the target's labeled split, test every epoch.

The per-epoch test accuracy is the convergence curve of the paper's Fig. 2. It is logged as
``probe/test_acc`` (with ``probe/train_loss`` and ``probe/knn_acc``) into ``<run>/probe/``, so
``tensorboard --logdir runs`` overlays every method. Model selection never looks at the test split: the
last epoch is reported, plus the test accuracy at the best *validation* epoch when a validation split (or
``data.val_fraction``) is configured. (The published CKTF code reports the maximum test accuracy over its
240 fine-tuning epochs, i.e. selects on the test split; a curve's maximum is in TensorBoard for anyone who
wants to compare against that number, but it is never reported as a result.)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from linear_probe.config import ProbeConfig
from linear_probe.features import FeatureDataset, PixelFeatures, network_features
from linear_probe.knn import knn_accuracy
from linear_probe.probe import LinearProbe, ProbeTask
from transfer.data import build_dataset
from transfer.data.indexed import IndexedSubset, holdout_split
from transfer.data.transforms import build_transform
from transfer.engine import distributed
from transfer.engine.checkpoint import read_metadata
from transfer.engine.performance import check_runtime, prepare_network
from transfer.engine.runtime import seed_everything, set_threads
from transfer.errors import CKTFError
from transfer.models import build_model
from transfer.models.checkpoints import load_network
from transfer.models.input_spec import InputSpec, check_channels, follow_recorded_input
from transfer.stages.common import (
    RunRequest,
    extract_features,
    make_loader,
    open_run,
    train_pipeline,
)

TAGS = {"test/acc": "probe/test_acc", "train/loss_epoch": "probe/train_loss", "val/acc": "probe/val_acc"}


def probe_tag(tag: str) -> str:
    """TensorBoard tag of an engine metric inside a probe run."""
    return TAGS.get(tag, f"probe/{tag}")


@dataclass
class Backbone:
    """The frozen feature extractor under probe and how to report it."""

    module: nn.Module
    label: str
    in_channels: int | None
    out: Path
    source: str
    transfer_seconds: float | None


def _backbone(cfg: ProbeConfig, student: str | None, in_channels: int) -> Backbone:
    kind = cfg.probe.backbone
    if kind == "pixels":
        return Backbone(PixelFeatures(), cfg.probe.label or "pixels", None, Path(cfg.probe.out), "pixels", None)
    if kind == "random":
        seed_everything(cfg.train.seed)
        model = build_model(cfg.probe.model, in_channels=in_channels, num_classes=10)
        return Backbone(network_features(model, cfg.probe.model, {}), cfg.probe.label or "random_init", in_channels,
                        Path(cfg.probe.out), f"random:{cfg.probe.model}", None)
    if student is None:
        raise CKTFError("no network to probe: pass --student PATH (last.safetensors of a cktf transfer run)")
    meta = read_metadata(student)
    prefixes = {"transfer": "student.model.", "teacher": "model."}
    if meta.get("kind") not in prefixes:
        raise CKTFError(f"--student {student} is a '{meta.get('kind')}' checkpoint; expected one written by "
                        "cktf transfer (or cktf train-teacher, to probe the teacher's own features)")
    net = load_network(student, prefix=prefixes[meta["kind"]], kinds=(meta["kind"],), option="--student")
    run_dir = Path(student).parent
    seconds = None
    if (run_dir / "metrics.json").is_file():
        seconds = json.loads((run_dir / "metrics.json").read_text()).get("train_seconds")
    label = cfg.probe.label or meta.get("method") or meta["kind"]
    out = Path(cfg.probe.out) if cfg.probe.out else run_dir / "probe"
    return Backbone(network_features(net.model, net.name, net.taps), label, net.in_channels, out, str(student),
                    seconds if meta["kind"] == "transfer" else None)


def _recorded_input(student: str) -> InputSpec:
    """The input size/normalisation the checkpoint records (nothing for files that are not cktf checkpoints,
    which :func:`_backbone` then reports)."""
    try:
        return InputSpec.from_metadata(read_metadata(student))
    except CKTFError:
        return InputSpec()
    except ValueError as err:
        raise CKTFError(f"--student {student}: {err}") from None


def _labeled(dataset, split: str, name: str):
    targets = torch.as_tensor(dataset.targets)
    if len(targets) == 0:
        raise CKTFError(f"data split '{split}' of {name} is empty; the probe needs labeled images")
    if bool((targets < 0).any()):
        raise CKTFError(f"data split '{split}' of {name} has unlabeled images (target -1); the probe needs a labeled "
                        "split (e.g. --data.train_split target_train / train)")
    return dataset


def run_probe(cfg: ProbeConfig, student: str | None, request: RunRequest = RunRequest()) -> dict:
    """Probe the backbone described by ``cfg``/``student``; returns the metrics written to metrics.json."""
    set_threads(cfg.train.threads)
    device = distributed.setup(cfg.train.device)
    check_runtime(device, cfg.train)
    d = cfg.data
    if cfg.probe.backbone == "checkpoint" and student is not None and Path(student).is_file():
        follow_recorded_input(d, _recorded_input(student), f"--student {student}")
    eval_tf = build_transform(d.name, train=False, image_size=d.image_size, mean=d.mean, std=d.std)
    train_eval = _labeled(build_dataset(d.name, d.train_split, d.root, eval_tf, **d.options), d.train_split, d.name)
    check_channels(d, train_eval.in_channels)
    if d.test_split is None:
        raise CKTFError("data.test_split is not set; the probe evaluates on it after every epoch")
    test = _labeled(build_dataset(d.name, d.test_split, d.root, eval_tf, **d.options), d.test_split, d.name)
    backbone = _backbone(cfg, student, train_eval.in_channels)
    if backbone.in_channels is not None and backbone.in_channels != train_eval.in_channels:
        raise CKTFError(f"{backbone.source} takes {backbone.in_channels}-channel images but {d.name} has "
                        f"{train_eval.in_channels}")
    module = prepare_network(backbone.module, device, channels_last=cfg.train.channels_last)

    keep = list(range(len(train_eval)))
    held: list[int] = []
    val_eval = None
    if d.val_split is not None:
        val_eval = _labeled(build_dataset(d.name, d.val_split, d.root, eval_tf, **d.options), d.val_split, d.name)
    elif d.val_fraction > 0:
        keep, held = holdout_split(len(train_eval), d.val_fraction, cfg.train.seed)
    workers, batch = d.num_workers, cfg.train.eval_batch_size
    t0 = time.perf_counter()
    feats, labels = extract_features(module, train_eval, batch, device, workers)
    test_feats, test_labels = extract_features(module, test, batch, device, workers)
    train_feats, train_labels = feats[keep], labels[keep]
    seed_everything(cfg.train.seed)
    stats = (train_feats.mean(0), train_feats.std(0)) if cfg.probe.standardize else (None, None)
    probe = LinearProbe(feats.shape[1], train_eval.num_classes, *stats)

    augment = None
    if cfg.probe.mode == "cached":
        task = ProbeTask(nn.Identity(), probe)
        train_set = FeatureDataset(train_feats, train_labels)
        evals = {"test": FeatureDataset(test_feats, test_labels)}
        if held:
            evals["val"] = FeatureDataset(feats[held], labels[held])
        elif val_eval is not None:
            evals["val"] = FeatureDataset(*extract_features(module, val_eval, batch, device, workers))
    else:
        task = ProbeTask(module, probe)
        train_tf, augment = train_pipeline(d)
        train_set = build_dataset(d.name, d.train_split, d.root, train_tf, **d.options)
        evals = {"test": test}
        if held:
            train_set = IndexedSubset(train_set, keep)
            evals["val"] = IndexedSubset(train_eval, held)
        elif val_eval is not None:
            evals["val"] = val_eval

    metadata = {"kind": "probe", "method": backbone.label, "backbone": backbone.source}
    option = "probe.out" if cfg.probe.out else "probe.out (default: <checkpoint's run dir>/probe)"
    describe = (f"probe ({cfg.probe.mode}): {backbone.source} on {d.name}/{d.train_split} ({len(train_labels)} "
                f"labeled, test {len(test_labels)})")
    engine = open_run(backbone.out, option, cfg, task, device, metadata, request, describe=describe,
                      data_root=getattr(train_eval, "root", None), tag_map=probe_tag)
    logger = engine.logger
    cpu_or_pin = device if cfg.probe.mode == "augment" else torch.device("cpu")
    loader = make_loader(train_set, cfg.train.batch_size, train=True,
                         num_workers=workers if cfg.probe.mode == "augment" else 0, device=cpu_or_pin,
                         random_items=cfg.probe.mode == "augment" and augment is None)
    eval_loaders = {name: make_loader(ds, batch, train=False, num_workers=0, device=cpu_or_pin)
                    for name, ds in evals.items()}
    result = engine.fit(loader, eval_loaders, select="val/acc" if "val" in evals else None, augment=augment)

    knn = None
    if cfg.probe.knn_k > 0:
        knn = knn_accuracy(train_feats, train_labels, test_feats, test_labels, train_eval.num_classes,
                           k=cfg.probe.knn_k, temperature=cfg.probe.knn_temperature)
        logger.scalars({"knn_acc": knn}, len(result.history))
    logger.close()
    best = result.history[result.best_epoch - 1] if result.best_epoch else None
    metrics = {
        "kind": "probe",
        "method": backbone.label,
        "seed": cfg.train.seed,
        "mode": cfg.probe.mode,
        "standardize": cfg.probe.standardize,
        "epochs": len(result.history),
        "final_acc": result.final.get("test/acc"),
        "best_epoch": result.best_epoch,
        "best_val_acc": result.best_value,
        "test_acc_at_best": best.get("test/acc") if best else None,
        "knn_acc": knn,
        "transfer_seconds": backbone.transfer_seconds,
        "probe_seconds": time.perf_counter() - t0,
        "run": str(backbone.source),
        "train_items": len(train_labels),
        "test_items": len(test_labels),
    }
    engine.write_metrics(metrics)
    return metrics
