"""Benchmark of the contrastive (NCE) objectives alone: time, peak memory, FLOP rate and parity per training step.

What one *training step* is here: for each of ``--objectives`` objectives (6 in CKTF: stem, 4 stages,
penultimate) a student and a teacher projection head (linear 512→128, l2-normalised) embed ``[B, 512]``
random features (the student's with ``requires_grad``), the NCE objective scores both sides against the
memory banks and computes its loss, the summed loss is back-propagated (into the heads and the student
features) and the banks are updated. Networks, data loading and negative sampling are not included
(one batch of indices and uniform negatives is drawn before timing and reused; sampling is measured by
``benchmarks/sampler.py``).

Paths compared on the same machine in one run, each configuration × path in a fresh subprocess:

* ``oracle``: the reference algorithm of ``tests/nce_oracle.py`` (gather the ``[B, K+1, d]`` bank rows,
  ``bmm``, literal ``log`` terms) with autograd, ``Z`` estimated on the first call then frozen, and the
  same in-place bank update as the objective (``MemoryBank.update``); per-anchor negatives ``[B, K]``.
* ``fast``: ``NCEObjective`` with per-anchor negatives ``[B, K]`` (GEMM against the bank + pick).
* ``shared``: ``NCEObjective`` with ``[K]`` negatives shared by the batch (one GEMM per side).

Configurations (d=128, N=100 000, temperature 0.1, momentum 0.5): ``paper`` B=64, K=16384; ``b256``
B=256, K=16384; ``k4096`` B=64, K=4096. ``--batch``/``--negatives``/``--items`` replace them by a single
``custom`` configuration (unset values from ``paper``), e.g. for smoke tests.

Run (from the repository root)::

    .venv/bin/python benchmarks/nce.py                               # all configurations and paths
    .venv/bin/python benchmarks/nce.py --configs paper --paths fast,shared --threads 1
    .venv/bin/python benchmarks/nce.py --batch 8 --negatives 64 --items 1000 --objectives 2 --steps 2

Columns:

* ``median ms``: median wall time of ``--steps`` steps (``--oracle-steps`` for the oracle) after
  ``--warmup`` untimed steps (the first one also estimates ``Z``).
* ``peak MiB``: peak memory the steps add over the worker's baseline after setup (banks, heads, inputs):
  the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` after setup) minus
  ``VmRSS`` at that point; on CUDA ``torch.cuda.max_memory_allocated`` minus the allocated baseline. A
  tiny step of the same path runs before setup, so one-time costs (code pages, autograd start-up) are
  not counted.
* ``GFLOP/s``: necessary FLOPs / median step time. Necessary FLOPs per step
  ``= objectives · (4·S + 5·H)`` with ``S = 2·B·(K+1)·d`` (per-anchor scoring of one side, forward) and
  ``H = 2·B·512·d`` (one head, forward). Backward: ``S`` per side (gradient w.r.t. the embedding only; the
  banks get none), ``2·H`` for the student head (input and weight gradients), ``H`` for the teacher head
  (weight gradient; teacher features are frozen). The same count is used for every path, so the column
  compares times; ``fast`` computes more (a GEMM against all N bank rows, ``2·B·N·d`` per side and pass).
* ``x floor``: median step time / floor, the floor being the necessary FLOPs at the machine's fp32 GEMM
  rate measured in the same run (``torch.mm`` of ``--gemm-size``³, median of 5).
* ``parity``: relative error ``|loss - ref| / |ref|`` of the path's loss (first objective, after the
  timed steps) against the oracle algorithm evaluated in float64 on the same banks, indices, negatives
  (shared ones expanded to every anchor) and ``Z``; must be below 1e-5, else the script exits with 1.

The oracle keeps ``objectives · 2 · B·(K+1)·d`` floats alive until backward (6.0 GiB for ``paper``,
24 GiB for ``b256``); a worker that would need more than 80% of the available memory skips the oracle
and says so. Linux only (``/proc``). Results go to ``--json`` (default
``benchmarks/results/nce-<host>-<device>.json``) with the machine, the command and every step time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    command_line,
    default_json_path,
    describe,
    format_table,
    machine_info,
    median,
    positive_int,
    time_calls,
    write_json,
)
from tests.nce_oracle import oracle_scores, oracle_side_loss, oracle_z  # noqa: E402
from transfer.losses.memory_bank import MemoryBank  # noqa: E402
from transfer.losses.nce import NCEObjective, NCEOutput  # noqa: E402
from transfer.losses.projection import ProjectionHead  # noqa: E402
from transfer.sampling import build_sampler  # noqa: E402

FEATURE_DIM = 512
EMBED_DIM = 128
TEMPERATURE = 0.1
MOMENTUM = 0.5
PATHS = ("oracle", "fast", "shared")
PARITY_TOLERANCE = 1e-5
ORACLE_MEMORY_FRACTION = 0.8
GEMM_REPEATS = 5
MIB = 2**20


@dataclass(frozen=True)
class Size:
    batch: int
    negatives: int
    items: int


CONFIGS = {
    "paper": Size(batch=64, negatives=16384, items=100_000),
    "b256": Size(batch=256, negatives=16384, items=100_000),
    "k4096": Size(batch=64, negatives=4096, items=100_000),
}

FLOPS_FORMULA = ("FLOPs/step = objectives·(4·S + 5·H), S = 2·B·(K+1)·d (one side's per-anchor scoring, forward), "
                 "H = 2·B·512·d (one head, forward); backward = S per side (w.r.t. the embedding only), 2·H student "
                 "head, H teacher head")


def necessary_flops(size: Size, objectives: int) -> int:
    """FLOPs of the matmuls a training step cannot avoid (see the module docstring)."""
    score = 2 * size.batch * (size.negatives + 1) * EMBED_DIM
    head = 2 * size.batch * FEATURE_DIM * EMBED_DIM
    return objectives * (4 * score + 5 * head)


def oracle_bytes(size: Size, objectives: int) -> int:
    """Memory the oracle keeps until backward: the gathered ``[B, K+1, d]`` fp32 rows of both sides."""
    return objectives * 2 * size.batch * (size.negatives + 1) * EMBED_DIM * 4


# ----------------------------------------------------------------------------------------------- worker side


class OracleObjective(nn.Module):
    """``tests/nce_oracle.py``'s gather + bmm algorithm behind ``NCEObjective``'s interface.

    Same bank initialisation, ``Z`` estimated on the first call and then frozen, and the objective's own
    in-place bank update (``oracle_update`` would copy both banks every step).
    """

    def __init__(self, num_items: int, generator: torch.Generator) -> None:
        super().__init__()
        self.num_items = num_items
        self.bank_student = MemoryBank(num_items, EMBED_DIM, MOMENTUM, generator)
        self.bank_teacher = MemoryBank(num_items, EMBED_DIM, MOMENTUM, generator)
        self.z_student: Tensor | None = None
        self.z_teacher: Tensor | None = None

    def forward(self, g_s: Tensor, g_t: Tensor, indices: Tensor, negatives: Tensor) -> NCEOutput:
        s_t = oracle_scores(self.bank_student.weight, g_t, indices, negatives)
        s_s = oracle_scores(self.bank_teacher.weight, g_s, indices, negatives)
        if self.z_student is None or self.z_teacher is None:
            self.z_student = oracle_z(s_t, TEMPERATURE, self.num_items)
            self.z_teacher = oracle_z(s_s, TEMPERATURE, self.num_items)
        teacher_anchored = oracle_side_loss(s_t, self.z_student, TEMPERATURE, self.num_items)
        student_anchored = oracle_side_loss(s_s, self.z_teacher, TEMPERATURE, self.num_items)
        self.bank_student.update(indices, g_s.detach())
        self.bank_teacher.update(indices, g_t.detach())
        return NCEOutput(teacher_anchored + student_anchored, teacher_anchored, student_anchored)


class TrainingStep:
    """Heads, inputs, objectives and one batch of negatives of one path; calling it runs one training step."""

    def __init__(self, path: str, size: Size, objectives: int, device: torch.device, seed: int) -> None:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        self.heads_s = nn.ModuleList(ProjectionHead(FEATURE_DIM, EMBED_DIM) for _ in range(objectives)).to(device)
        self.heads_t = nn.ModuleList(ProjectionHead(FEATURE_DIM, EMBED_DIM) for _ in range(objectives)).to(device)
        self.losses = nn.ModuleList(
            OracleObjective(size.items, generator) if path == "oracle"
            else NCEObjective(size.items, EMBED_DIM, TEMPERATURE, MOMENTUM, generator=generator)
            for _ in range(objectives)
        ).to(device)
        self.feats_s = [torch.randn(size.batch, FEATURE_DIM, device=device, requires_grad=True)
                        for _ in range(objectives)]
        self.feats_t = [torch.randn(size.batch, FEATURE_DIM, device=device) for _ in range(objectives)]
        self.indices = torch.randperm(size.items, generator=generator)[:size.batch].to(device)
        sampler = build_sampler("uniform", size.items, size.negatives, shared=path == "shared")
        self.negatives = sampler(self.indices, generator=torch.Generator(device).manual_seed(seed))

    def __call__(self) -> None:
        self.heads_s.zero_grad(set_to_none=True)
        self.heads_t.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.indices.device)
        for head_s, head_t, loss, feat_s, feat_t in zip(self.heads_s, self.heads_t, self.losses, self.feats_s,
                                                        self.feats_t, strict=True):
            feat_s.grad = None
            total = total + loss(head_s(feat_s), head_t(feat_t), self.indices, self.negatives).loss
        total.backward()

    @torch.no_grad()
    def parity_error(self) -> float:
        """Relative error of the first objective's loss against the float64 oracle on the same state."""
        nce = self.losses[0]
        g_s, g_t = self.heads_s[0](self.feats_s[0]), self.heads_t[0](self.feats_t[0])
        bank_s, bank_t = nce.bank_student.weight.double(), nce.bank_teacher.weight.double()  # copies
        z_s, z_t = nce.z_student.double(), nce.z_teacher.double()
        loss = nce(g_s, g_t, self.indices, self.negatives).loss.item()
        reference = (oracle_side_loss(chunked_oracle_scores(bank_s, g_t.double(), self.indices, self.negatives),
                                      z_s, TEMPERATURE, nce.num_items)
                     + oracle_side_loss(chunked_oracle_scores(bank_t, g_s.double(), self.indices, self.negatives),
                                        z_t, TEMPERATURE, nce.num_items)).item()
        return abs(loss - reference) / abs(reference)


