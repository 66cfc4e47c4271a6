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
from torch.utils.data import Dataset

from linear_probe.config import ProbeConfig
from linear_probe.features import FeatureDataset, PixelFeatures, network_features
from linear_probe.knn import knn_accuracy
from linear_probe.probe import LinearProbe, ProbeTask
from transfer.data import build_dataset
from transfer.data.batch_augment import BatchTransform
from transfer.data.indexed import IndexedSubset, holdout_split
from transfer.data.transforms import build_transform
from transfer.engine.checkpoint import read_metadata
from transfer.engine.logger import phase
from transfer.engine.performance import check_runtime, prepare_network
from transfer.engine.rundir import is_own_run
from transfer.engine.runtime import seed_everything, set_threads
from transfer.engine.trainer import Engine, FitResult
from transfer.errors import CKTFError
from transfer.models import build_model
from transfer.models.checkpoints import load_network
from transfer.models.input_spec import InputSpec, check_channels, follow_recorded_input
from transfer.sampling import file_sha256
from transfer.stages.common import (
    RunRequest,
    extract_features,
    join_ranks,
    make_loader,
    open_run,
    train_pipeline,
)

TAGS = {"test/acc": "probe/test_acc", "train/loss_epoch": "probe/train_loss", "val/acc": "probe/val_acc"}


def probe_tag(tag: str) -> str | None:
    """TensorBoard tag of an engine metric inside a probe run: one tag per quantity, against epochs. The
    engine's per-step windows (``train/loss`` every ``log.log_every`` steps) are left out: the epoch's
    ``probe/train_loss`` is the probe's training loss."""
    if tag in TAGS:
        return TAGS[tag]
    return None if tag.startswith("train/") else f"probe/{tag}"


@dataclass
class Backbone:
    """The frozen feature extractor under probe and how to report it."""

    module: nn.Module
    label: str
    in_channels: int | None
    out: Path
    source: str
    transfer_seconds: float | None
    sha256: str | None = None

    @property
    def identity(self) -> str:
        """What makes two probes probes of the same network: the checkpoint's content, else the control's name."""
        return self.sha256 or self.source


def _backbone(cfg: ProbeConfig, student: str | None, in_channels: int) -> Backbone:
    kind = cfg.probe.backbone
    if kind == "pixels":
        return Backbone(PixelFeatures(), cfg.probe.label or "pixels", None, Path(cfg.probe.out), "pixels", None)
    if kind == "random":
        seed_everything(cfg.train.seed)
        model = build_model(cfg.probe.model, in_channels=in_channels, num_classes=10, option="probe.model")
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
    out = Path(cfg.probe.out) if cfg.probe.out else default_probe_dir(Path(student))
    return Backbone(network_features(net.model, net.name, net.taps), label, net.in_channels, out, str(student),
                    seconds if meta["kind"] == "transfer" else None, file_sha256(student))


def default_probe_dir(student: Path) -> Path:
    """``<run>/probe`` for a checkpoint in its own cktf run directory; ``<folder>/probe_<stem>`` for any other
    file, so that two checkpoints side by side (``teachers/r18.safetensors``, ``teachers/r34.safetensors``)
    never share a probe."""
    if is_own_run(student.parent):
        return student.parent / "probe"
    return student.parent / f"probe_{student.stem}"


def check_same_backbone(backbone: Backbone, request: RunRequest) -> None:
    """Refuse to continue (or report) a probe directory that holds the probe of another network.

    A probe directory's checkpoint records the sha256 of the network it probes; without this check
    ``--resume`` would report the old network's linear probe next to the new one's kNN.
    """
    last = backbone.out / "last.safetensors"
    if request.overwrite or not last.is_file():
        return
    saved = read_metadata(last)
    if saved.get("backbone_sha256", saved.get("backbone")) == backbone.identity:
        return
    raise CKTFError(f"{backbone.out} holds the probe of {saved.get('backbone', 'another network')}, not of "
                    f"{backbone.source} (their contents differ); pass --probe.out DIR for a probe of "
                    f"{backbone.source}, or --overwrite to replace that probe")


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


