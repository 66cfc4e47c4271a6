"""cktf compare: reads real TensorBoard probe events, groups seeds by method, writes PNG/Markdown/CSV."""

from __future__ import annotations

import csv
import json
import os
import struct
from pathlib import Path

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from linear_probe.compare import compare, epochs_to_fraction, load_probe_run, summarise
from transfer.errors import CKTFError

# method -> per-seed curves; final_acc is the last point, epochs to 95 % of final noted per seed
CURVES = {
    "kd": [[0.50, 0.60, 0.70, 0.75, 0.80],    # 0.95·0.80 = 0.760 -> epoch 5
           [0.50, 0.65, 0.77, 0.79, 0.80]],   # -> epoch 3
    "crd": [[0.60, 0.70, 0.80, 0.82, 0.84],   # 0.798 -> epoch 3
            [0.60, 0.75, 0.80, 0.83, 0.86]],  # 0.817 -> epoch 4
    "cktf": [[0.80, 0.84, 0.86, 0.87, 0.88],  # 0.836 -> epoch 2
             [0.82, 0.85, 0.87, 0.88, 0.90]],  # 0.855 -> epoch 3
}


def _write_events(log_dir: Path, points: dict[int, float], *, knn: float | None = None) -> None:
    with SummaryWriter(str(log_dir)) as writer:
        for step, value in points.items():
            writer.add_scalar("probe/train_loss", 1.0 / step, step)
            writer.add_scalar("probe/test_acc", value, step)
        if knn is not None:
            writer.add_scalar("probe/knn_acc", knn, max(points))


def _probe(probe_dir: Path, method: str, seed: int | None, curve: list[float], *, events: bool = True,
           **metrics) -> Path:
    probe_dir.mkdir(parents=True)
    if events:
        _write_events(probe_dir, dict(enumerate(curve, start=1)), knn=metrics.get("knn_acc"))
    record = {"kind": "probe", "method": method, "seed": seed, "mode": "cached", "epochs": len(curve),
              "final_acc": curve[-1] if curve else 0.5, "best_epoch": None, "best_val_acc": None,
              "test_acc_at_best": None, "knn_acc": None, "transfer_seconds": None, "probe_seconds": 1.0,
              "run": str(probe_dir.parent)} | metrics
    (probe_dir / "metrics.json").write_text(json.dumps(record))
    return probe_dir


