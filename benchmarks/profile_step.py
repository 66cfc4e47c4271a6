"""Where one transfer step's time goes: each contrastive pair's cost by part, and torch.profiler's op table.

Runs ``cktf transfer``'s own stage on a setting of :mod:`benchmarks.transfer_step` (synthetic images, the real
models, taps, terms, sampler and engine), trains ``--warmup`` steps (the first estimates NCE's Z), then:

1. **pairs**: on one batch, every contrastive pair (``ContrastivePair``: ``mckt``'s stem and stages,
   ``pckt``'s penultimate pair, ``crd``'s pair) is run alone on that batch's tapped features, split into parts
   with a cut (a detached leaf) between them, each part's forward and backward timed apart: ``reduce`` (stage
   features: batch normalisation and pooling, both sides), ``heads`` (the two projection heads) and
   ``objective`` (NCE scoring, loss and bank update). Medians over ``--repeats``; a part's backward is the
   gradient into its inputs (the teacher side's reduction has none).
2. **phases**: ``--steps`` phased steps (``benchmarks.transfer_step.phased_step``), medians per phase.
3. **ops**: ``torch.profiler`` (CPU) over ``--profile-steps`` phased steps, the ops with the most self time,
   and the phases as ``record_function`` ranges.

Run (from the repository root)::

    .venv/bin/python benchmarks/profile_step.py                               # CKTF, shared negatives, VGG
    .venv/bin/python benchmarks/profile_step.py --negatives per-anchor --steps 2
    .venv/bin/python benchmarks/profile_step.py --setting fashion --method cktf --threads 1

Results go to ``--json`` (default ``benchmarks/results/profile_step-<host>-<device>.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    command_line,
    config_overrides,
    default_json_path,
    describe,
    format_table,
    machine_info,
    median,
    positive_int,
    spawn_worker,
    synchronize,
    write_json,
)
from benchmarks.transfer_step import PHASES, SETTINGS, phased_step, transfer_engine, worker_spec  # noqa: E402
from transfer.engine.runtime import autocast  # noqa: E402
from transfer.losses.contrastive import ContrastivePair  # noqa: E402

PARTS = ("reduce", "heads", "objective")


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def capture_pair_inputs(task: Any, batch: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each contrastive pair's ``(student, teacher)`` inputs during one forward of the task's objective."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            seen.setdefault(name, (args[0].detach(), args[1].detach()))
        return hook

    hooks = [module.register_forward_hook(keep(name)) for name, module in task.terms.named_modules()
             if isinstance(module, ContrastivePair)]
    try:
        with torch.no_grad():
            task.objective(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def time_pair(pair: ContrastivePair, student: torch.Tensor, teacher: torch.Tensor, indices: torch.Tensor,
              negatives: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Forward and backward seconds of each of :data:`PARTS` for one pair, cut apart by detached leaves."""
    out: dict[str, float] = {}

    def lap(key: str, start: float) -> float:
        synchronize(device)
        now = time.perf_counter()
        out[key] = now - start
        return now

    student = _leaf(student)
    synchronize(device)
    t = time.perf_counter()
    reduced_s, reduced_t = pair.reduce_student(student), pair.reduce_teacher(teacher)
    t = lap("reduce_fwd", t)
    leaf_s, leaf_t = _leaf(reduced_s), _leaf(reduced_t)
    g_s, g_t = pair.head_student(leaf_s), pair.head_teacher(leaf_t)
    t = lap("heads_fwd", t)
    emb_s, emb_t = _leaf(g_s), _leaf(g_t)
    loss = pair.objective(emb_s, emb_t, indices, negatives).loss
    t = lap("objective_fwd", t)
    loss.backward()
    t = lap("objective_bwd", t)
    torch.autograd.backward([g_s, g_t], [emb_s.grad, emb_t.grad])
    t = lap("heads_bwd", t)
    reduced_s.backward(leaf_s.grad)
    lap("reduce_bwd", t)
    pair.zero_grad(set_to_none=True)
    return out