@dataclass
class ProbeData:
    """The labeled splits of a probe, all with the evaluation transform.

    ``keep``/``held`` index ``train`` when the validation set is held out of it (``data.val_fraction``);
    ``val`` is the separate ``data.val_split`` otherwise (or ``None``).
    """

    train: Dataset
    test: Dataset
    val: Dataset | None
    keep: list[int]
    held: list[int]


@dataclass
class Features:
    """Penultimate features (and labels) extracted once: all of the train split, and the test split."""

    train: torch.Tensor
    labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor


def probe_data(cfg: ProbeConfig, student: str | None) -> ProbeData:
    """The labeled train/test (and validation) splits of ``cfg.data`` with the evaluation transform.

    Unless ``data.image_size``/``mean``/``std`` are set, the input follows what ``student``'s checkpoint records.
    """
    d = cfg.data
    if cfg.probe.backbone == "checkpoint" and student is not None and Path(student).is_file():
        follow_recorded_input(d, _recorded_input(student), f"--student {student}")
    eval_tf = build_transform(d.name, train=False, image_size=d.image_size, mean=d.mean, std=d.std)
    train = _labeled(build_dataset(d.name, d.train_split, d.root, eval_tf, **d.options), d.train_split, d.name)
    check_channels(d, train.in_channels)
    if d.test_split is None:
        raise CKTFError("data.test_split is not set; the probe evaluates on it after every epoch")
    test = _labeled(build_dataset(d.name, d.test_split, d.root, eval_tf, **d.options), d.test_split, d.name)
    keep, held, val = list(range(len(train))), [], None
    if d.val_split is not None:
        val = _labeled(build_dataset(d.name, d.val_split, d.root, eval_tf, **d.options), d.val_split, d.name)
    elif d.val_fraction > 0:
        keep, held = holdout_split(len(train), d.val_fraction, cfg.train.seed)
    return ProbeData(train, test, val, keep, held)


def extract_all(module: nn.Module, data: ProbeData, cfg: ProbeConfig, device: torch.device) -> Features:
    """The frozen backbone's features of the whole train split and of the test split."""
    batch, workers = cfg.train.eval_batch_size, cfg.data.num_workers
    with phase(f"extracting features of {len(data.train)} train and {len(data.test)} test images"):
        feats, labels = extract_features(module, data.train, batch, device, workers)
        test_feats, test_labels = extract_features(module, data.test, batch, device, workers)
    return Features(feats, labels, test_feats, test_labels)


def probe_training(cfg: ProbeConfig, module: nn.Module, probe: LinearProbe, data: ProbeData, feats: Features,
                   device: torch.device) -> tuple[ProbeTask, Dataset, dict[str, Dataset], BatchTransform | None]:
    """``(task, training set, evaluation sets, batched augmentation)`` for ``probe.mode``.

    ``cached``: the linear layer trains on the features extracted once; ``augment``: features are computed per
    batch from augmented images, through the frozen backbone.
    """
    d, keep, held = cfg.data, data.keep, data.held
    if cfg.probe.mode == "cached":
        evals: dict[str, Dataset] = {"test": FeatureDataset(feats.test, feats.test_labels)}
        if held:
            evals["val"] = FeatureDataset(feats.train[held], feats.labels[held])
        elif data.val is not None:
            evals["val"] = FeatureDataset(*extract_features(module, data.val, cfg.train.eval_batch_size, device,
                                                            d.num_workers))
        return (ProbeTask(nn.Identity(), probe), FeatureDataset(feats.train[keep], feats.labels[keep]), evals,
                None)
    train_tf, augment = train_pipeline(d)
    train_set = build_dataset(d.name, d.train_split, d.root, train_tf, **d.options)
    evals = {"test": data.test}
    if held:
        train_set = IndexedSubset(train_set, keep)
        evals["val"] = IndexedSubset(data.train, held)
    elif data.val is not None:
        evals["val"] = data.val
    return ProbeTask(module, probe), train_set, evals, augment


