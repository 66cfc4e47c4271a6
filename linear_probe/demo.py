"""``cktf demo``: the whole pipeline on the CPU proxy (``configs/<proxy>/``), end to end.

teacher → KD, CRD and CKTF transfers → linear probes → controls → comparison report. The controls answer
a reviewer's questions: logistic regression on raw pixels (is a network needed at all?), a randomly
initialised student (what does the architecture alone give?), CKTF from an *untrained* teacher (how much
comes from the teacher rather than from contrastive training on target images), the teacher's own
features (is there anything to transfer?) and a supervised ceiling, the student's architecture trained on
every target label and probed like the others (how much is there to gain at all?). Every step is a normal
``cktf`` run in ``<root>/<proxy>_<name>``: a finished run (its ``metrics.json`` exists) is reused, an
interrupted one resumed, so re-running the demo only does what is missing. Run names carry the proxy's
name, so runs of another proxy in the same ``root`` are never mistaken for this one's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from linear_probe.compare import compare
from linear_probe.config import ProbeConfig
from linear_probe.stage import run_probe
from transfer.config import TeacherConfig, TransferConfig, load_config
from transfer.config.loader import overrides_for
from transfer.config.shipped import shipped_configs_dir
from transfer.errors import CKTFError
from transfer.stages.common import RunRequest
from transfer.stages.teacher import train_teacher
from transfer.stages.transfer import run_transfer

log = logging.getLogger("cktf")
CONFIGS = shipped_configs_dir() / "fashion_lowres"
METHODS = ("kd", "crd", "cktf")
CEILING_LABEL = "supervised_ceiling"


@dataclass
class Step:
    """One run of the demo: a stage, its config file and overrides, and where its results land."""

    stage: str
    config: Path
    run_dir: Path
    overrides: list[str] = field(default_factory=list)
    student: Path | None = None
    seed: int | None = None  # None: shared by every seed (teacher, ceiling, their probes)

    @property
    def done(self) -> bool:
        return (self.run_dir / "metrics.json").is_file()

    @property
    def interrupted(self) -> bool:
        return (self.run_dir / "last.safetensors").is_file() and not self.done


def student_name(configs: Path) -> str:
    """The transfer student's architecture (``student.name`` of ``cktf.yaml``): the ceiling must use the same."""
    return load_config(configs / "cktf.yaml", TransferConfig).student.name


def plan(root: Path, seeds: list[int], configs: Path = CONFIGS,
         methods: tuple[str, ...] = METHODS) -> tuple[list[Step], list[Path]]:
    """The demo's steps in order, and the run directories the comparison reads.

    ``methods`` name transfer configs in ``configs`` (``<method>.yaml``); each runs once per seed.
    """
    missing = [m for m in methods if not (configs / f"{m}.yaml").is_file()]
    if missing:
        raise CKTFError(f"--methods {','.join(missing)}: no {configs}/<method>.yaml for it; available: "
                        f"{', '.join(sorted(p.stem for p in configs.glob('*.yaml')))}")
    prefix = configs.name
    teacher, untrained = root / f"{prefix}_teacher", root / f"{prefix}_teacher_untrained"
    ceiling = root / f"{prefix}_ceiling"
    steps = [
        Step("teacher", configs / "teacher.yaml", teacher, ["--log.name", teacher.name]),
        Step("teacher", configs / "teacher.yaml", untrained, ["--log.name", untrained.name, "--train.epochs", "0"]),
        Step("probe", configs / "probe.yaml", teacher / "probe", student=teacher / "best.safetensors"),
        Step("teacher", configs / "ceiling.yaml", ceiling,
             ["--log.name", ceiling.name, "--model.name", student_name(configs)]),
        Step("probe", configs / "probe.yaml", ceiling / "probe", ["--probe.label", CEILING_LABEL],
             student=ceiling / "best.safetensors"),
    ]
    compared: list[Path] = []
    for seed in seeds:
        seed_args = ["--train.seed", str(seed)]
        transfers = [(m, teacher, []) for m in methods]
        transfers.append(("cktf", untrained, ["--loss.method", "cktf_untrained_teacher"]))
        for method, source, extra in transfers:
            tag = method if source is teacher else "cktf_untrained_teacher"
            name = f"{prefix}_{tag}_s{seed}"
            run = root / name
            steps.append(Step("transfer", configs / f"{method}.yaml", run,
                              ["--log.name", name, "--teacher.checkpoint", str(source / "best.safetensors"),
                               *seed_args, *extra], seed=seed))
            steps.append(Step("probe", configs / "probe.yaml", run / "probe", seed_args,
                              student=run / "last.safetensors", seed=seed))
            compared.append(run)
        for control, extra in (("pixels", ["--probe.backbone", "pixels"]),
                               ("random_init", ["--probe.backbone", "random", "--probe.model", "resnet8"])):
            out = root / f"{prefix}_{control}_s{seed}" / "probe"
            steps.append(Step("probe", configs / "probe.yaml", out, [*extra, "--probe.out", str(out), *seed_args],
                              seed=seed))
            compared.append(out.parent)
    compared += [teacher, ceiling]
    return steps, compared


