"""`cktf demo` on a tiny fixture: every step runs, the report covers methods and controls, a rerun reuses."""

from pathlib import Path

import pytest
import yaml

from linear_probe.demo import CEILING_LABEL, CONFIGS, plan, student_name
from tests.cli_helpers import invoke, one_line_error
from tests.data_fixtures import write_fashion_idx
from transfer.config import TeacherConfig, load_config

PREFIX = CONFIGS.name


@pytest.mark.parametrize("configs", [CONFIGS, CONFIGS.parent / "fashion_split"])
def test_plan_covers_methods_controls_and_seeds(tmp_path, configs):
    steps, compared = plan(tmp_path, [0, 1], configs)
    prefix = configs.name  # runs of different proxies never share a directory
    names = [s.run_dir.name for s in steps]
    for seed in (0, 1):
        for method in ("kd", "crd", "cktf", "cktf_untrained_teacher"):
            assert f"{prefix}_{method}_s{seed}" in names
        assert tmp_path / f"{prefix}_pixels_s{seed}" in compared
    assert {tmp_path / f"{prefix}_teacher", tmp_path / f"{prefix}_ceiling"} <= set(compared)
    assert all(step.config.parent == configs for step in steps)
    untrained = next(s for s in steps if s.run_dir.name == f"{prefix}_teacher_untrained")
    assert untrained.overrides[-2:] == ["--train.epochs", "0"]
    # every probe comes after the run it probes
    order = {s.run_dir: i for i, s in enumerate(steps)}
    for i, step in enumerate(steps):
        if step.student is not None:
            assert order[step.student.parent] < i


def test_ceiling_is_the_student_architecture_trained_on_every_target_label(tmp_path):
    steps, _ = plan(tmp_path, [0])
    ceiling = next(s for s in steps if s.run_dir.name == f"{PREFIX}_ceiling")
    cfg = load_config(ceiling.config, TeacherConfig, ceiling.overrides)
    assert cfg.model.name == student_name(CONFIGS) and cfg.data.train_split == "target_labeled"
    assert cfg.data.test_split == "target_test" and cfg.data.val_fraction > 0  # selection never sees the test split
    probe_step = next(s for s in steps if s.student == ceiling.run_dir / "best.safetensors")
    assert probe_step.overrides == ["--probe.label", CEILING_LABEL]


@pytest.mark.parametrize("configs", [CONFIGS, CONFIGS.parent / "fashion_split"])
def test_every_config_of_a_proxy_reads_the_same_domains(configs):
    """Teacher, transfers, probe and ceiling must agree on classes, image halves and shift (labels may differ)."""
    options = {}
    for path in sorted(configs.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())["data"]
        options[path.name] = {k: v for k, v in data.get("options", {}).items() if k != "labels_per_class"}
        assert data["name"] == "fashion_split", path
    assert {"teacher.yaml", "ceiling.yaml", "probe.yaml", "kd.yaml", "crd.yaml", "cktf.yaml"} <= set(options)
    first = options["teacher.yaml"]
    assert all(o == first for o in options.values()), options


@pytest.mark.slow(reason="the whole demo (teacher, transfers, probes, controls, report) on a fixture, then three "
                         "reruns")
def test_demo_runs_end_to_end_and_reuses_finished_runs(tmp_path):
    write_fashion_idx(tmp_path / "fashion", n_train=400, n_test=100)
    args = ["demo", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--data.root",
            str(tmp_path / "fashion"), "--train.epochs", "1", "--train.batch_size", "16",
            "--data.options.labels_per_class", "8", "--model.name", "resnet8", "--sampler.num_negatives", "32",
            "--log.tensorboard", "true"]
    code, out = invoke(*args)
    assert code == 0, out
    table = (tmp_path / "report/comparison.md").read_text()
    for label in ("kd", "crd", "cktf", "cktf_untrained_teacher", "pixels", "random_init", "teacher", CEILING_LABEL):
        assert f"| {label} " in table, label
    stamp = (tmp_path / f"runs/{PREFIX}_cktf_s0/last.safetensors").stat().st_mtime_ns
    code, out = invoke(*args)
    assert code == 0 and (tmp_path / f"runs/{PREFIX}_cktf_s0/last.safetensors").stat().st_mtime_ns == stamp
    assert Path(tmp_path / "report/convergence.png").stat().st_size > 1000
    code, out = invoke(*args, "--only-seeds", "1")
    assert code == 0, out
    stamp1 = (tmp_path / f"runs/{PREFIX}_kd_s1/probe/metrics.json").stat().st_mtime_ns
    assert not (tmp_path / f"runs/{PREFIX}_teacher_s1").exists()
    code, out = invoke(*args, "--seeds", "2")
    assert code == 0 and "| kd | 0, 1 (2) |" in (tmp_path / "report/comparison.md").read_text(), out
    assert (tmp_path / f"runs/{PREFIX}_kd_s1/probe/metrics.json").stat().st_mtime_ns == stamp1


def test_demo_methods_and_only_seeds_are_checked(tmp_path):
    steps, compared = plan(tmp_path, [0], CONFIGS, ("kd", "cktf_reference"))
    names = {s.run_dir.name for s in steps}
    assert {f"{PREFIX}_kd_s0", f"{PREFIX}_cktf_reference_s0"} <= names and f"{PREFIX}_crd_s0" not in names
    code, out = invoke("demo", "--runs", str(tmp_path), "--methods", "kd,nosuch")
    one_line_error(code, out, "--methods nosuch", "cktf_reference")
    code, out = invoke("demo", "--runs", str(tmp_path), "--only-seeds", "1")
    one_line_error(code, out, "--only-seeds", "shared runs finished first")
    code, out = invoke("demo", "--runs", str(tmp_path), "--only-seeds", "one")
    one_line_error(code, out, "--only-seeds 'one'")
    assert not any(tmp_path.iterdir())