def chunked_oracle_scores(bank: Tensor, g: Tensor, indices: Tensor, negatives: Tensor,
                          max_elements: int = 2**23) -> Tensor:
    """``oracle_scores`` over slices of anchors, so the gathered rows never exceed ``max_elements``."""
    per_chunk = max(1, max_elements // ((negatives.shape[-1] + 1) * bank.shape[1]))
    return torch.cat([
        oracle_scores(bank, g[a:a + per_chunk], indices[a:a + per_chunk],
                      negatives if negatives.dim() == 1 else negatives[a:a + per_chunk])
        for a in range(0, g.shape[0], per_chunk)
    ])


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Peak memory added after construction: resident set size, and CUDA allocations on a CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0), so setup transients do not count
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.rss = _proc_status_bytes("VmRSS")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.cuda = torch.cuda.memory_allocated(device)

    def peaks_mib(self) -> dict[str, Any]:
        """``peak_rss_mib`` and ``peak_mib`` (the device's: RSS on the CPU, allocator peak on CUDA)."""
        rss = (_proc_status_bytes("VmHWM") - self.rss) / MIB
        peak = (torch.cuda.max_memory_allocated(self.device) - self.cuda) / MIB if self.device.type == "cuda" else rss
        return {"peak_mib": peak, "peak_rss_mib": rss, "peak_rss_reset": self.reset}