def pair_costs(engine: Any, augment: Any, batch: tuple[torch.Tensor, ...], repeats: int) -> list[dict[str, Any]]:
    """Per contrastive pair: input shapes and median seconds per part and direction over ``repeats`` runs."""
    from transfer.losses.terms import TransferBatch

    task, device = engine.task, engine.device
    images, targets, indices = (t.to(device) for t in batch)
    if augment is not None:
        images = augment(images)
    with autocast(device, engine.cfg.precision):
        with torch.no_grad():
            teacher_out, student_out = task.teacher(images), task.student(images)
        negatives = task.sampler(indices) if task.sampler is not None else None
        inputs = capture_pair_inputs(task, TransferBatch(student_out, teacher_out, indices, targets, negatives))
        pairs = dict(task.terms.named_modules())
        rows = []
        for name, (student, teacher) in inputs.items():  # one untimed run each first: allocator and caches warm
            time_pair(pairs[name], student, teacher, indices, negatives, device)
        for name, (student, teacher) in inputs.items():
            runs = [time_pair(pairs[name], student, teacher, indices, negatives, device) for _ in range(repeats)]
            rows.append({"pair": name, "student_shape": list(student.shape), "teacher_shape": list(teacher.shape),
                         "median_s": {key: median([r[key] for r in runs]) for key in runs[0]}})
    return rows