def run_step(step: Step, root: Path, extra: list[str] | tuple[str, ...] = ()) -> None:
    """Run ``step`` unless it already finished; resume it if it was interrupted.

    ``extra`` overrides go first, so a step's own overrides (e.g. the untrained teacher's 0 epochs) win.
    """
    if step.done:
        log.info(f"demo: reusing {step.run_dir}")
        return
    resume = step.interrupted
    log.info(f"demo: {'resuming' if resume else 'running'} {step.stage} -> {step.run_dir}")
    if step.stage == "probe":
        cfg = load_config(step.config, ProbeConfig, [*overrides_for(ProbeConfig, extra), *step.overrides])
        run_probe(cfg, str(step.student) if step.student else None, RunRequest(resume=resume))
        return
    schema = TeacherConfig if step.stage == "teacher" else TransferConfig
    cfg = load_config(step.config, schema, [*overrides_for(schema, extra), *step.overrides, "--log.root", str(root)])
    stage = train_teacher if step.stage == "teacher" else run_transfer
    stage(cfg, RunRequest(resume=resume))


def run_demo(root: str | Path = "runs", seeds: list[int] | None = None, report: str | Path | None = None,
             extra: list[str] | tuple[str, ...] = (), configs: Path = CONFIGS,
             methods: tuple[str, ...] = METHODS) -> dict[str, Path]:
    """Run every missing step (``extra`` overrides apply to all), then write the comparison to ``report``
    (default ``reports/<proxy>``)."""
    root = Path(root)
    steps, compared = plan(root, seeds or [0], Path(configs), tuple(methods))
    for step in steps:
        run_step(step, root, extra)
    title = f"{configs.name}: probe accuracy on the target ({len(seeds or [0])} seed(s))"
    return compare(compared, report or Path("reports") / configs.name, title)


def run_seeds(root: str | Path, seeds: list[int], extra: list[str] | tuple[str, ...] = (), configs: Path = CONFIGS,
              methods: tuple[str, ...] = METHODS) -> None:
    """Run only the per-seed steps of ``seeds`` (a second process beside one running other seeds).

    The shared steps (teacher, untrained teacher, ceiling, their probes) must be finished: two processes never
    work on one run directory.
    """
    root = Path(root)
    steps, _ = plan(root, seeds, Path(configs), tuple(methods))
    pending = [step.run_dir for step in steps if step.seed is None and not step.done]
    if pending:
        raise CKTFError(f"--only-seeds needs the shared runs finished first ({pending[0]} is not); run "
                        "`cktf demo --seeds 1` (or wait for the process running it)")
    for step in steps:
        if step.seed is not None:
            run_step(step, root, extra)
