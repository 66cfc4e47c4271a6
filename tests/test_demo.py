"""`cktf demo` on a tiny fixture: every step runs, the report covers methods and controls, a rerun reuses."""

from pathlib import Path

from linear_probe.demo import plan
from tests.cli_helpers import invoke
from tests.data_fixtures import write_fashion_idx


def test_plan_covers_methods_controls_and_seeds(tmp_path):
    steps, compared = plan(tmp_path, [0, 1])
    names = [s.run_dir.name for s in steps]
    for seed in (0, 1):
        for method in ("kd", "crd", "cktf", "cktf_untrained_teacher"):
            assert f"fashion_{method}_s{seed}" in names
        assert tmp_path / f"fashion_pixels_s{seed}" in compared
    untrained = next(s for s in steps if s.run_dir.name == "fashion_teacher_untrained")
    assert untrained.overrides[-2:] == ["--train.epochs", "0"]
    # every probe comes after the run it probes
    order = {s.run_dir: i for i, s in enumerate(steps)}
    for i, step in enumerate(steps):
        if step.student is not None:
            assert order[step.student.parent] < i


def test_demo_runs_end_to_end_and_reuses_finished_runs(tmp_path):
    write_fashion_idx(tmp_path / "fashion", n_train=400, n_test=100)
    args = ["demo", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--data.root",
            str(tmp_path / "fashion"), "--train.epochs", "1", "--train.batch_size", "16",
            "--data.options.labels_per_class", "8", "--model.name", "resnet8", "--sampler.num_negatives", "32",
            "--log.tensorboard", "true"]
    code, out = invoke(*args)
    assert code == 0, out
    table = (tmp_path / "report/comparison.md").read_text()
    for label in ("kd", "crd", "cktf", "cktf_untrained_teacher", "pixels", "random_init", "teacher"):
        assert f"| {label} " in table, label
    stamp = (tmp_path / "runs/fashion_cktf_s0/last.safetensors").stat().st_mtime_ns
    code, out = invoke(*args)
    assert code == 0 and (tmp_path / "runs/fashion_cktf_s0/last.safetensors").stat().st_mtime_ns == stamp
    assert Path(tmp_path / "report/convergence.png").stat().st_size > 1000
