"""benchmarks/collapse_ablation.sh on a Fashion-MNIST fixture: each run changes exactly one setting of one end point
(the published CRD objective or cktf's CRD), is probed, and is compared next to both end points."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cli_helpers import invoke
from tests.data_fixtures import write_fashion_idx

REPO = Path(__file__).resolve().parents[1]
LOWRES = REPO / "configs/fashion_lowres"
SMALL = ["--train.epochs", "1", "--train.batch_size", "16", "--train.device", "cpu"]
# run name -> (end point it starts from, the one setting it changes, as saved in config.yaml)
FLIPS = {
    "crd_reference_bn_linear": ("crd_reference", ("loss", "nce", "projection"), "bn_linear"),
    "crd_reference_tau0.1": ("crd_reference", ("loss", "nce", "temperature"), 0.1),
    "crd_reference_shared": ("crd_reference", ("sampler", "shared"), True),
    "crd_reference_nesterov": ("crd_reference", ("train", "nesterov"), True),
    "crd_linear": ("crd", ("loss", "nce", "projection"), "linear"),
}


def script(runs: Path, out: Path, *extra: str, cktf: Path = Path(sys.executable).parent / "cktf"
           ) -> subprocess.CompletedProcess:
    env = {**os.environ, "CKTF": str(cktf), "SEEDS": "0", "PYTHONPATH": str(REPO)}
    return subprocess.run(["bash", "benchmarks/collapse_ablation.sh", str(runs), str(out), *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def flatten(config: dict, prefix: tuple = ()) -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "options":
            flat.update(flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """What benchmarks/proxy_study.sh leaves behind, at tiny size: the teacher and both end points, probed."""
    root = tmp_path_factory.mktemp("study")
    data = ["--data.root", str(root / "fashion")]
    write_fashion_idx(root / "fashion", n_train=200, n_test=60)
    runs = root / "runs"
    code, out = invoke("train-teacher", "--config", str(LOWRES / "teacher.yaml"), *data, "--log.root", str(runs),
                       "--model.name", "resnet8", *SMALL)
    assert code == 0, out
    for method in ("crd", "crd_reference"):
        run = runs / f"fashion_lowres_{method}_s0"
        code, out = invoke("transfer", "--config", str(LOWRES / f"{method}.yaml"), *data, "--log.root", str(runs),
                           "--log.name", run.name, "--teacher", str(runs / "fashion_lowres_teacher/best.safetensors"),
                           "--sampler.num_negatives", "32", "--train.threads", "1", "--data.options.labels_per_class",
                           "4", *SMALL)
        assert code == 0, out
        code, out = invoke("probe", "--config", str(LOWRES / "probe.yaml"), "--student", str(run / "last.safetensors"),
                           *data, *SMALL, "--data.options.labels_per_class", "4")
        assert code == 0, out
    return root


@pytest.mark.slow(reason="the study fixture (teacher, 2 transfers, 2 probes), then the script's 5 transfers and 5 "
                         "probes, each a cktf process")
def test_each_run_changes_one_setting_and_is_compared_with_both_end_points(study, cktf_fast):
    runs, out = study / "runs", study / "report"
    proc = script(runs, out, "--data.root", str(study / "fashion"), *SMALL, "--sampler.num_negatives", "32",
                  "--data.options.labels_per_class", "4", cktf=cktf_fast)  # the real cktf, without 11 torch imports
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name, (start, key, value) in FLIPS.items():
        flip = flatten(yaml.safe_load((runs / f"fashion_lowres_{name}_s0/config.yaml").read_text()))
        origin = flatten(yaml.safe_load((runs / f"fashion_lowres_{start}_s0/config.yaml").read_text()))
        differ = {k for k in flip.keys() | origin.keys() if flip.get(k) != origin.get(k)}
        assert differ == {key, ("loss", "method"), ("log", "name")}, (name, differ)
        assert flip[key] == value and origin[key] != value and flip[("loss", "method")] == name
        assert (runs / f"fashion_lowres_{name}_s0/probe/metrics.json").is_file()
    table = (out / "comparison.md").read_text()
    for method in ("crd", "crd_reference", *FLIPS):
        assert f"| {method} | 0 (1) |" in table, method


def test_without_the_studys_runs_it_says_what_to_run_first(tmp_path):
    proc = script(tmp_path / "runs", tmp_path / "out")
    assert proc.returncode == 2 and "fashion_lowres_teacher/best.safetensors is missing" in proc.stderr
    assert "benchmarks/proxy_study.sh" in proc.stderr and not (tmp_path / "out").exists()
