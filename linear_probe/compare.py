"""``cktf compare RUN... --out DIR``: one table and one convergence plot for several probed runs.

Why: the paper's claims are comparisons - CKTF's frozen features against KD's and CRD's, over several
seeds - both in final linear-probe accuracy and in how fast the probe converges (Fig. 2). Each run's
probe stage leaves ``probe/metrics.json`` and TensorBoard scalars (``probe/test_acc`` per epoch); this
module reads them, groups runs by method, and writes ``convergence.png`` (mean test accuracy per epoch
with a ±std band), ``comparison.md`` (the table) and ``comparison.csv`` (the same numbers, plain).

Example::

    compare(["runs/fashion_kd", "runs/fashion_crd", "runs/fashion_cktf/probe"], "reports/fashion")
    # {"png": Path("reports/fashion/convergence.png"), "md": ..., "csv": ...}
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfer.engine.atomic import atomic_path
from transfer.errors import CKTFError

PNG_NAME, MD_NAME, CSV_NAME = "convergence.png", "comparison.md", "comparison.csv"
TEST_ACC_TAG = "probe/test_acc"
TRANSFER_ACC_TAG = "test/acc"  # a transfer on a labeled split (γ > 0), evaluated on its test split every epoch
CONVERGED_FRACTION = 0.95
_MISSING = "—"
# (key in metrics.json / summary rows, Markdown header with {what} = probe or test); fractions shown as percentages
_FRACTION_COLUMNS = (
    ("final_acc", "final {what} acc (%)"),
    ("test_acc_at_best", "best-epoch {what} acc (%)"),
    ("knn_acc", "kNN acc (%)"),
)


def _all_probes(runs: list[ProbeRun]) -> bool:
    """Whether every run is a linear probe (else some are labeled transfers, tested with their own classifier)."""
    return all(run.metrics.get("kind") != "transfer" for run in runs)


@dataclass
class ProbeRun:
    """One probed run: where its probe results live, its method and seed, per-epoch test accuracy."""

    path: Path  # the probe directory (``runs/<name>/probe`` or the directory given)
    method: str
    seed: int | None
    curve: list[float]  # probe test accuracy in [0, 1]; curve[e - 1] is epoch e
    metrics: dict[str, Any]
    # the resolved configs that made these numbers, flattened: "probe:train.epochs" (the probe's own) and
    # "network:train.epochs" (the transfer/teacher run whose checkpoint was probed), where saved
    config: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- loading


def load_probe_run(path: str | Path) -> ProbeRun:
    """Read a run's probe results; ``path`` is a transfer run directory or its ``probe/`` directory.

    Raises :class:`CKTFError` (one line naming the path) when there are no probe results, the
    metrics are malformed, or no ``probe/test_acc`` events were written.

    Example::

        run = load_probe_run("runs/fashion_cktf")   # reads runs/fashion_cktf/probe/
        run.method, run.seed, len(run.curve)        # ("cktf", 0, 100)
    """
    probe_dir = _probe_dir(Path(path))
    metrics_file = probe_dir / "metrics.json"
    metrics = _read_metrics(metrics_file)
    tag = TRANSFER_ACC_TAG if metrics.get("kind") == "transfer" else TEST_ACC_TAG
    return ProbeRun(path=probe_dir, method=metrics["method"], seed=metrics.get("seed"),
                    curve=_read_curve(probe_dir, tag), metrics=metrics, config=_saved_configs(probe_dir, metrics))


def _saved_configs(probe_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    from transfer.config import read_yaml_mapping
    from transfer.stages.common import flatten_config

    stage = "probe" if metrics.get("kind") == "probe" else "network"
    found = {stage: probe_dir / "config.yaml"}
    if stage == "probe":
        probed = str(metrics.get("run", ""))  # the probed checkpoint, in the run directory that trained it
        beside = Path(probed).parent / "config.yaml"
        found["network"] = beside if probed.endswith(".safetensors") and beside.is_file() else \
            probe_dir.parent / "config.yaml"
    flat: dict[str, Any] = {}
    for name, file in found.items():
        if file.is_file():
            config = flatten_config(read_yaml_mapping(file, "the config of a compared run"))
            flat.update({f"{name}:{key}": value for key, value in config.items()})
    return flat


# Keys that cannot change a run's numbers, or that necessarily differ between seeds of one setting
_NOT_A_SETTING = {"train.seed", "log.name", "probe.out", "probe.label"}


def check_groups(runs: list[ProbeRun]) -> None:
    """Refuse to average runs of different settings as seeds of one method, and the same seed twice.

    Runs labelled alike must agree on every key of their saved configs (the probe's and the probed network's)
    except the seed and the keys that cannot change a result; a difference is one line listing the keys.
    """
    from transfer.stages.common import IMPLIED_BY_OLDER_RUNS, RESUME_MAY_CHANGE

    ignored = _NOT_A_SETTING | set(RESUME_MAY_CHANGE)

    def value(config: dict[str, Any], key: str) -> Any:
        """A key a run written before it existed lacks has the value its absence implies (as for --resume)."""
        return config.get(key, IMPLIED_BY_OLDER_RUNS.get(key.split(":", 1)[-1], _MISSING))

    first: dict[str, ProbeRun] = {}
    seeds: dict[tuple[str, Any, Any], ProbeRun] = {}
    for run in runs:
        ref = first.setdefault(run.method, run)
        keys = sorted(set(ref.config) | set(run.config))
        differ = [key for key in keys if key.split(":", 1)[-1] not in ignored
                  and value(ref.config, key) != value(run.config, key)]
        if differ:
            shown = ", ".join(f"{key} ({value(ref.config, key)!r} vs {value(run.config, key)!r})"
                              for key in differ[:6]) + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
            raise CKTFError(f"{ref.path} and {run.path} are both '{run.method}' but were made with other "
                            f"settings: {shown}; compare runs of one setting as seeds, or label them apart with "
                            f"--label {run.path}=NAME")
        seed = (run.method, run.seed, run.config.get("network:train.seed"))
        if seed in seeds:
            raise CKTFError(f"{seeds[seed].path} and {run.path} are both '{run.method}' with the same seed "
                            f"{run.seed}: the same run twice? give each seed once, or label one apart with "
                            f"--label {run.path}=NAME")
        seeds[seed] = run


def _probe_dir(path: Path) -> Path:
    if not path.exists():
        raise CKTFError(f"{path} does not exist; expected a run directory (runs/<name>) or its probe/ directory")
    if not path.is_dir():
        raise CKTFError(f"{path} is a file; expected a run directory (runs/<name>) or its probe/ directory")
    if not any(path.iterdir()):
        raise CKTFError(f"{path} is empty; expected a run directory (runs/<name>) or its probe/ directory")
    if (path / "probe").is_dir():
        path = path / "probe"
    elif not (path.name == "probe" or _has_curve(path / "metrics.json")):
        path = path / "probe"  # a transfer run that was never probed
    if not (path / "metrics.json").is_file():
        run = path.parent
        raise CKTFError(f"{run} has no probe results (probe/metrics.json); "
                        f"run `cktf probe --config PROBE_CONFIG --student {run / 'last.safetensors'}` first (the probe "
                        "config of its data, e.g. configs/fashion_split/probe.yaml)")
    return path


def _has_curve(metrics_file: Path) -> bool:
    """A probe's metrics, a transfer evaluated on a labeled test split every epoch (compression with labels),
    or unreadable metrics (so that the user learns what is wrong with them)."""
    if not metrics_file.is_file():
        return False
    try:
        metrics = json.loads(metrics_file.read_text())
    except (OSError, ValueError):
        return True
    if not isinstance(metrics, dict):
        return True
    return metrics.get("kind") == "probe" or (metrics.get("kind") == "transfer" and "final_acc" in metrics)


def _read_metrics(file: Path) -> dict[str, Any]:
    try:
        metrics = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CKTFError(f"{file}: cannot read probe metrics ({type(err).__name__}: {err})".splitlines()[0]) from None
    if not isinstance(metrics, dict):
        raise CKTFError(f"{file}: expected a JSON object of probe metrics, got {type(metrics).__name__}")
    if not isinstance(metrics.get("method"), str) or not metrics["method"]:
        raise CKTFError(f"{file}: expected \"method\" to be a non-empty string, got {metrics.get('method')!r}")
    seed = metrics.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise CKTFError(f"{file}: expected \"seed\" to be an integer or null, got {seed!r}")
    for key, _ in _FRACTION_COLUMNS:
        value = metrics.get(key)
        if value is None and key != "final_acc":
            continue
        if not _is_number(value) or not 0 <= value <= 1:
            kind = "a number" if key == "final_acc" else "a number or null"
            raise CKTFError(f"{file}: expected \"{key}\" to be {kind} in [0, 1] (a fraction), got {value!r}")
    seconds = metrics.get("transfer_seconds")
    if seconds is not None and (not _is_number(seconds) or seconds < 0):
        raise CKTFError(f"{file}: expected \"transfer_seconds\" to be a number >= 0 or null, got {seconds!r}")
    return metrics


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _read_curve(probe_dir: Path, tag: str = "probe/test_acc") -> list[float]:
    """Per-epoch ``tag`` (``probe/test_acc``, or a labeled transfer's ``test/acc``); of a step written twice (a
    resumed run) the later write wins."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    # Our own purge below works on wall time, so it does not depend on the order the files are read in.
    acc = ea.EventAccumulator(str(probe_dir), size_guidance={ea.SCALARS: 0}, purge_orphaned_data=False)
    try:
        acc.Reload()
        events = acc.Scalars(tag) if tag in acc.Tags()["scalars"] else []
    except Exception as err:  # a corrupt event file is the user's to fix: one line, no traceback
        raise CKTFError(f"{probe_dir}: cannot read TensorBoard events ({type(err).__name__})") from None
    if not events:
        raise CKTFError(f"{probe_dir} has no {tag} events (events.out.tfevents.*); "
                        "the probe wrote no epoch, rerun `cktf probe`")
    by_step: dict[int, float] = {}
    for event in sorted(events, key=lambda e: e.wall_time):  # stable: file order breaks ties
        # a resumed probe restarts at an earlier step: what the first attempt wrote from there on is stale
        for stale in [s for s in by_step if s >= event.step]:
            del by_step[stale]
        by_step[event.step] = float(event.value)
    steps = sorted(by_step)
    if steps[0] < 1:
        raise CKTFError(f"{probe_dir}: {tag} steps must be 1-based epochs, got step {steps[0]}")
    if steps != list(range(1, len(steps) + 1)):
        missing = sorted(set(range(1, steps[-1] + 1)) - set(steps))
        raise CKTFError(f"{probe_dir}: {tag} must have one point per epoch, "
                        f"epochs {', '.join(map(str, missing[:5]))}{', ...' if len(missing) > 5 else ''} are missing")
    curve = [by_step[s] for s in steps]
    if not all(0 <= v <= 1 for v in curve):
        raise CKTFError(f"{probe_dir}: {tag} values must be fractions in [0, 1], got up to {max(curve)}")
    return curve


