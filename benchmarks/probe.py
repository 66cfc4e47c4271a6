"""Benchmark of the linear probe (``cktf probe``) at STL-10 scale: 5 000 train / 8 000 test images, 100 epochs.

Data: a synthetic STL-10 written in the official binary layout (random 96x96 uint8 images, labels cycling
through the 10 classes) into a temporary folder, so the real ``stl10`` reader and transforms run. The
network under probe is the STL-10 probe config's (``configs/tinyimagenet_to_stl10/probe.yaml``) student,
a VGG-8 at 64x64 (512-d penultimate features): randomly initialised (``--model``, the probe's ``random``
backbone) or the network of a transfer checkpoint (``--student PATH``). Every ``--section.key VALUE`` (or
``--set section.key=VALUE``) overrides a key of the probe config.

Modes (``--modes``):

* ``cached``: ``run_probe`` end to end, exactly what ``cktf probe --probe.mode cached`` runs: features of
  the train and test images are extracted once by the frozen network, then the linear classifier trains
  on the cached features for ``--epochs`` epochs with a test pass after every epoch (the convergence
  curve), then the kNN probe. The benchmark only wraps ``extract_features`` and ``Engine.fit`` to time
  them. Columns: ``extract s`` (both splits through the network), ``probe s`` (all epochs: training,
  per-epoch test pass and checkpoint), ``per epoch s``, ``train s`` (training steps only, the engine's
  own clock), ``rest s`` (setup, kNN, metrics) and ``total s``.
* ``augment``: features computed per batch by the frozen network on augmented images (the paper's probe).
  100 epochs of that are hours on a CPU, so ``run_probe`` runs one epoch with its loaders cut (by wrapping
  ``make_loader``) to ``--augment-warmup`` + ``--augment-batches`` training batches and ``--eval-batches``
  test batches, each timed (loading, augmentation, network forward, probe step); the medians per batch are
  extrapolated to full epochs (the real loaders' lengths) and to ``--epochs`` epochs. Such numbers are
  marked ``(est.)``. ``run_probe`` also extracts the train and test features in this mode (standardisation
  statistics, kNN probe); after a cached run those are handed back from it (same network, seed and eval
  transform, so the same features) instead of being computed twice: ``extract s`` is then ``reused``.

Data loading runs in the main process (``--data.num_workers 0``; the config's 8 workers are for a GPU
machine; pass ``--data.num_workers N`` to change it).

Run (from the repository root)::

    .venv/bin/python benchmarks/probe.py                     # both modes at STL-10 scale (CPU)
    .venv/bin/python benchmarks/probe.py --modes cached --student runs/stl10_cktf_vgg19_vgg8/last.safetensors
    .venv/bin/python benchmarks/probe.py --device cuda --augment-batches 50
    .venv/bin/python benchmarks/probe.py --train-items 64 --test-items 64 --epochs 2 --augment-batches 2 \\
        --eval-batches 1 --data.image_size 32                 # smoke size

Results go to ``--json`` (default ``benchmarks/results/probe-<host>-<device>.json``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import linear_probe.stage  # noqa: E402
from benchmarks.common import (  # noqa: E402
    TimedBatches,
    command_line,
    config_overrides,
    csv_choices,
    default_json_path,
    describe,
    format_table,
    machine_info,
    median,
    patched,
    performance_options,
    positive_int,
    synchronize,
    write_json,
)
from linear_probe.config import ProbeConfig  # noqa: E402
from linear_probe.stage import run_probe  # noqa: E402
from tests.data_fixtures import write_stl10  # noqa: E402
from transfer.config import config_to_dict, load_config  # noqa: E402
from transfer.config.loader import parse_overrides  # noqa: E402
from transfer.engine.runtime import resolve_device  # noqa: E402
from transfer.engine.trainer import Engine  # noqa: E402
from transfer.errors import CKTFError  # noqa: E402

CONFIG = ROOT / "configs/tinyimagenet_to_stl10/probe.yaml"
MODES = ("cached", "augment")


# ------------------------------------------------------------------------------------------------- helpers


class Instruments:
    """The wrappers put around ``run_probe``'s collaborators: timing, limited loaders, reused features.

    * ``Engine.fit``: wall time and result of every call.
    * ``extract_features`` (as ``linear_probe.stage`` calls it): wall time of every call; results are kept
      per split, and with ``reuse`` a split extracted before (by the cached run, with the same network,
      seed and eval transform, so the same features) is returned instead of being extracted again.
    * ``make_loader`` (with ``train_batches``/``eval_batches``): the loaders cut to that many batches and
      timed per batch (:class:`TimedBatches`).
    """

    def __init__(self, device: torch.device, features: dict[tuple[str, int], Any]) -> None:
        self.device = device
        self.features = features
        self.fits: list[dict[str, Any]] = []
        self.extracts: list[dict[str, Any]] = []
        self.train_loaders: list[TimedBatches] = []
        self.eval_loaders: list[TimedBatches] = []

    def timed_fit(self, original: Callable) -> Callable:
        def fit(engine: Engine, *args: Any, **kwargs: Any) -> Any:
            synchronize(self.device)
            start = time.perf_counter()
            result = original(engine, *args, **kwargs)
            synchronize(self.device)
            self.fits.append({"seconds": time.perf_counter() - start, "result": result})
            return result
        return fit

    def extraction(self, reuse: bool) -> Callable[[Callable], Callable]:
        def wrap(original: Callable) -> Callable:
            def extract(features: Callable, dataset: Any, *args: Any, **kwargs: Any) -> Any:
                key = (str(getattr(dataset, "split", "?")), len(dataset))
                if reuse and key in self.features:
                    self.extracts.append({"seconds": 0.0, "split": key[0], "reused": True})
                    return self.features[key]
                start = time.perf_counter()
                result = original(features, dataset, *args, **kwargs)
                self.extracts.append({"seconds": time.perf_counter() - start, "split": key[0], "reused": False})
                self.features[key] = result
                return result
            return extract
        return wrap

    def limited_loaders(self, train_batches: int, eval_batches: int) -> Callable[[Callable], Callable]:
        def wrap(original: Callable) -> Callable:
            def make(*args: Any, **kwargs: Any) -> TimedBatches:
                train = kwargs.get("train", False)
                loader = TimedBatches(original(*args, **kwargs), train_batches if train else eval_batches,
                                      self.device)
                (self.train_loaders if train else self.eval_loaders).append(loader)
                return loader
            return make
        return wrap


def write_synthetic_stl10(root: Path, train_items: int, test_items: int, seed: int) -> float:
    """A random STL-10 in the official layout under ``root``; returns the seconds it took."""
    start = time.perf_counter()
    write_stl10(root, n_train=train_items, n_test=test_items, n_unlabeled=1, seed=seed)
    return time.perf_counter() - start


def probe_config(args: argparse.Namespace, overrides: list[str], mode: str, data_root: Path, out: Path,
                 run_epochs: int | None = None) -> ProbeConfig:
    """The STL-10 probe config with the benchmark's settings, then the user's overrides (then ``run_epochs``)."""
    backbone = ["--probe.backbone", "checkpoint"] if args.student else ["--probe.backbone", "random",
                                                                         "--probe.model", args.model]
    base = ["--data.root", str(data_root), "--probe.mode", mode, *backbone, "--probe.out", str(out),
            "--train.epochs", str(args.epochs), "--train.threads", str(args.threads), "--train.device", args.device,
            "--train.seed", str(args.seed), "--log.tensorboard", "false", "--log.progress", "false",
            "--data.num_workers", "0"]
    last = [] if run_epochs is None else ["--train.epochs", str(run_epochs)]
    return load_config(CONFIG, ProbeConfig, base + overrides + last)


# ------------------------------------------------------------------------------------------------- cached


def bench_cached(args: argparse.Namespace, overrides: list[str], data_root: Path, work: Path,
                 features: dict[tuple[str, int], Any]) -> dict[str, Any]:
    """``run_probe`` in cached mode, with its feature extraction and its engine run timed."""
    cfg = probe_config(args, overrides, "cached", data_root, work / "probe_cached")
    instruments = Instruments(resolve_device(cfg.train.device), features)
    start = time.perf_counter()
    with patched(linear_probe.stage, "extract_features", instruments.extraction(reuse=False)), \
            patched(Engine, "fit", instruments.timed_fit):
        metrics = run_probe(cfg, args.student)
    total = time.perf_counter() - start
    if len(instruments.fits) != 1:
        raise RuntimeError(f"expected run_probe to call Engine.fit once, it called it {len(instruments.fits)} times")
    fit = instruments.fits[0]
    history = fit["result"].history
    extract_s = sum(call["seconds"] for call in instruments.extracts)
    return {
        "mode": "cached", "estimated": False, "epochs": len(history), "train_items": metrics["train_items"],
        "test_items": metrics["test_items"], "extract_s": extract_s, "extracts": instruments.extracts,
        "probe_s": fit["seconds"], "per_epoch_s": fit["seconds"] / len(history),
        "train_s": fit["result"].train_seconds, "rest_s": total - extract_s - fit["seconds"], "total_s": total,
        "final_acc": metrics["final_acc"], "knn_acc": metrics["knn_acc"],
        "train_images_per_s": [row.get("train/images_per_s") for row in history],
        "performance_options": performance_options(cfg.train), "probe_config": config_to_dict(cfg),
    }


# ------------------------------------------------------------------------------------------------ augment


def bench_augment(args: argparse.Namespace, overrides: list[str], data_root: Path, work: Path,
                  features: dict[tuple[str, int], Any]) -> dict[str, Any]:
    """``run_probe`` in augment mode for a few batches of one epoch, extrapolated to ``--epochs`` epochs."""
    cfg = probe_config(args, overrides, "augment", data_root, work / "probe_augment", run_epochs=1)
    instruments = Instruments(resolve_device(cfg.train.device), features)
    limits = instruments.limited_loaders(args.augment_warmup + args.augment_batches, args.eval_batches)
    with patched(linear_probe.stage, "extract_features", instruments.extraction(reuse=True)), \
            patched(linear_probe.stage, "make_loader", limits), patched(Engine, "fit", instruments.timed_fit):
        run_probe(cfg, args.student)
    (train,), test = instruments.train_loaders, instruments.eval_loaders[0]
    if len(train.step_s()) <= args.augment_warmup:
        raise SystemExit(f"augment: the train split has {len(train.source)} batches of {cfg.train.batch_size}, not "
                         f"more than --augment-warmup {args.augment_warmup}; use more --train-items")
    train_steps = train.step_s()[args.augment_warmup:]
    train_batch_s, test_batch_s = median(train_steps), median(test.step_s())
    train_batches, test_batches = len(train.source), len(test.source)
    per_epoch = train_batches * train_batch_s + test_batches * test_batch_s
    return {
        "mode": "augment", "estimated": True, "epochs": args.epochs, "train_items": len(train.source.dataset),
        "test_items": len(test.source.dataset), "extracts": instruments.extracts,
        "extract_s": sum(call["seconds"] for call in instruments.extracts), "train_batch_s": train_batch_s,
        "test_batch_s": test_batch_s, "train_batches_per_epoch": train_batches, "test_batches_per_epoch": test_batches,
        "timed_train_batches": train_steps, "timed_test_batches": test.step_s(),
        "train_load_s": train.fetch_s[args.augment_warmup:], "per_epoch_s": per_epoch,
        "probe_s": per_epoch * args.epochs, "performance_options": performance_options(cfg.train),
        "probe_config": config_to_dict(cfg),
    }


# --------------------------------------------------------------------------------------------------- main


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table_cells(row: dict[str, Any]) -> list[str]:
    mark = " (est.)" if row["estimated"] else ""
    reused = row["extracts"] and all(call["reused"] for call in row["extracts"])
    return [row["mode"] + mark, str(row["train_items"]), str(row["test_items"]), str(row["epochs"]),
            "reused" if reused else seconds(row["extract_s"]), seconds(row["probe_s"]), seconds(row["per_epoch_s"]),
            seconds(row.get("train_s")), seconds(row.get("rest_s")), seconds(row.get("total_s"))]


HEADERS = ["mode", "train", "test", "epochs", "extract s", "probe s", "per epoch s", "train s", "rest s", "total s"]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog="Other --section.key VALUE arguments override probe config keys.")
    parser.add_argument("--modes", type=csv_choices(MODES), default=list(MODES),
                        help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--train-items", type=positive_int, default=5000, help="labeled train images (STL-10: 5000)")
    parser.add_argument("--test-items", type=positive_int, default=8000, help="test images (STL-10: 8000)")
    parser.add_argument("--epochs", type=positive_int, default=100, help="probe epochs (augment: extrapolated)")
    parser.add_argument("--model", default="vgg8", help="randomly initialised network under probe")
    parser.add_argument("--student", help="probe this transfer checkpoint's network instead of a random --model")
    parser.add_argument("--augment-batches", type=positive_int, default=10, help="timed training batches (augment)")
    parser.add_argument("--augment-warmup", type=int, default=2, help="untimed training batches first (augment)")
    parser.add_argument("--eval-batches", type=positive_int, default=4, help="timed test batches (augment)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="probe config override, repeatable (same as --section.key VALUE)")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="result file (default benchmarks/results/probe-<host>-<device>.json)")
    args, passthrough = parser.parse_known_args(argv)
    try:
        overrides = config_overrides(passthrough, args.set)
        parse_overrides(overrides)
    except CKTFError as err:
        parser.error(str(err))
    if args.augment_warmup < 0:
        parser.error("--augment-warmup must be >= 0")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine, command = machine_info(args.threads, device), command_line()
    print(describe(machine, command), flush=True)
    if overrides:
        print(f"config overrides: {' '.join(overrides)}", flush=True)
    rows = []
    benches: dict[str, Callable[..., dict[str, Any]]] = {"cached": bench_cached, "augment": bench_augment}
    features: dict[tuple[str, int], Any] = {}  # extracted once per split, by the cached run
    with tempfile.TemporaryDirectory(prefix="cktf-probe-bench-") as tmp:
        work = Path(tmp)
        write_s = write_synthetic_stl10(work / "stl10", args.train_items, args.test_items, args.seed)
        print(f"synthetic STL-10 ({args.train_items} train, {args.test_items} test) written in {write_s:.1f} s",
              file=sys.stderr, flush=True)
        for mode in args.modes:
            rows.append(benches[mode](args, overrides, work / "stl10", work / mode, features))
            print(f"  {mode}: {rows[-1]['probe_s']:.1f} s for {rows[-1]['epochs']} epochs"
                  + (" (est.)" if rows[-1]["estimated"] else ""), file=sys.stderr, flush=True)
    print()
    print(format_table(HEADERS, [table_cells(r) for r in rows]))
    network = args.student or f"random {args.model}"
    print(f"\nnetwork: {network}; synthetic STL-10 (random 96x96 images) at the config's 64x64.")
    print("extract s: features of train + test by the frozen network; probe s: all epochs (train, test pass every "
          "epoch, checkpoint); train s: training steps only; rest s: setup, kNN probe, metrics.")
    if any(r["estimated"] for r in rows):
        augment = next(r for r in rows if r["estimated"])
        print(f"augment (est.): median {augment['train_batch_s'] * 1e3:.0f} ms per training batch (loading + "
              f"augmentation + forward + probe step) x {augment['train_batches_per_epoch']} + "
              f"{augment['test_batch_s'] * 1e3:.0f} ms per test batch x {augment['test_batches_per_epoch']} per epoch, "
              f"x {augment['epochs']} epochs; run_probe also extracts the features once (extract s of the cached "
              "mode).")
    out = write_json(args.json or default_json_path("probe", device), {
        "benchmark": "probe", "machine": machine, "command": command, "args": vars(args),
        "config_overrides": overrides, "network": network, "rows": rows, "wall_s": time.perf_counter() - started,
    })
    print(f"results: {out} (whole command: {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
