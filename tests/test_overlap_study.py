"""The label-overlap study (issue 21): its levels differ in the teacher's classes and nothing else, and its
summary reads the per-level reports."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from linear_probe.config import ProbeConfig
from transfer.config import TeacherConfig, TransferConfig, config_to_dict, load_config
from transfer.stages.common import flatten_config

REPO = Path(__file__).resolve().parents[1]
LEVELS = {100: 5, 60: 3, 0: 0}  # overlap in percent: target classes among the teacher's five
SCHEMAS = {"teacher": TeacherConfig, "ceiling": TeacherConfig, "probe": ProbeConfig, "kd": TransferConfig,
           "crd": TransferConfig, "cktf": TransferConfig, "cktf_kd": TransferConfig}
PER_LEVEL = {"data.options.source_classes", "teacher.checkpoint", "log.name"}


def level_config(level: int, name: str) -> dict:
    cfg = load_config(REPO / f"configs/overlap/overlap_{level}/{name}.yaml", SCHEMAS[name])
    return flatten_config(config_to_dict(cfg))


@pytest.mark.parametrize("name", SCHEMAS)
def test_levels_differ_only_in_the_teachers_classes(name):
    configs = {level: level_config(level, name) for level in LEVELS}
    for level, flat in configs.items():
        source, target = flat["data.options.source_classes"], flat["data.options.target_classes"]
        assert target == [0, 2, 3, 4, 6] and len(set(source)) == 5
        assert len(set(source) & set(target)) == LEVELS[level]
        rest = {key: value for key, value in flat.items() if key not in PER_LEVEL}
        assert rest == {key: value for key, value in configs[100].items() if key not in PER_LEVEL}


def test_the_study_uses_the_fashion_lowres_settings():
    lowres = flatten_config(config_to_dict(load_config(REPO / "configs/fashion_lowres/cktf.yaml", TransferConfig)))
    study = level_config(60, "cktf")
    differ = {k for k in lowres if lowres[k] != study[k]}
    assert differ == PER_LEVEL | {"data.options.target_classes"}


def _report(folder: Path, rows: dict[str, tuple[float, float | None]]) -> Path:
    folder.mkdir(parents=True)
    with open(folder / "comparison.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "n_seeds", "seeds", "final_acc_mean_pct", "final_acc_std_pct", "knn_acc_mean_pct",
                         "knn_acc_std_pct"])
        for method, (mean, std) in rows.items():
            writer.writerow([method, 3, "0;1;2", mean, "" if std is None else std, mean - 5, ""])
    return folder


def test_the_summary_tabulates_every_level_and_plots(tmp_path):
    a = _report(tmp_path / "a", {"kd": (80.0, 0.5), "cktf": (78.0, 1.0), "pixels": (60.0, None)})
    b = _report(tmp_path / "b", {"kd": (70.0, 0.4), "cktf": (72.5, 0.3)})
    subprocess.run([sys.executable, str(REPO / "benchmarks/overlap_table.py"), f"100={a}", f"0={b}", "--out",
                    str(tmp_path / "out")], check=True, capture_output=True)
    table = (tmp_path / "out/overlap_table.md").read_text().splitlines()
    assert table[0].startswith("| method | 100 %: probe | 100 %: kNN | 0 %: probe")
    rows = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert list(rows) == ["kd", "cktf", "pixels"]
    assert "| 80.00 ± 0.50 | 75.00 | 70.00 ± 0.40 |" in rows["kd"] and "| — | — |" in rows["pixels"]
    assert (tmp_path / "out/overlap.png").stat().st_size > 10_000