def available_bytes(device: torch.device) -> int:
    """Free device memory (CUDA) or ``MemAvailable`` (CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one path at one size in this (fresh) process; the parent reads the returned dict as JSON."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    size, path, objectives = Size(**spec["size"]), spec["path"], spec["objectives"]
    if path == "oracle":
        need, free = oracle_bytes(size, objectives), available_bytes(device)
        if need > ORACLE_MEMORY_FRACTION * free:
            return {"skipped": f"oracle needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available"}
    TrainingStep(path, Size(batch=2, negatives=4, items=16), 1, device, spec["seed"])()  # one-time costs
    step = TrainingStep(path, size, objectives, device, spec["seed"])
    memory = PeakMemory(device)
    times = time_calls(step, spec["steps"], spec["warmup"], device)
    result: dict[str, Any] = {"times_s": times, **memory.peaks_mib()}
    result["parity_rel_err"] = None if path == "oracle" else step.parity_error()
    return result


# ----------------------------------------------------------------------------------------------- parent side


def matmul_gflops(size: int, device: torch.device) -> float:
    """The fp32 GEMM rate of this machine: ``size``³ ``torch.mm``, median of a few after one warm-up."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    seconds = median(time_calls(lambda: torch.mm(a, b, out=out), GEMM_REPEATS, 1, device))
    return 2 * size**3 / seconds / 1e9


