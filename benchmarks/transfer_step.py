"""Benchmark of one full transfer training step, measured inside ``cktf transfer``'s own code path.

What one *step* is: one iteration of the shared engine's training loop on the transfer task: batched
augmentation (``data.augment batched``), the frozen teacher's forward pass, the student's forward and
backward pass, every loss term of the method (projection heads, NCE scoring against the memory banks, KD),
the negative sampler's draw, the memory-bank update and the optimizer step. Each configuration calls the
real ``run_transfer`` (``transfer/stages/transfer.py``) on the method's YAML config, so models, feature taps,
layer mapping, loss terms, sampler, ``train.channels_last``/``train.compile``/``train.precision`` handling
and the engine are exactly what users run. Three things are swapped in, by wrapping names of the stage
module while it runs (``benchmarks.common.patched``):

* the datasets: ``build_dataset`` returns N_d unlabeled items cycling through 512 random uint8 images of
  the dataset's stored shape (STL-10 3x96x96, Fashion-MNIST 1x28x28), through the stage's own transforms:
  no data on disk, near-free loading, and N_d (which sizes the memory banks) as in the real pool;
* the loader: ``make_loader``'s DataLoader (loading in the main process, ``data.num_workers 0``) is cut to
  ``--warmup`` + ``--steps`` batches and timed per batch (``benchmarks.common.TimedBatches``);
* the teacher: the config's checkpoint when it exists, else a randomly initialised one written to a
  temporary file (weights do not change the time); debiased/hard samplers get a random valid neighbour
  table instead of embedding the pool (that one-off build is ``benchmarks/sampler.py``'s).

Settings (``--settings``), each with methods KD, CRD and CKTF by default (``--methods``: names of the setting's
config files, any method with a config works); a method whose terms declare ``negatives`` (CRD, CKTF) runs
with per-anchor negatives (``sampler.shared false``, the paper's form) and shared negatives (``sampler.shared
true``), see ``--negative-modes``:

* ``stl10_vgg``: ``configs/tinyimagenet_to_stl10/{kd,crd,cktf}_vgg19_vgg8.yaml``: VGG-19 teacher (200
  classes) to VGG-8 at 64x64, 3 channels, batch 64, K=16384, d=128, tau=0.07, N_d=100 000.
* ``fashion``: ``configs/fashion_split/{kd,crd,cktf}.yaml``: resnet14 teacher to resnet8 at 28x28, 1 channel,
  batch 128, K=4096, N_d=30 000; the teacher is ``runs/fashion_teacher/best.safetensors`` when it exists
  (``--teacher random`` forces a random one).

Every configuration runs in a fresh process: ``--warmup`` untimed steps (the first also estimates NCE's Z),
then ``--steps`` timed steps through ``Engine.fit``, then (unless ``--breakdown-steps 0``) steps split into
phases with a device sync between them, on the engine's own task, optimizer, scaler, autocast and batched
augmentation: augmentation, teacher forward, student forward, sampler draw, loss terms forward (including
the bank update), loss terms backward (into the heads and the student's tap outputs), student backward,
optimizer step. The phases' sum is shown next to the engine's step time.

Any config key can be overridden for every configuration as on the ``cktf`` command line (``--train.precision
bf16``, ``--train.channels_last false``, ``--data.augment per_image``) or as ``--set train.compile=true``; the
speed switches of ``train`` (``precision``, ``channels_last``, ``compile``: whichever the installed schema
has) are recorded in the JSON with the resolved ``train``, ``data``, ``loss`` and ``sampler`` sections.

Run (from the repository root)::

    .venv/bin/python benchmarks/transfer_step.py                        # both settings, all methods (CPU)
    .venv/bin/python benchmarks/transfer_step.py --settings fashion --train.precision bf16
    .venv/bin/python benchmarks/transfer_step.py --device cuda --steps 50 --warmup 10
    .venv/bin/python benchmarks/transfer_step.py --settings fashion --items 512 --batch 8 --negatives 64 \\
        --steps 2 --warmup 1 --breakdown-steps 1 --teacher random     # smoke size

Columns: ``step ms`` median wall time of a timed step (loading the batch + the engine's step, synchronised on
CUDA); ``load ms`` its loading part; ``img/s`` batch size / median step; ``vs KD`` extra time over KD's step
in the same setting, in % of KD's; breakdown columns are medians over the phased steps: ``aug`` batched
augmentation, ``teacher`` forward, ``student`` forward + backward, ``sampler`` draw, ``loss`` terms forward +
backward (heads, scoring, bank update), ``optim`` optimizer step, ``sum`` of all phases; ``peak MiB`` the
worker's peak resident memory (``VmHWM``: networks, banks, activations) at the end of the timed steps, on
CUDA the allocator's peak. Results go to ``--json`` (default
``benchmarks/results/transfer_step-<host>-<device>.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import transfer.stages.transfer as transfer_stage  # noqa: E402
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
    peak_rss_mib,
    performance_options,
    positive_int,
    spawn_worker,
    synchronize,
    write_json,
)
from transfer.config import TransferConfig, config_to_dict, load_config  # noqa: E402
from transfer.config.loader import parse_overrides  # noqa: E402
from transfer.engine.checkpoint import save_checkpoint  # noqa: E402
from transfer.engine.runtime import autocast, resolve_device  # noqa: E402
from transfer.engine.trainer import Engine  # noqa: E402
from transfer.errors import CKTFError  # noqa: E402
from transfer.losses.nce import NCEObjective  # noqa: E402
from transfer.losses.terms import TransferBatch, resolve_terms  # noqa: E402
from transfer.models import build_model  # noqa: E402
from transfer.models.taps import TapOutputs  # noqa: E402
from transfer.tasks.transfer import TransferTask  # noqa: E402

METHODS = ("kd", "crd", "cktf")  # default --methods: config file names ({method} in Setting.config)
NEGATIVE_MODES = ("per-anchor", "shared")
PHASES = ("augment", "teacher_fwd", "student_fwd", "sampler", "loss_fwd", "loss_bwd", "student_bwd", "optimizer")
DISTINCT_IMAGES = 512  # random images generated once and cycled over the N_d items
MIB = 2**20


@dataclass(frozen=True)
class Setting:
    """A teacher/student pair with its configs and the shape of its data."""

    config: str  # path relative to the repository root, with {method} in it
    teacher_model: str  # used when the config's teacher checkpoint is missing (or --teacher random)
    teacher_classes: int
    stored_shape: tuple[int, int, int]  # one image as the dataset stores it (before transforms)
    items: int  # N_d: unlabeled items, i.e. memory-bank rows
    warmup: int  # defaults sized for a 2-core CPU; --warmup/--steps/--breakdown-steps replace them
    steps: int
    breakdown_steps: int


SETTINGS = {
    "stl10_vgg": Setting("configs/tinyimagenet_to_stl10/{method}_vgg19_vgg8.yaml", "vgg19", 200, (3, 96, 96),
                         100_000, warmup=1, steps=3, breakdown_steps=2),
    "fashion": Setting("configs/fashion_split/{method}.yaml", "resnet14", 5, (1, 28, 28), 30_000, warmup=2, steps=8,
                       breakdown_steps=4),
}


# ----------------------------------------------------------------------------------------------- worker side


class SyntheticPool(Dataset):
    """``num_items`` unlabeled items ``(image, -1, index)`` cycling through a few random uint8 images.

    Stands in for the transfer pool: ``len`` (the memory banks' N_d), ``in_channels`` and the stage's
    ``transform`` are real; the pixels are random.
    """

    def __init__(self, num_items: int, stored_shape: tuple[int, int, int], transform: Callable | None,
                 seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (min(num_items, DISTINCT_IMAGES), *stored_shape), dtype=torch.uint8,
                                    generator=gen)
        self.num_items = num_items
        self.transform = transform
        self.in_channels = stored_shape[0]
        self.targets = torch.full((num_items,), -1, dtype=torch.long)
        self.classes: list[str] = []
        self.num_classes = 0

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image = self.images[index % len(self.images)]
        return (image if self.transform is None else self.transform(image)), -1, index


def write_random_teacher(path: Path, setting: Setting, seed: int) -> None:
    """A teacher checkpoint as ``cktf train-teacher`` writes it, with randomly initialised weights."""
    torch.manual_seed(seed)
    channels = setting.stored_shape[0]
    model = build_model(setting.teacher_model, in_channels=channels, num_classes=setting.teacher_classes)
    save_checkpoint(path, {"task": {f"model.{key}": value for key, value in model.state_dict().items()}},
                    {"kind": "teacher", "model": setting.teacher_model, "in_channels": str(channels),
                     "num_classes": str(setting.teacher_classes), "taps": "{}"})


def random_neighbour_table(num_items: int, width: int, seed: int) -> torch.Tensor:
    from benchmarks.sampler import random_table

    return random_table(num_items, width, seed)


def tap_tensors(out: TapOutputs) -> list[torch.Tensor]:
    return [out.stem, *out.stages, out.penultimate, out.logits]


def detached_taps(out: TapOutputs) -> TapOutputs:
    """The student's tap outputs as new leaves, so loss terms and student backward can be timed apart."""
    leaf = [t.detach().requires_grad_(True) for t in tap_tensors(out)]
    return TapOutputs(stem=leaf[0], stages=leaf[1:-2], penultimate=leaf[-2], logits=leaf[-1])


class PhaseClock:
    """Wall time of consecutive phases of one step, synchronising the device at each boundary."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        synchronize(device)
        self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] = now - self.last
        self.last = now


def phased_step(engine: Engine, augment: Callable | None, batch: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """One training step of the engine's task split into :data:`PHASES`, with the engine's step's gradients."""
    task: TransferTask = engine.task
    device = engine.device
    autocast_context = getattr(engine, "autocast", lambda: autocast(device, engine.cfg.precision))
    images, targets, indices = (t.to(device) for t in batch)
    clock = PhaseClock(device)
    if augment is not None:
        images = augment(images)
    clock.lap("augment")
    with autocast_context(), torch.no_grad():
        teacher_out = task.teacher(images)
    clock.lap("teacher_fwd")
    with autocast_context():
        student_out = task.student(images)
    clock.lap("student_fwd")
    negatives = task.sampler(indices) if task.sampler is not None else None
    clock.lap("sampler")
    leaves = detached_taps(student_out)
    with autocast_context():
        total, _ = task.objective(TransferBatch(leaves, teacher_out, indices, targets, negatives))
    clock.lap("loss_fwd")
    engine.scaler.scale(total).backward()
    clock.lap("loss_bwd")
    used = [(out, leaf.grad) for out, leaf in zip(tap_tensors(student_out), tap_tensors(leaves), strict=True)
            if leaf.grad is not None]
    torch.autograd.backward([out for out, _ in used], [grad for _, grad in used])
    clock.lap("student_bwd")
    engine.scaler.step(engine.optimizer)
    engine.scaler.update()
    engine.optimizer.zero_grad(set_to_none=True)
    clock.lap("optimizer")
    return clock.seconds


@contextmanager
def transfer_engine(spec: dict[str, Any]) -> Iterator[tuple[Engine, dict[str, Any], TransferConfig, str]]:
    """Run ``cktf transfer``'s own stage on ``spec``'s setting and method for ``warmup + steps`` batches of
    synthetic data and yield ``(engine, captured, cfg, teacher)`` while its temporary files still exist.

    ``captured`` holds the engine's timed loader (``loader``), batched augmentation (``augment``) and the peak
    memory read when the timed batches ran out; ``teacher`` says which teacher weights ran.
    """
    setting = Setting(**{**spec["setting"], "stored_shape": tuple(spec["setting"]["stored_shape"])})
    num_items, limit = spec["items"], spec["warmup"] + spec["steps"]
    with tempfile.TemporaryDirectory(prefix="cktf-transfer-step-") as tmp:
        overrides = [*spec["overrides"], "--log.root", tmp, "--log.name", "transfer_step", "--sampler.cache_dir",
                     str(Path(tmp) / "neighbours")]
        cfg = load_config(config_path(setting, spec["method"]), TransferConfig, overrides)
        checkpoint = cfg.teacher.checkpoint
        if spec["teacher"] == "config" and checkpoint is not None and Path(checkpoint).is_file():
            teacher = str(checkpoint)
        else:
            cfg.teacher.checkpoint = str(Path(tmp) / "random_teacher.safetensors")
            write_random_teacher(Path(cfg.teacher.checkpoint), setting, cfg.train.seed)
            teacher = f"random {setting.teacher_model} ({setting.teacher_classes} classes)"
        device = resolve_device(cfg.train.device)
        captured: dict[str, Any] = {}

        def read_peak() -> None:
            captured["peak_rss_mib"] = peak_rss_mib()
            if device.type == "cuda":
                captured["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / MIB

        def synthetic_dataset(original: Callable) -> Callable:
            return lambda name, split, root, transform, **options: SyntheticPool(
                num_items, setting.stored_shape, transform, cfg.train.seed)

        def timed_loader(original: Callable) -> Callable:
            def make(*args: Any, **kwargs: Any) -> TimedBatches:
                captured["loader"] = TimedBatches(original(*args, **kwargs), limit, device, on_exhausted=read_peak)
                return captured["loader"]
            return make

        def capture_engine(original: Callable) -> Callable:
            def fit(engine: Engine, *args: Any, **kwargs: Any) -> Any:
                captured.update(engine=engine, augment=kwargs.get("augment"))
                return original(engine, *args, **kwargs)
            return fit

        def random_table(original: Callable) -> Callable:
            return lambda cache_dir, key, compute_features, k, **options: random_neighbour_table(num_items, k,
                                                                                                cfg.train.seed)

        with patched(transfer_stage, "build_dataset", synthetic_dataset), \
                patched(transfer_stage, "make_loader", timed_loader), \
                patched(transfer_stage, "cached_neighbour_table", random_table), \
                patched(Engine, "fit", capture_engine):
            transfer_stage.run_transfer(cfg)
            yield captured["engine"], captured, cfg, teacher


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one method of one setting in this (fresh) process; the parent reads the dict as JSON."""
    with transfer_engine(spec) as (engine, captured, cfg, teacher):
        phases: dict[str, list[float]] = {phase: [] for phase in PHASES}
        if spec["breakdown_steps"]:
            engine.task.train()
            batches = iter(captured["loader"].source)
            for _ in range(spec["breakdown_steps"]):
                for phase, value in phased_step(engine, captured["augment"], next(batches)).items():
                    phases[phase].append(value)
    device = engine.device
    timed: TimedBatches = captured["loader"]
    task: TransferTask = engine.task
    config = config_to_dict(cfg)
    warmup = spec["warmup"]
    return {
        "times_s": timed.step_s()[warmup:],
        "load_s": timed.fetch_s[warmup:],
        "warmup_times_s": timed.step_s()[:warmup],
        "phases_s": phases if spec["breakdown_steps"] else None,
        "peak_rss_mib": captured.get("peak_rss_mib"),
        "cuda_peak_mib": captured.get("cuda_peak_mib"),
        "method": cfg.loss.method,
        "negatives": None if task.sampler is None else ("shared" if cfg.sampler.shared else "per-anchor"),
        "batch": cfg.train.batch_size,
        "num_negatives": cfg.sampler.num_negatives if task.sampler is not None else None,
        "items": spec["items"],
        "stored_shape": list(spec["setting"]["stored_shape"]),
        "batched_augment": captured["augment"] is not None,
        "objectives": sum(1 for m in task.modules() if isinstance(m, NCEObjective)),
        "terms": dict(task.weights),
        "student": cfg.student.name,
        "teacher": teacher,
        "device": str(device),
        "performance_options": performance_options(cfg.train),
        "train_config": config["train"],
        "data_config": config["data"],
        "loss_config": config["loss"],
        "sampler_config": config["sampler"],
    }


# ----------------------------------------------------------------------------------------------- parent side


def config_path(setting: Setting, method: str) -> Path:
    """The config file of ``method`` in ``setting`` (``--methods`` names config files)."""
    return ROOT / setting.config.format(method=method)


def draws_negatives(setting: Setting, method: str) -> bool:
    """Whether any term of ``method``'s config declares ``negatives`` (then both negative modes are measured)."""
    cfg = load_config(config_path(setting, method), TransferConfig)
    return any(spec.active and spec.needs.negatives for spec in resolve_terms(cfg.loss))


def variants(setting: Setting, methods: list[str], negative_modes: list[str]) -> list[tuple[str, str | None]]:
    """``(method, negatives)`` pairs in ``methods`` order; a method that draws negatives once per negative mode."""
    out: list[tuple[str, str | None]] = []
    for method in methods:
        if draws_negatives(setting, method):
            out += [(method, mode) for mode in negative_modes]
        else:
            out.append((method, None))
    return out


def make_row(setting: str, method: str, negatives: str | None, result: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"setting": setting, "variant": method if negatives is None else f"{method} {negatives}",
                           **result}
    if "times_s" in row:
        row["steps"] = len(row["times_s"])
        row["median_s"] = median(row["times_s"])
        row["images_per_s"] = row["batch"] / row["median_s"]
        if row.get("phases_s"):
            row["phase_median_s"] = {phase: median(values) for phase, values in row["phases_s"].items()}
    return row


def add_overheads(rows: list[dict[str, Any]]) -> None:
    """``overhead_vs_kd_pct`` = (step − KD's step) / KD's step · 100, within each setting."""
    kd = {r["setting"]: r["median_s"] for r in rows if r["variant"] == "kd" and "median_s" in r}
    for row in rows:
        if "median_s" in row and row["setting"] in kd:
            row["overhead_vs_kd_pct"] = 100 * (row["median_s"] - kd[row["setting"]]) / kd[row["setting"]]


def milliseconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def table_cells(row: dict[str, Any]) -> list[str]:
    head = [row["setting"], row["variant"]]
    if "median_s" not in row:
        return [*head, *["-"] * (len(HEADERS) - 2)]
    phases = row.get("phase_median_s") or {}
    student = phases["student_fwd"] + phases["student_bwd"] if phases else None
    loss = phases["loss_fwd"] + phases["loss_bwd"] if phases else None
    overhead = row.get("overhead_vs_kd_pct")
    peak = row.get("cuda_peak_mib") or row.get("peak_rss_mib")
    return [*head, str(row["batch"]), str(row["num_negatives"] or "-"), str(row["items"]), str(row["objectives"]),
            str(row["steps"]), milliseconds(row["median_s"]), milliseconds(median(row["load_s"])),
            f"{row['images_per_s']:.0f}", "-" if overhead is None or row["variant"] == "kd" else f"{overhead:+.0f}%",
            milliseconds(phases.get("augment")), milliseconds(phases.get("teacher_fwd")), milliseconds(student),
            milliseconds(phases.get("sampler")), milliseconds(loss), milliseconds(phases.get("optimizer")),
            milliseconds(sum(phases.values()) if phases else None), "-" if peak is None else f"{peak:.0f}"]


HEADERS = ["setting", "method", "B", "K", "N_d", "obj", "steps", "step ms", "load ms", "img/s", "vs KD", "aug",
           "teacher", "student", "sampler", "loss", "optim", "sum", "peak MiB"]


def config_names(text: str) -> list[str]:
    """argparse type: a non-empty comma-separated list of config names (checked against the settings later)."""
    names = [v for v in text.split(",") if v]
    if not names or any(not n.replace("_", "").isalnum() for n in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated config names, got {text!r}")
    return names


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog="Other --section.key VALUE arguments override config keys.")
    parser.add_argument("--settings", type=csv_choices(SETTINGS), default=list(SETTINGS),
                        help="comma-separated: " + ", ".join(SETTINGS))
    parser.add_argument("--methods", type=config_names, default=list(METHODS),
                        help="comma-separated config names of the settings (default: " + ", ".join(METHODS) + ")")
    parser.add_argument("--negative-modes", type=csv_choices(NEGATIVE_MODES), default=list(NEGATIVE_MODES),
                        help="negatives of CRD/CKTF, comma-separated: " + ", ".join(NEGATIVE_MODES))
    parser.add_argument("--steps", type=positive_int, help="timed steps (default: 3 stl10_vgg, 8 fashion)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 1 stl10_vgg, 2 fashion)")
    parser.add_argument("--breakdown-steps", type=int, help="phased steps for the breakdown, 0: none "
                        "(default: 2 stl10_vgg, 4 fashion)")
    parser.add_argument("--items", type=positive_int, help="N_d, memory-bank rows (default: the setting's)")
    parser.add_argument("--batch", type=positive_int, help="batch size (= --train.batch_size)")
    parser.add_argument("--negatives", type=positive_int, help="K (= --sampler.num_negatives)")
    parser.add_argument("--teacher", choices=("config", "random"), default="config",
                        help="config: the config's teacher checkpoint when it exists; random: a random teacher")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, repeatable (same as --section.key VALUE)")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path,
                        help="result file (default benchmarks/results/transfer_step-<host>-<device>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args, passthrough = parser.parse_known_args(argv)
    if args.worker:
        return args, passthrough
    try:
        overrides = config_overrides(passthrough, args.set)
        parse_overrides(overrides)
    except CKTFError as err:
        parser.error(str(err))
    missing = [str(config_path(SETTINGS[name], method)) for name in args.settings for method in args.methods
               if not config_path(SETTINGS[name], method).is_file()]
    if missing:
        parser.error(f"no config for --methods: {', '.join(missing)}")
    if args.warmup is not None and args.warmup < 0 or args.breakdown_steps is not None and args.breakdown_steps < 0:
        parser.error("--warmup and --breakdown-steps must be >= 0")
    return args, overrides


def worker_spec(args: argparse.Namespace, user_overrides: list[str], name: str, method: str,
                negatives: str | None) -> dict[str, Any]:
    setting = SETTINGS[name]
    overrides = ["--train.threads", str(args.threads), "--train.device", args.device, "--train.epochs", "1",
                 "--log.tensorboard", "false", "--log.progress", "false", "--data.num_workers", "0"]
    if negatives is not None:
        overrides += ["--sampler.shared", "true" if negatives == "shared" else "false"]
    if args.batch:
        overrides += ["--train.batch_size", str(args.batch)]
    if args.negatives:
        overrides += ["--sampler.num_negatives", str(args.negatives)]
    steps = args.steps or setting.steps
    return {"setting": asdict(setting), "method": method, "overrides": overrides + user_overrides,
            "items": args.items or setting.items, "teacher": args.teacher, "steps": steps,
            "warmup": setting.warmup if args.warmup is None else args.warmup,
            "breakdown_steps": setting.breakdown_steps if args.breakdown_steps is None else args.breakdown_steps}


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine, command = machine_info(args.threads, device), command_line()
    print(describe(machine, command), flush=True)
    if overrides:
        print(f"config overrides: {' '.join(overrides)}", flush=True)
    rows = []
    for name in args.settings:
        for method, negatives in variants(SETTINGS[name], args.methods, args.negative_modes):
            spec = worker_spec(args, overrides, name, method, negatives)
            rows.append(make_row(name, method, negatives, spawn_worker(Path(__file__).resolve(), spec, cwd=ROOT)))
            row = rows[-1]
            status = row.get("error") or f"{row['median_s'] * 1e3:.1f} ms/step, {row['images_per_s']:.0f} img/s"
            print(f"  {name}/{row['variant']}: {status}", file=sys.stderr, flush=True)
    add_overheads(rows)

    print()
    print(format_table(HEADERS, [table_cells(r) for r in rows]))
    for row in rows:
        if "error" in row:
            print(f"{row['setting']}/{row['variant']}: {row['error']}")
    measured = [r for r in rows if "median_s" in r]
    if measured:
        options = measured[0]["performance_options"]
        print("\ntrain options: " + ", ".join(f"{k}={v}" for k, v in options.items())
              + f"; teachers: {'; '.join(sorted({r['setting'] + ': ' + r['teacher'] for r in measured}))}")
    print("step ms: median of loading a batch (load ms; in-memory random images) + one engine step (augmentation, "
          "teacher fwd, student fwd+bwd, sampler, loss terms, bank update, optimizer); vs KD: (step - KD) / KD.")
    print("aug/teacher/student/sampler/loss/optim: medians of phased steps (device-synchronised; student = fwd + bwd, "
          "loss = terms fwd + bwd incl. bank update); peak MiB: process peak RSS (CUDA: allocated).")
    out = write_json(args.json or default_json_path("transfer_step", device), {
        "benchmark": "transfer_step", "machine": machine, "command": command, "args": vars(args),
        "config_overrides": overrides, "rows": rows, "wall_s": time.perf_counter() - started,
    })
    print(f"results: {out} (whole command: {time.perf_counter() - started:.0f} s)")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