# ---------------------------------------------------------------- numbers


def epochs_to_fraction(curve: list[float], fraction: float = CONVERGED_FRACTION) -> int | None:
    """First 1-based epoch whose accuracy reaches ``fraction`` of the final (last) accuracy.

    A convergence-speed number that does not depend on the probe's epoch budget: a method whose probe
    reaches 95 % of its final accuracy in 3 epochs has features that are linearly separable "as is".
    ``None`` for an empty curve or a final accuracy of 0 (no meaningful target).

    Example::

        epochs_to_fraction([0.2, 0.5, 0.78, 0.8, 0.8])   # 3  (0.78 >= 0.95 * 0.8)
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not curve or curve[-1] <= 0:
        return None
    target = fraction * curve[-1] - 1e-12  # 0.95 * 0.101 is 0.09595000000000001 > 0.09595
    return next(epoch for epoch, acc in enumerate(curve, start=1) if acc >= target)


def summarise(runs: list[ProbeRun]) -> list[dict[str, Any]]:
    """One row per method, in first-seen order, with mean/std over the method's seeds.

    Each numeric entry is ``{"mean", "std", "n"}`` (``std`` is the sample std, None when n = 1) or
    None when no run of the method has the value; fractions stay in [0, 1]. ``curve_mean``/``curve_std``
    average the per-epoch curves over their common prefix (``truncated`` says whether lengths differed).

    Example::

        rows = summarise([load_probe_run(p) for p in ("runs/kd_s0", "runs/kd_s1", "runs/cktf_s0")])
        rows[0]["method"], rows[0]["n"], rows[0]["final_acc"]["mean"]   # ("kd", 2, 0.8123)
    """
    groups: dict[str, list[ProbeRun]] = {}
    for run in runs:
        groups.setdefault(run.method, []).append(run)
    rows = []
    for method, group in groups.items():
        length = min(len(r.curve) for r in group)
        columns = list(zip(*(r.curve[:length] for r in group), strict=True))
        rows.append({
            "method": method,
            "n": len(group),
            "seeds": [r.seed for r in group],
            "paths": [r.path for r in group],
            **{key: _stat([r.metrics.get(key) for r in group]) for key, _ in _FRACTION_COLUMNS},
            "epochs_to_95": _stat([epochs_to_fraction(r.curve) for r in group]),
            "transfer_seconds": _stat([r.metrics.get("transfer_seconds") for r in group]),
            "curve_mean": [statistics.fmean(c) for c in columns],
            "curve_std": [statistics.stdev(c) for c in columns] if len(group) > 1 else None,
            "curve_lengths": [len(r.curve) for r in group],
            "truncated": len({len(r.curve) for r in group}) > 1,
        })
    return rows


def _stat(values: list[float | None]) -> dict[str, Any] | None:
    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    return {"mean": statistics.fmean(present), "std": statistics.stdev(present) if len(present) > 1 else None,
            "n": len(present)}


# ---------------------------------------------------------------- report


def write_report(runs: list[ProbeRun], out: str | Path, title: str | None = None) -> dict[str, Path]:
    """Write ``convergence.png``, ``comparison.md`` and ``comparison.csv`` for ``runs`` into ``out``.

    Everything is rendered in memory first, so a failure leaves ``out`` untouched.

    Example::

        write_report(runs, "reports/fashion", title="Fashion split, resnet14 student")
    """
    if not runs:
        raise CKTFError("cktf compare: no run given; pass one or more run directories (runs/<name>)")
    out = Path(out)
    _check_out(out)
    probes = _all_probes(runs)
    title = title or ("Linear-probe comparison" if probes else "Test accuracy of the students")
    rows = summarise(runs)
    contents = {"png": _plot(rows, title, probes), "md": _markdown(rows, runs, title, probes).encode(),
                "csv": _csv(rows).encode()}
    paths = {"png": out / PNG_NAME, "md": out / MD_NAME, "csv": out / CSV_NAME}
    try:
        out.mkdir(parents=True, exist_ok=True)
        for key, data in contents.items():
            with atomic_path(paths[key]) as tmp:
                tmp.write_bytes(data)
    except OSError as err:
        raise CKTFError(f"--out {out}: cannot write the report there ({err.strerror or err})") from None
    return paths


def compare(paths: list[str | Path], out: str | Path, title: str | None = None,
            labels: dict[str, str] | None = None) -> dict[str, Path]:
    """Load every run in ``paths`` (all validated before anything is written) and write the report.

    Runs are grouped by method (``labels`` maps a path, as given, to another name); runs of one group are
    seeds of one setting (:func:`check_groups`).

    Example::

        compare(["runs/kd_s0", "runs/kd_s1", "runs/cktf_s0", "runs/cktf_s1"], "reports/fashion")
    """
    if not paths:
        raise CKTFError("cktf compare: no run given; pass one or more run directories (runs/<name>)")
    _check_out(Path(out))
    labels = {Path(path).resolve(): name for path, name in (labels or {}).items()}
    runs: list[ProbeRun] = []
    seen: dict[Path, str | Path] = {}
    for path in paths:
        run = load_probe_run(path)
        key = run.path.resolve()
        if key in seen:
            raise CKTFError(f"{path}: the same probe results as {seen[key]} were given twice")
        seen[key] = path
        for where in (Path(path).resolve(), key):
            if where in labels:
                run.method = labels.pop(where)
        runs.append(run)
    if labels:
        raise CKTFError(f"--label {next(iter(labels))}=…: that directory is not among the compared runs "
                        f"({', '.join(str(p) for p in paths)})")
    check_groups(runs)
    return write_report(runs, out, title)


def _check_out(out: Path) -> None:
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise CKTFError(f"--out {out}: {parent} is a file; expected a directory for the comparison report")


def _pct(stat: dict[str, Any] | None, scale: float = 100.0, digits: int = 2) -> str:
    if stat is None:
        return _MISSING
    text = f"{stat['mean'] * scale:.{digits}f}"
    return text if stat["std"] is None else f"{text} ± {stat['std'] * scale:.{digits}f}"


def _epochs(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return _MISSING
    if stat["std"] is None:
        return f"{stat['mean']:g}"
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def _duration(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return _MISSING
    mean = stat["mean"]
    scale, unit = (1, "s") if mean < 600 else (60, "min") if mean < 7200 else (3600, "h")
    return f"{_pct(stat, 1 / scale, 1)} {unit}"


def _with_count(text: str, stat: dict[str, Any] | None, n: int) -> str:
    return text if stat is None or stat["n"] == n else f"{text} ({stat['n']} of {n} runs)"


def _markdown(rows: list[dict[str, Any]], runs: list[ProbeRun], title: str, probes: bool = True) -> str:
    what = "probe" if probes else "test"
    header = ["method", "seeds (n)", *(name.format(what=what) for _, name in _FRACTION_COLUMNS),
              f"epochs to {CONVERGED_FRACTION:.0%} of final", "transfer wall time"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for row in rows:
        n = row["n"]
        seeds = ", ".join(_MISSING if s is None else str(s) for s in row["seeds"])
        cells = [row["method"].replace("|", "\\|"), f"{seeds} ({n})",
                 *(_with_count(_pct(row[key]), row[key], n) for key, _ in _FRACTION_COLUMNS),
                 _with_count(_epochs(row["epochs_to_95"]), row["epochs_to_95"], n),
                 _with_count(_duration(row["transfer_seconds"]), row["transfer_seconds"], n)]
        lines.append("| " + " | ".join(cells) + " |")
        if row["truncated"]:
            notes.append(f"- {row['method']}: probe curves have different lengths "
                         f"({', '.join(map(str, row['curve_lengths']))} epochs); the convergence plot averages "
                         f"the first {len(row['curve_mean'])} epochs.")
        repeated = sorted({s for s in row["seeds"] if s is not None and row["seeds"].count(s) > 1})
        if repeated:
            notes.append(f"- {row['method']}: seed {', '.join(map(str, repeated))} appears more than once.")
    lines += ["", "Mean ± sample std over seeds; best-epoch acc is the test accuracy at the epoch with the best "
              f"validation accuracy; {_MISSING} means not measured.", ""]
    if notes:
        lines += ["Notes:", "", *notes, ""]
    lines += ["Runs:", ""]
    for run in runs:
        seed = "" if run.seed is None else f", seed {run.seed}"
        lines.append(f"- {run.method}{seed}: `{run.path}` ({len(run.curve)} {'probe epochs' if probes else 'epochs'})")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]]) -> str:
    fields = ["method", "n_seeds", "seeds"]
    for key, _ in _FRACTION_COLUMNS:
        fields += [f"{key}_mean_pct", f"{key}_std_pct"]
    fields += ["epochs_to_95_mean", "epochs_to_95_std", "transfer_seconds_mean", "transfer_seconds_std"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fields)
    for row in rows:
        values: list[Any] = [row["method"], row["n"], ";".join("" if s is None else str(s) for s in row["seeds"])]
        for key, _ in _FRACTION_COLUMNS:
            values += _mean_std(row[key], 100.0)
        values += _mean_std(row["epochs_to_95"], 1.0) + _mean_std(row["transfer_seconds"], 1.0)
        writer.writerow(values)
    return buffer.getvalue()


def _mean_std(stat: dict[str, Any] | None, scale: float) -> list[Any]:
    if stat is None:
        return ["", ""]
    return [round(stat["mean"] * scale, 4), "" if stat["std"] is None else round(stat["std"] * scale, 4)]


def _plot(rows: list[dict[str, Any]], title: str, probes: bool = True) -> bytes:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise CKTFError("cktf compare needs matplotlib to draw convergence.png; "
                        "install it with `pip install 'matplotlib>=3.7'`") from None
    # A bare Figure on an Agg canvas: no pyplot, so no global backend or figure state is touched.
    many = len(rows) > 8  # the legend goes beside the axes instead of over the curves
    fig = Figure(figsize=(9.5 if many else 7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        mean = [100 * v for v in row["curve_mean"]]
        epochs = list(range(1, len(mean) + 1))
        style = ("-", "--", ":", "-.")[i // 10 % 4]  # the colour cycle repeats after 10 lines
        (line,) = ax.plot(epochs, mean, style, marker="o" if len(mean) <= 20 else None, markersize=3,
                          label=f"{row['method']} (n={row['n']})")
        if row["curve_std"] is not None:
            std = [100 * v for v in row["curve_std"]]
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("probe epoch" if probes else "epoch")
    ax.set_ylabel("probe test accuracy (%)" if probes else "test accuracy (%)")
    ax.set_title(textwrap.fill(title, 70), fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if many:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", ncol=1 + len(rows) // 19)
    else:
        ax.legend(loc="best")
        fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150, bbox_inches="tight" if many else None)
    return buffer.getvalue()