def profile_ops(engine: Any, augment: Any, batches: list[tuple[torch.Tensor, ...]], top: int) -> dict[str, Any]:
    """torch.profiler over phased steps: the phases' ranges and the ops with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import benchmarks.transfer_step as transfer_step

    clock_lap = transfer_step.PhaseClock.lap
    ranges: list[Any] = []

    def lap(self: Any, phase: str) -> None:  # close the previous phase's range, open the next one
        clock_lap(self, phase)
        if ranges:
            ranges.pop().__exit__(None, None, None)
        following = PHASES[PHASES.index(phase) + 1] if PHASES.index(phase) + 1 < len(PHASES) else None
        if following:
            ranges.append(record_function(f"phase/{following}"))
            ranges[-1].__enter__()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    transfer_step.PhaseClock.lap = lap
    try:
        with profile(activities=activities) as prof:
            for batch in batches:
                ranges.append(record_function(f"phase/{PHASES[0]}"))
                ranges[-1].__enter__()
                phased_step(engine, augment, batch)
    finally:
        transfer_step.PhaseClock.lap = clock_lap
    steps = len(batches)
    events = prof.key_averages()
    phases = {e.key.removeprefix("phase/"): e.cpu_time_total / 1e3 / steps for e in events
              if e.key.startswith("phase/")}
    ops = sorted((e for e in events if not e.key.startswith("phase/")), key=lambda e: e.self_cpu_time_total,
                 reverse=True)[:top]
    return {"steps": steps, "phase_ms": phases,
            "ops": [{"op": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": e.self_cpu_time_total / 1e3
                     / steps, "total_ms_per_step": e.cpu_time_total / 1e3 / steps} for e in ops]}


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    with transfer_engine(spec) as (engine, captured, cfg, teacher):
        engine.task.train()
        batches = iter(captured["loader"].source)
        augment = captured["augment"]
        pairs = pair_costs(engine, augment, next(batches), spec["repeats"])
        phases: dict[str, list[float]] = {phase: [] for phase in PHASES}
        for _ in range(spec["phase_steps"]):
            for phase, value in phased_step(engine, augment, next(batches)).items():
                phases[phase].append(value)
        ops = profile_ops(engine, augment, [next(batches) for _ in range(spec["profile_steps"])], spec["top"])
    return {"pairs": pairs, "phase_median_s": {p: median(v) for p, v in phases.items()}, "profile": ops,
            "teacher": teacher, "method": cfg.loss.method, "terms": dict(engine.task.weights),
            "negatives": "shared" if cfg.sampler.shared else "per-anchor", "batch": cfg.train.batch_size}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog="Other --section.key VALUE arguments override config keys.")
    parser.add_argument("--setting", choices=SETTINGS, default="stl10_vgg")
    parser.add_argument("--method", default="cktf", help="config name of the setting (default cktf)")
    parser.add_argument("--negatives", choices=("shared", "per-anchor"), default="shared")
    parser.add_argument("--warmup", type=positive_int, default=2, help="engine steps before measuring")
    parser.add_argument("--repeats", type=positive_int, default=3, help="runs of each pair for the pair table")
    parser.add_argument("--steps", type=positive_int, default=3, help="phased steps for the phase medians")
    parser.add_argument("--profile-steps", type=positive_int, default=2, help="phased steps under the profiler")
    parser.add_argument("--top", type=positive_int, default=25, help="ops in the op table")
    parser.add_argument("--items", type=positive_int, help="N_d, memory-bank rows (default: the setting's)")
    parser.add_argument("--batch", type=positive_int, help="batch size (= --train.batch_size)")
    parser.add_argument("--num-negatives", type=positive_int, help="K (= --sampler.num_negatives)")
    parser.add_argument("--teacher", choices=("config", "random"), default="config",
                        help="config: the config's teacher checkpoint when it exists; random: a random teacher")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, help="result file (default benchmarks/results/profile_step-…json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args, passthrough = parser.parse_known_args(argv)
    return args, ([] if args.worker else config_overrides(passthrough, []))


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    started = time.perf_counter()
    device = torch.device(args.device)
    machine, command = machine_info(args.threads, device), command_line()
    print(describe(machine, command), flush=True)
    timing = argparse.Namespace(**{**vars(args), "negatives": args.num_negatives, "breakdown_steps": 0})
    spec = worker_spec(timing, overrides, args.setting, args.method, args.negatives)
    spec.update(warmup=args.warmup, steps=0, repeats=args.repeats, phase_steps=args.steps,
                profile_steps=args.profile_steps, top=args.top)
    result = spawn_worker(Path(__file__).resolve(), spec, cwd=ROOT)
    if "error" in result:
        print(result["error"])
        return 1
    print(f"\n{args.setting} / {result['method']} ({result['negatives']} negatives), batch {result['batch']}, "
          f"terms {result['terms']}, teacher {result['teacher']}")
    ms = 1e3
    rows, totals = [], dict.fromkeys(("fwd", "bwd"), 0.0)
    for pair in result["pairs"]:
        t = pair["median_s"]
        fwd = sum(t[f"{p}_fwd"] for p in PARTS)
        bwd = sum(t[f"{p}_bwd"] for p in PARTS)
        totals["fwd"] += fwd
        totals["bwd"] += bwd
        rows.append([pair["pair"], "x".join(map(str, pair["student_shape"][1:])),
                     "x".join(map(str, pair["teacher_shape"][1:])),
                     *[f"{t[f'{p}_{d}'] * ms:.1f}" for p in PARTS for d in ("fwd", "bwd")],
                     f"{(fwd + bwd) * ms:.1f}"])
    rows.append(["all pairs", "", "", *[""] * 6, f"{(totals['fwd'] + totals['bwd']) * ms:.1f}"])
    print("\nper contrastive pair, ms (median of --repeats):")
    print(format_table(["pair", "student map", "teacher map", *[f"{p} {d}" for p in PARTS for d in ("fwd", "bwd")],
                        "total"], rows))
    phases = result["phase_median_s"]
    print("\nphases, ms (median of --steps): " + ", ".join(f"{p} {v * ms:.1f}" for p, v in phases.items())
          + f"; loss (fwd+bwd) {(phases['loss_fwd'] + phases['loss_bwd']) * ms:.1f}; sum "
          f"{sum(phases.values()) * ms:.1f}")
    prof = result["profile"]
    print(f"\ntorch.profiler, {prof['steps']} phased steps, per step: phases "
          + ", ".join(f"{p} {v:.1f}" for p, v in prof["phase_ms"].items()))
    print(format_table(["op", "calls", "self ms", "total ms"],
                       [[o["op"], f"{o['calls_per_step']:.0f}", f"{o['self_ms_per_step']:.1f}",
                         f"{o['total_ms_per_step']:.1f}"] for o in prof["ops"]]))
    out = write_json(args.json or default_json_path("profile_step", device), {
        "benchmark": "profile_step", "machine": machine, "command": command, "args": vars(args),
        "config_overrides": overrides, "result": result, "wall_s": time.perf_counter() - started})
    print(f"results: {out} (whole command: {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