def fit_probe(engine: Engine, cfg: ProbeConfig, train_set: Dataset, evals: dict[str, Dataset],
              augment: BatchTransform | None, device: torch.device) -> FitResult:
    """Train the probe, evaluating every epoch; a validation split (never the test split) selects the best."""
    augmented = cfg.probe.mode == "augment"
    cpu_or_pin = device if augmented else torch.device("cpu")
    loader = make_loader(train_set, cfg.train.batch_size, train=True,
                         num_workers=cfg.data.num_workers if augmented else 0, device=cpu_or_pin,
                         random_items=augmented and augment is None)
    eval_loaders = {name: make_loader(ds, cfg.train.eval_batch_size, train=False, num_workers=0, device=cpu_or_pin)
                    for name, ds in evals.items()}
    return engine.fit(loader, eval_loaders, select="val/acc" if "val" in evals else None, augment=augment)


def knn_probe(cfg: ProbeConfig, feats: Features, data: ProbeData) -> float | None:
    """Weighted kNN accuracy on the test split from the probe-train features (``probe.knn_k`` 0: none)."""
    if cfg.probe.knn_k <= 0:
        return None
    return knn_accuracy(feats.train[data.keep], feats.labels[data.keep], feats.test, feats.test_labels,
                        data.train.num_classes, k=cfg.probe.knn_k, temperature=cfg.probe.knn_temperature)


def probe_metrics(cfg: ProbeConfig, backbone: Backbone, result: FitResult, knn: float | None, data: ProbeData,
                  seconds: float) -> dict:
    """What ``metrics.json`` records of a probe: the last epoch, the best-validation epoch, kNN, sizes, times."""
    best = result.history[result.best_epoch - 1] if result.best_epoch else None
    return {
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
        "probe_seconds": seconds,
        "run": str(backbone.source),
        "backbone_sha256": backbone.identity,
        "train_items": len(data.keep),
        "test_items": len(data.test),
    }


def run_probe(cfg: ProbeConfig, student: str | None, request: RunRequest = RunRequest()) -> dict:
    """Probe the backbone described by ``cfg``/``student``; returns the metrics written to metrics.json."""
    set_threads(cfg.train.threads)
    device = join_ranks(cfg)
    check_runtime(device, cfg.train)
    d = cfg.data
    data = probe_data(cfg, student)
    backbone = _backbone(cfg, student, data.train.in_channels)
    check_same_backbone(backbone, request)  # before any work
    if backbone.in_channels is not None and backbone.in_channels != data.train.in_channels:
        raise CKTFError(f"{backbone.source} takes {backbone.in_channels}-channel images but {d.name} has "
                        f"{data.train.in_channels}")
    module = prepare_network(backbone.module, device, channels_last=cfg.train.channels_last)
    t0 = time.perf_counter()
    feats = extract_all(module, data, cfg, device)
    train_feats = feats.train[data.keep]
    seed_everything(cfg.train.seed)
    stats = (train_feats.mean(0), train_feats.std(0)) if cfg.probe.standardize else (None, None)
    probe = LinearProbe(feats.train.shape[1], data.train.num_classes, *stats)
    task, train_set, evals, augment = probe_training(cfg, module, probe, data, feats, device)

    metadata = {"kind": "probe", "method": backbone.label, "backbone": backbone.source,
                "backbone_sha256": backbone.identity}
    option = "probe.out" if cfg.probe.out else "probe.out (default: <run dir>/probe, or probe_<name> beside the file)"
    describe = (f"probe ({cfg.probe.mode}): {backbone.source} on {d.name}/{d.train_split} ({len(data.keep)} "
                f"labeled, test {len(data.test)})")
    engine = open_run(backbone.out, option, cfg, task, device, metadata, request, describe=describe,
                      data_root=getattr(data.train, "root", None), tag_map=probe_tag)
    result = fit_probe(engine, cfg, train_set, evals, augment, device)
    knn = knn_probe(cfg, feats, data)
    if knn is not None:
        engine.logger.scalars({"knn_acc": knn}, len(result.history))
    engine.logger.close()
    metrics = probe_metrics(cfg, backbone, result, knn, data, time.perf_counter() - t0)
    engine.write_metrics(metrics)
    return metrics