def spawn_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`run_worker` in a fresh interpreter; a crash is returned as ``{"error": ...}``."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {"error": f"worker exited with {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_row(config: str, size: Size, path: str, objectives: int, result: dict[str, Any],
             gemm_gflops: float) -> dict[str, Any]:
    """One result row: the worker's measurements plus the derived rate, floor and ratio."""
    flops = necessary_flops(size, objectives)
    floor_s = flops / (gemm_gflops * 1e9)
    row: dict[str, Any] = {"config": config, **asdict(size), "dim": EMBED_DIM, "objectives": objectives,
                           "path": path, "flops": flops, "floor_s": floor_s, **result}
    if "times_s" in row:
        row["steps"] = len(row["times_s"])
        row["median_s"] = median(row["times_s"])
        row["gflops"] = flops / row["median_s"] / 1e9
        row["x_floor"] = row["median_s"] / floor_s
    return row


def table_cells(row: dict[str, Any]) -> list[str]:
    head = [row["config"], str(row["batch"]), str(row["negatives"]), str(row["items"]), row["path"]]
    if "median_s" not in row:
        return [*head, "-", "-", "-", "-", "-", "skipped" if "skipped" in row else "failed"]
    parity = "ref" if row["parity_rel_err"] is None else f"{row['parity_rel_err']:.1e}"
    return [*head, str(row["steps"]), f"{row['median_s'] * 1e3:.1f}", f"{row['peak_mib']:.1f}",
            f"{row['gflops']:.1f}", f"{row['x_floor']:.1f}x", parity]


def parity_failures(rows: list[dict[str, Any]]) -> list[str]:
    return [f"{r['config']}/{r['path']}: {r['parity_rel_err']:.2e}" for r in rows
            if r.get("parity_rel_err") is not None and not r["parity_rel_err"] < PARITY_TOLERANCE]


def selected_configs(args: argparse.Namespace) -> dict[str, Size]:
    """``--configs``, or the single ``custom`` size that ``--batch``/``--negatives``/``--items`` describe."""
    if args.batch is None and args.negatives is None and args.items is None:
        return {name: CONFIGS[name] for name in args.configs.split(",")}
    paper = CONFIGS["paper"]
    return {"custom": Size(args.batch or paper.batch, args.negatives or paper.negatives, args.items or paper.items)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--batch", type=positive_int, help="B; with --negatives/--items: one 'custom' configuration")
    parser.add_argument("--negatives", type=positive_int, help="K (see --batch)")
    parser.add_argument("--items", type=positive_int, help="N, memory-bank rows (see --batch)")
    parser.add_argument("--objectives", type=positive_int, default=6, help="contrastive objectives per step")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated: " + ", ".join(PATHS))
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps per row")
    parser.add_argument("--oracle-steps", type=positive_int, default=3, help="timed steps of the (slow) oracle")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--gemm-size", type=positive_int, default=2048, help="matrix size of the GEMM-rate measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="result file (default benchmarks/results/nce-<host>-<device>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for option, choices in (("configs", CONFIGS), ("paths", PATHS)):
        unknown = set(getattr(args, option).split(",")) - set(choices)
        if unknown:
            parser.error(f"--{option}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(choices)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine, command = machine_info(args.threads, device), command_line()
    configs, paths = selected_configs(args), args.paths.split(",")
    print(describe(machine, command), flush=True)
    gemm = matmul_gflops(args.gemm_size, device)
    print(f"fp32 GEMM rate: {gemm:.1f} GFLOP/s ({args.gemm_size}^3 torch.mm, median of {GEMM_REPEATS})", flush=True)

    rows = []
    for name, size in configs.items():
        for path in paths:
            spec = {"path": path, "size": asdict(size), "objectives": args.objectives, "threads": args.threads,
                    "device": args.device, "seed": args.seed, "warmup": args.warmup,
                    "steps": args.oracle_steps if path == "oracle" else args.steps}
            rows.append(make_row(name, size, path, args.objectives, spawn_worker(spec), gemm))
            print(f"  {name}/{path}: " + "  ".join(table_cells(rows[-1])[5:]), file=sys.stderr, flush=True)

    headers = ["config", "B", "K", "N", "path", "steps", "median ms", "peak MiB", "GFLOP/s", "x floor", "parity"]
    print()
    print(format_table(headers, [table_cells(r) for r in rows]))
    for row in rows:
        if "median_s" not in row:
            print(f"{row['config']}/{row['path']}: {row.get('skipped') or row['error']}")
    print(f"\n{FLOPS_FORMULA}.")
    print(f"GFLOP/s = FLOPs / median. x floor = median / floor, floor = FLOPs at the measured {gemm:.1f} GFLOP/s.")
    print("peak MiB = peak memory over the worker's baseline after setup (RSS; CUDA: allocated); one process per row.")
    print(f"parity = |loss - oracle| / |oracle| in float64 on the same banks, indices, negatives and Z "
          f"(must be < {PARITY_TOLERANCE:g}).")
    out = write_json(args.json or default_json_path("nce", device), {
        "benchmark": "nce", "machine": machine, "command": command, "args": vars(args),
        "gemm": {"size": args.gemm_size, "gflops": gemm}, "flops_formula": FLOPS_FORMULA, "rows": rows,
    })
    print(f"results: {out}")
    failures = parity_failures(rows)
    for failure in failures:
        print(f"FAILED parity {failure}", file=sys.stderr)
    return 1 if failures or any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