def _transfer_run(run_dir: Path, method: str, seed: int, curve: list[float], **metrics) -> Path:
    """A transfer run directory as the transfer stage leaves it, with the probe's results in probe/."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("method: x\n")
    (run_dir / "metrics.json").write_text(json.dumps({"kind": "transfer", "method": method}))
    _write_events(run_dir, {1: 0.1})  # the transfer stage's own events must not be mistaken for the probe's
    _probe(run_dir / "probe", method, seed, curve, **metrics)
    return run_dir


def _standard_runs(root: Path) -> list[Path]:
    """kd, crd, cktf with seeds 0 and 1: seed 0 as transfer run directories, seed 1 as probe directories."""
    paths = []
    for seed in (0, 1):
        for i, (method, curves) in enumerate(CURVES.items()):
            metrics = {"knn_acc": curves[seed][-1] - 0.05, "transfer_seconds": 100.0 + 10 * i + seed,
                       "test_acc_at_best": curves[seed][-2], "best_epoch": 4, "best_val_acc": 0.9}
            run = _transfer_run(root / f"{method}_s{seed}", method, seed, curves[seed], **metrics)
            paths.append(run if seed == 0 else run / "probe")
    return paths


def _table(md: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split(" | ") for line in md.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    paths = _standard_runs(root)
    out = root / "report" / "fashion"
    return paths, compare(paths, out, title="Fashion split"), out


def test_report_files(report):
    _, files, out = report
    assert files == {"png": out / "convergence.png", "md": out / "comparison.md", "csv": out / "comparison.csv"}
    png = files["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert struct.unpack(">II", png[16:24]) == (1050, 675)  # 7 x 4.5 inches at 150 dpi


def test_many_methods_get_their_legend_beside_the_plot(tmp_path):
    paths = [_probe(tmp_path / f"m{i}", f"method_{i}", 0, [0.5, 0.6 + i / 100]) for i in range(9)]
    png = compare(paths, tmp_path / "out")["png"].read_bytes()
    width, height = struct.unpack(">II", png[16:24])
    assert width > 1050 and height >= 600  # the axes keep their size, the legend adds to the width


def test_markdown_table_means_and_stds(report):
    paths, files, _ = report
    md = files["md"].read_text()
    assert md.startswith("# Fashion split\n")
    table = _table(md)
    assert list(table) == ["kd", "crd", "cktf"]  # grouped by method, in argument order
    # seeds, final, best-epoch, kNN, epochs to 95 %, transfer time
    assert table["kd"] == ["0, 1 (2)", "80.00 ± 0.00", "77.00 ± 2.83", "75.00 ± 0.00", "4.0 ± 1.4", "100.5 ± 0.7 s"]
    assert table["crd"][1] == "85.00 ± 1.41" and table["crd"][4] == "3.5 ± 0.7"
    assert table["cktf"][1] == "89.00 ± 1.41" and table["cktf"][4] == "2.5 ± 0.7"
    for path in paths:  # one line per run, naming its probe directory
        probe = path if path.name == "probe" else path / "probe"
        assert sum(f"`{probe}`" in line for line in md.splitlines()) == 1
    assert "Notes:" not in md


def test_csv_numbers(report):
    _, files, _ = report
    rows = {r["method"]: r for r in csv.DictReader(files["csv"].read_text().splitlines())}
    assert list(rows) == ["kd", "crd", "cktf"]
    crd = rows["crd"]
    assert crd["n_seeds"] == "2" and crd["seeds"] == "0;1"
    assert float(crd["final_acc_mean_pct"]) == pytest.approx(85.0)
    assert float(crd["final_acc_std_pct"]) == pytest.approx(1.4142, abs=1e-4)
    assert float(crd["knn_acc_mean_pct"]) == pytest.approx(80.0)
    assert float(crd["epochs_to_95_mean"]) == 3.5 and float(crd["epochs_to_95_std"]) == pytest.approx(0.7071)
    assert float(crd["transfer_seconds_mean"]) == 110.5


def test_summarise_groups_in_first_seen_order(tmp_path):
    runs = [load_probe_run(_probe(tmp_path / name, method, seed, CURVES[method][seed]))
            for name, method, seed in (("a", "cktf", 0), ("b", "kd", 0), ("c", "cktf", 1))]
    rows = summarise(runs)
    assert [(r["method"], r["n"], r["seeds"]) for r in rows] == [("cktf", 2, [0, 1]), ("kd", 1, [0])]
    assert rows[0]["curve_mean"] == pytest.approx([0.81, 0.845, 0.865, 0.875, 0.89], abs=1e-6)
    assert rows[0]["curve_std"][0] == pytest.approx(0.01414, abs=1e-4)
    assert rows[1]["curve_std"] is None and rows[1]["final_acc"]["std"] is None
    assert rows[1]["knn_acc"] is None


def test_one_seed_and_control_formatting(tmp_path):
    _probe(tmp_path / "pixels", "pixels", 0, [0.6912, 0.6912])
    _probe(tmp_path / "cktf", "cktf", 3, [0.7, 0.8], transfer_seconds=754.0, knn_acc=0.79)
    files = compare([tmp_path / "pixels", tmp_path / "cktf"], tmp_path / "out")
    table = _table(files["md"].read_text())
    assert table["pixels"] == ["0 (1)", "69.12", "—", "—", "1", "—"]
    assert table["cktf"] == ["3 (1)", "80.00", "—", "79.00", "2", "12.6 min"]
    pixels = next(csv.DictReader(files["csv"].read_text().splitlines()))
    assert pixels["final_acc_std_pct"] == "" and pixels["knn_acc_mean_pct"] == ""
    assert float(pixels["epochs_to_95_mean"]) == 1


def test_values_missing_in_some_seeds_say_how_many(tmp_path):
    _probe(tmp_path / "a", "crd", 0, [0.5, 0.8], knn_acc=0.7)
    _probe(tmp_path / "b", "crd", 1, [0.5, 0.8])
    table = _table(compare([tmp_path / "a", tmp_path / "b"], tmp_path / "out")["md"].read_text())
    assert table["crd"][3] == "70.00 (1 of 2 runs)"


def test_resumed_probe_keeps_the_last_written_value(tmp_path):
    probe = tmp_path / "probe"
    _write_events(probe, {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5, 6: 0.6})
    first = next(probe.iterdir())
    # the resumed attempt restarts at epoch 4 and stops at 5: its values win, the old epoch 6 is stale
    _write_events(probe, {4: 0.44, 5: 0.55})
    # its file must win by write time even when it sorts first by name
    first.rename(probe / "events.out.tfevents.9999999999.zzz")
    (probe / "metrics.json").write_text(json.dumps({"kind": "probe", "method": "kd", "seed": 0, "final_acc": 0.55}))
    run = load_probe_run(probe)
    assert run.curve == pytest.approx([0.1, 0.2, 0.3, 0.44, 0.55])
    assert len([p for p in os.listdir(probe) if "tfevents" in p]) == 2


def test_rewritten_last_epoch(tmp_path):
    _write_events(tmp_path, {1: 0.1, 2: 0.2})
    _write_events(tmp_path, {2: 0.25})
    (tmp_path / "metrics.json").write_text(json.dumps({"kind": "probe", "method": "kd", "final_acc": 0.25}))
    assert load_probe_run(tmp_path).curve == pytest.approx([0.1, 0.25])


def test_run_directory_and_probe_directory_resolve_alike(tmp_path):
    run = _transfer_run(tmp_path / "runs" / "x", "cktf", 0, [0.5, 0.7])
    by_run, by_probe = load_probe_run(run), load_probe_run(run / "probe")
    assert by_run.path == by_probe.path == run / "probe"
    assert by_run.curve == by_probe.curve == pytest.approx([0.5, 0.7])  # not the transfer's own events
    assert (by_run.method, by_run.seed) == ("cktf", 0)
    # a probe directory under another name is recognised by its metrics' kind
    other = _probe(tmp_path / "probes" / "pixels_seed0", "pixels", 0, [0.6])
    assert load_probe_run(other).path == other
    with pytest.raises(CKTFError, match="given twice"):
        compare([run, run / "probe"], tmp_path / "out")


def test_curves_of_different_lengths_average_the_common_prefix(tmp_path):
    _probe(tmp_path / "a", "cktf", 0, [0.5, 0.6, 0.7, 0.8])
    _probe(tmp_path / "b", "cktf", 1, [0.7, 0.8])
    files = compare([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    md = files["md"].read_text()
    assert "cktf: probe curves have different lengths (4, 2 epochs)" in md and "first 2 epochs" in md
    assert summarise([load_probe_run(tmp_path / "a"), load_probe_run(tmp_path / "b")])[0]["curve_mean"] == (
        pytest.approx([0.6, 0.7]))


def _one_line_error(call, *needles) -> str:
    with pytest.raises(CKTFError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message
    return message


def test_errors_name_the_path_and_write_nothing(tmp_path):
    good = _probe(tmp_path / "good", "kd", 0, [0.5, 0.6])
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    unprobed = tmp_path / "runs" / "unprobed"
    unprobed.mkdir(parents=True)
    (unprobed / "metrics.json").write_text(json.dumps({"kind": "transfer", "method": "kd"}))
    no_events = _probe(tmp_path / "no_events", "kd", 0, [0.5], events=False)
    in_percent = _probe(tmp_path / "pct", "kd", 0, [0.5], final_acc=83.4)
    bad_json = _probe(tmp_path / "bad_json", "kd", 0, [0.5])
    (bad_json / "metrics.json").write_text("{not json")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")

    _one_line_error(lambda: compare([], out), "no run given")
    _one_line_error(lambda: compare([good, tmp_path / "missing"], out), tmp_path / "missing", "does not exist")
    _one_line_error(lambda: compare([tmp_path / "empty"], out), tmp_path / "empty", "is empty")
    assert _one_line_error(lambda: compare([good, unprobed], out)) == (
        f"{unprobed} has no probe results (probe/metrics.json); "
        f"run `cktf probe --config PROBE_CONFIG --student {unprobed / 'last.safetensors'}` first (the probe "
        "config of its data, e.g. configs/fashion_split/probe.yaml)")
    _one_line_error(lambda: compare([no_events], out), no_events, "no probe/test_acc events")
    _one_line_error(lambda: compare([in_percent], out), in_percent / "metrics.json", "final_acc", "[0, 1]")
    _one_line_error(lambda: compare([bad_json], out), bad_json / "metrics.json", "cannot read")
    _one_line_error(lambda: compare([a_file], out), a_file, "is a file")
    assert not out.exists()
    _one_line_error(lambda: compare([good], a_file), a_file, "--out")
    _one_line_error(lambda: compare([good], a_file / "sub"), a_file, "--out")
    assert a_file.read_text() == "x"


def test_missing_epochs_are_reported(tmp_path):
    _write_events(tmp_path, {1: 0.1, 3: 0.3})
    (tmp_path / "metrics.json").write_text(json.dumps({"kind": "probe", "method": "kd", "final_acc": 0.3}))
    _one_line_error(lambda: load_probe_run(tmp_path), tmp_path, "epochs 2 are missing")


@pytest.mark.parametrize("curve, expected", [
    ([0.5, 0.5, 0.5], 1),                # flat: already there at epoch 1
    ([0.9, 0.4, 0.9], 1),                # reaches the target at epoch 1, dips later
    ([0.05, 0.5, 0.09, 0.101], 2),       # the first epoch counts, not a later one
    ([0.0959, 0.09595, 0.101], 2),       # 0.95 * 0.101 rounds above 0.09595 in floating point
    ([0.3, 0.0], None),                  # final acc 0: no meaningful target
    ([], None),
])
def test_epochs_to_fraction(curve, expected):
    assert epochs_to_fraction(curve) == expected


def test_epochs_to_fraction_other_fractions():
    assert epochs_to_fraction([0.2, 0.4, 0.6, 0.8], 0.5) == 2
    assert epochs_to_fraction([0.2, 0.4, 0.6, 0.8], 1.0) == 4
    with pytest.raises(ValueError):
        epochs_to_fraction([0.5], 0.0)


def _configured(run_dir: Path, method: str, seed: int, *, size: int = 64, epochs: int = 2) -> Path:
    """A probed transfer run with the saved configs of both stages, as cktf writes them."""
    run_dir.mkdir(parents=True)
    transfer = {"data": {"image_size": size, "root": f"/data/{seed}", "num_workers": seed},
                "train": {"epochs": epochs, "seed": seed, "threads": 1 + seed}, "log": {"name": run_dir.name}}
    (run_dir / "config.yaml").write_text("# written by cktf\n" + yaml.safe_dump(transfer))
    (run_dir / "metrics.json").write_text(json.dumps({"kind": "transfer", "method": method}))
    probe = _probe(run_dir / "probe", method, seed, [0.5, 0.6])
    (probe / "config.yaml").write_text(yaml.safe_dump({"train": {"seed": seed, "epochs": 3},
                                                       "probe": {"out": str(probe)}}))
    return run_dir


def test_runs_of_different_settings_are_not_averaged_as_seeds(tmp_path):
    """Issue 20: a 64 px / 2-epoch run and a 224 px / 1-epoch run were averaged as one method."""
    a = _configured(tmp_path / "a_cktf", "cktf", 0)
    b = _configured(tmp_path / "b_cktf", "cktf", 1, size=224, epochs=1)
    kd = _configured(tmp_path / "a_kd", "kd", 0)
    message = _one_line_error(lambda: compare([a, b, kd], tmp_path / "out"), "both 'cktf'",
                              "network:data.image_size (64 vs 224)", "network:train.epochs (2 vs 1)",
                              f"--label {b / 'probe'}=NAME")
    assert "seed" not in message.split("settings:")[1].split(";")[0]  # seeds, roots, threads may differ
    paths = compare([a, b, kd], tmp_path / "out", labels={str(b): "cktf_224px"})
    assert {"cktf", "cktf_224px", "kd"} <= set(_table(paths["md"].read_text()))


def test_seeds_of_one_setting_are_averaged_but_a_seed_given_twice_is_refused(tmp_path):
    runs = [_configured(tmp_path / f"cktf_s{seed}", "cktf", seed) for seed in (0, 1)]
    rows = summarise([load_probe_run(run) for run in runs])
    assert rows[0]["n"] == 2
    compare(runs, tmp_path / "out")
    again = _configured(tmp_path / "cktf_again", "cktf", 1)
    _one_line_error(lambda: compare([*runs, again], tmp_path / "out2"), "same seed 1", "--label")
    _one_line_error(lambda: compare(runs, tmp_path / "out3", labels={str(tmp_path / "elsewhere"): "x"}),
                    "--label", "not among the compared runs")


def test_compare_cli_label_option(tmp_path):
    from tests.cli_helpers import invoke, one_line_error

    a = _configured(tmp_path / "a_cktf", "cktf", 0)
    b = _configured(tmp_path / "b_cktf", "cktf", 1, size=224)
    code, out = invoke("compare", str(a), str(b), "--out", str(tmp_path / "r"))
    one_line_error(code, out, "network:data.image_size")
    code, out = invoke("compare", str(a), str(b), "--out", str(tmp_path / "r"), "--label", f"{b}=cktf_224")
    assert code == 0, out
    assert "cktf_224" in _table((tmp_path / "r/comparison.md").read_text())
    one_line_error(*invoke("compare", str(a), "--out", str(tmp_path / "r"), "--label", "nonsense"), "DIR=NAME")


def test_a_run_written_before_a_key_existed_counts_with_the_value_its_absence_implies(tmp_path):
    """Seeds made before train.deterministic existed group with later ones (False is what its absence means),
    as --resume treats them; an explicit other value still separates them."""
    old = _configured(tmp_path / "cktf_s0", "cktf", 0)
    new = _configured(tmp_path / "cktf_s1", "cktf", 1)
    config = yaml.safe_load((new / "config.yaml").read_text())
    config["train"]["deterministic"] = False
    (new / "config.yaml").write_text(yaml.safe_dump(config))
    compare([old, new], tmp_path / "out")
    config["train"]["deterministic"] = True
    (new / "config.yaml").write_text(yaml.safe_dump(config))
    _one_line_error(lambda: compare([old, new], tmp_path / "out2"), "network:train.deterministic (False vs True)")
