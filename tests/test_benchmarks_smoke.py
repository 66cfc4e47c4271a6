"""Smoke tests of the benchmark scripts (nce.py, sampler.py, transfer_step.py, probe.py): each runs end to end
at tiny sizes, as a user would start it, and writes a JSON file with one sensible row per measured case."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tests.data_fixtures import write_fashion_idx
from transfer.engine.checkpoint import save_checkpoint
from transfer.models import build_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow(reason="each starts a benchmark script as a user would: a torch import (~5 s of CPU), "
                                     "then timed runs (transfer_step.py: a worker process per method)")


def run_benchmark(script: str, out: Path, *args: str, timeout: float = 120) -> dict[str, Any]:
    """Run ``benchmarks/<script>`` from the repository root on one thread; its JSON result."""
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args, "--threads", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
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


def test_sampler_benchmark_teacher_features(tmp_path):
    """--features teacher:CHECKPOINT embeds the config's unlabeled pool through the transfer stage's path."""
    write_fashion_idx(tmp_path / "fashion", n_train=200, n_test=20)
    teacher = tmp_path / "teacher.safetensors"
    model = build_model("resnet8", in_channels=1, num_classes=5)
    save_checkpoint(teacher, {"task": {f"model.{k}": v for k, v in model.state_dict().items()}},
                    {"kind": "teacher", "model": "resnet8", "in_channels": "1", "num_classes": "5"})
    result = run_benchmark("sampler.py", tmp_path / "sampler.json", "--features", f"teacher:{teacher}",
                           "--config", "configs/fashion_split/crd.yaml", "--set", f"data.root={tmp_path / 'fashion'}",
                           "--k", "4", "--nlist", "4", "--nprobe", "1,4", "--parts", "tables")
    pool = 100  # the 5 target classes of 200 balanced train images
    assert result["features_shape"] == [pool, 64] and result["teacher"] == str(teacher)  # resnet8: 64-d
    assert result["embed_s"] > 0 and "draws" not in result
    tables = result["tables"]
    assert [(t["index"], t["nprobe"], t["items"]) for t in tables] == [("flat", None, pool), ("ivf", 1, pool),
                                                                         ("ivf", 4, pool)]
    assert tables[0]["recall"] > 0.99 and tables[2]["recall"] > 0.99  # nprobe = nlist scans everything
    assert 0 <= tables[1]["recall"] <= 1


def test_sampler_benchmark_scaling_tiny(tmp_path):
    result = run_benchmark("sampler.py", tmp_path / "sampler.json", "--parts", "scaling", "--scaling-items",
                           "500,1000", "--scaling-estimate", "4000", "--scaling-flat-max", "500", "--dim", "8",
                           "--k", "4", "--batch", "4", "--negatives", "16", "--scaling-repeats", "2",
                           "--objectives", "6", "--recall-rows", "50")
    scaling = result["scaling"]
    rows = {row["items"]: row for row in scaling["rows"]}
    assert sorted(rows) == [500, 1000, 4000] and "tables" not in result
    for items, row in rows.items():
        assert row["banks_fp32_gib"] == pytest.approx(2 * 6 * items * 128 * 4 / 2**30)
        assert row["banks_fp16_gib"] == pytest.approx(row["banks_fp32_gib"] / 2)
        for key in ("gemm_fwd_s", "gemm_bwd_s", "gemm_step_s", "nce_step_s", "ivf_s", "flat_s"):
            assert row[key] > 0, key
    assert rows[500]["estimated"] == [] and rows[500]["flat_recall"] > 0.99
    assert rows[1000]["estimated"] == ["flat_s"] and 0 <= rows[1000]["ivf_recall"] <= 1
    assert set(rows[4000]["estimated"]) == {"gemm_fwd_s", "gemm_bwd_s", "gemm_step_s", "nce_objective_s", "nce_step_s",
                                            "ivf_s", "flat_s"}
    # flat was measured at one size only: extrapolated with the model exponent 2
    assert scaling["exponents"]["flat_s"] == {"exponent": 2.0, "source": "model"}
    assert rows[1000]["flat_s"] == pytest.approx(4 * rows[500]["flat_s"])
    assert scaling["exponents"]["ivf_s"]["source"] == "measured slope"


def test_transfer_step_benchmark_tiny(tmp_path):
    result = run_benchmark("transfer_step.py", tmp_path / "transfer_step.json", "--settings", "fashion",
                           "--methods", "kd,cktf", "--items", "256", "--batch", "8", "--negatives", "32",
                           "--steps", "2", "--warmup", "1", "--breakdown-steps", "1", "--teacher", "random",
                           "--train.lr", "0.01", timeout=300)
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["kd", "cktf per-anchor", "cktf shared"]
    assert result["config_overrides"] == ["--train.lr", "0.01"]
    for row in rows:
        assert "error" not in row, row.get("error")
        assert (row["setting"], row["batch"], row["items"], row["stored_shape"]) == ("fashion", 8, 256, [1, 28, 28])
        assert len(row["load_s"]) == 2 and row["batched_augment"] == (row["data_config"]["augment"] == "batched")
        assert len(row["times_s"]) == 2 and len(row["warmup_times_s"]) == 1 and row["median_s"] > 0
        assert row["images_per_s"] == pytest.approx(8 / row["median_s"])
        assert all(len(values) == 1 and values[0] > 0 for values in row["phases_s"].values())
        assert row["train_config"]["lr"] == 0.01 and row["train_config"]["threads"] == 1
        assert row["performance_options"]["precision"] == "fp32"
        assert row["teacher"].startswith("random resnet14")
    kd, per_anchor, shared = rows
    assert kd["objectives"] == 0 and kd["num_negatives"] is None and "overhead_vs_kd_pct" in kd
    assert per_anchor["objectives"] == shared["objectives"] == 5  # stem + 3 stages + penultimate (resnet8)
    assert (per_anchor["negatives"], shared["negatives"]) == ("per-anchor", "shared")
    assert per_anchor["num_negatives"] == 32 and per_anchor["overhead_vs_kd_pct"] is not None


def test_probe_benchmark_tiny(tmp_path):
    result = run_benchmark("probe.py", tmp_path / "probe.json", "--train-items", "40", "--test-items", "24",
                           "--epochs", "2", "--augment-warmup", "1", "--augment-batches", "2", "--eval-batches", "1",
                           "--data.image_size", "32", "--train.batch_size", "8", timeout=300)
    cached, augment = result["rows"]
    assert (cached["mode"], cached["estimated"], augment["mode"], augment["estimated"]) == (
        "cached", False, "augment", True)
    assert result["config_overrides"] == ["--data.image_size", "32", "--train.batch_size", "8"]
    assert (cached["train_items"], cached["test_items"], cached["epochs"]) == (40, 24, 2)
    assert [(e["split"], e["reused"]) for e in cached["extracts"]] == [("train", False), ("test", False)]
    assert cached["extract_s"] > 0 and 0 < cached["train_s"] <= cached["probe_s"] < cached["total_s"]
    assert cached["per_epoch_s"] == pytest.approx(cached["probe_s"] / 2)
    assert 0 <= cached["final_acc"] <= 1 and cached["probe_config"]["train"]["batch_size"] == 8
    # augment: run_probe got the cached run's features back and ran 1 + 2 training and 1 test batch
    assert [(e["split"], e["reused"]) for e in augment["extracts"]] == [("train", True), ("test", True)]
    assert len(augment["timed_train_batches"]) == 2 and len(augment["timed_test_batches"]) == 1
    assert (augment["train_batches_per_epoch"], augment["test_batches_per_epoch"]) == (5, 1)  # 40 // 8, ceil(24/256)
    assert augment["per_epoch_s"] == pytest.approx(5 * augment["train_batch_s"] + augment["test_batch_s"])
    assert augment["probe_s"] == pytest.approx(2 * augment["per_epoch_s"])


def test_augment_benchmark_tiny(tmp_path):
    result = run_benchmark("augment.py", tmp_path / "augment.json", "--datasets", "fashion_split,stl10",
                           "--repeats", "2", "--clock", "wall")
    assert [r["dataset"] for r in result["results"]] == ["fashion_split", "stl10"]
    for row in result["results"]:
        assert row["per_image_us"] > 0 and row["batched_us"] > 0
        assert row["speedup"] == pytest.approx(row["per_image_us"] / row["batched_us"])
    assert result["clock"] == "wall" and result["machine"]["threads"] == 1


def test_profile_step_benchmark_tiny(tmp_path):
    result = run_benchmark("profile_step.py", tmp_path / "profile_step.json", "--setting", "fashion",
                           "--method", "cktf", "--items", "256", "--batch", "8", "--num-negatives", "32",
                           "--warmup", "1", "--repeats", "1", "--steps", "1", "--profile-steps", "1", "--top", "5",
                           "--teacher", "random", timeout=300)["result"]
    assert result["method"] == "cktf" and result["negatives"] == "shared" and result["batch"] == 8
    # resnet8 <- resnet14: mckt's stem and three stages, pckt's penultimate pair, each timed by part
    assert [p["pair"] for p in result["pairs"]] == [*(f"mckt.pairs.{s}" for s in ("stem", "stage1", "stage2",
                                                                                    "stage3")), "pckt.pair"]
    for pair in result["pairs"]:
        assert pair["student_shape"][0] == 8
        assert set(pair["median_s"]) == {f"{part}_{d}" for part in ("reduce", "heads", "objective")
                                         for d in ("fwd", "bwd")}
        assert pair["median_s"]["objective_fwd"] > 0
    assert set(result["phase_median_s"]) == {"augment", "teacher_fwd", "student_fwd", "sampler", "loss_fwd",
                                             "loss_bwd", "student_bwd", "optimizer"}
    profile = result["profile"]
    assert profile["steps"] == 1 and len(profile["ops"]) == 5
    assert set(profile["phase_ms"]) == set(result["phase_median_s"])
    # the top ops by self time, sorted; custom autograd functions (e.g. the spatial mean) are ops too
    selfs = [op["self_ms_per_step"] for op in profile["ops"]]
    assert selfs == sorted(selfs, reverse=True)
    assert all(op["op"] and op["calls_per_step"] > 0 and op["self_ms_per_step"] <= op["total_ms_per_step"] + 1e-9
               for op in profile["ops"])
    assert any(op["op"].startswith("aten::") for op in profile["ops"])
