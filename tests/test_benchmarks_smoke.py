"""Smoke tests of benchmarks/nce.py and benchmarks/sampler.py: each runs end to end at tiny sizes, as a user
would start it, and writes a JSON file with one sensible row per measured case."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, out: Path, *args: str) -> dict[str, Any]:
    """Run ``benchmarks/<script>`` from the repository root on one thread; its JSON result."""
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args, "--threads", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "command:" in proc.stdout and "machine:" in proc.stdout
    return json.loads(out.read_text())


def test_nce_benchmark_tiny(tmp_path):
    result = run_benchmark("nce.py", tmp_path / "nce.json", "--batch", "4", "--negatives", "16", "--items", "200",
                           "--objectives", "2", "--steps", "2", "--oracle-steps", "2", "--warmup", "1",
                           "--gemm-size", "128")
    rows = {row["path"]: row for row in result["rows"]}
    assert [(r["config"], r["path"]) for r in result["rows"]] == [("custom", p) for p in ("oracle", "fast", "shared")]
    for row in rows.values():
        assert (row["batch"], row["negatives"], row["items"], row["objectives"]) == (4, 16, 200, 2)
        assert len(row["times_s"]) == 2 and min(row["times_s"]) > 0 and row["median_s"] > 0
        assert row["peak_mib"] >= 0 and row["gflops"] > 0 and row["x_floor"] > 0
    assert rows["oracle"]["parity_rel_err"] is None
    assert rows["fast"]["parity_rel_err"] < 1e-5
    assert rows["shared"]["parity_rel_err"] < 1e-5
    assert result["gemm"]["gflops"] > 0 and result["machine"]["threads"] == 1


def test_sampler_benchmark_tiny(tmp_path):
    result = run_benchmark("sampler.py", tmp_path / "sampler.json", "--items", "2000", "--dim", "16", "--k", "4",
                           "--nlist", "20", "--nprobe", "2,8", "--negatives", "64", "--draws", "3")
    tables = result["tables"]
    assert [(t["index"], t["nprobe"]) for t in tables] == [("flat", None), ("ivf", 2), ("ivf", 8)]
    assert all(t["build_s"] > 0 and 0 <= t["recall"] <= 1 for t in tables)
    assert tables[0]["recall"] > 0.99  # the flat index is exact
    draws = result["draws"]
    assert [d["mode"] for d in draws] == ["uniform", "uniform shared", "debiased", "hard"]
    assert all(d["median_s"] > 0 and len(d["times_s"]) == 3 for d in draws)


def test_sampler_benchmark_reads_features(tmp_path):
    features = tmp_path / "features.safetensors"
    save_file({"features": torch.randn(300, 8)}, str(features))
    result = run_benchmark("sampler.py", tmp_path / "sampler.json", "--features", str(features), "--k", "4",
                           "--skip-flat", "--parts", "tables")
    assert result["features"] == str(features) and "draws" not in result
    assert [(t["index"], t["items"], t["dim"]) for t in result["tables"]] == [("ivf", 300, 8)]
