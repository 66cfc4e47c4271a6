"""The command-line chain a GPU user runs, end to end on a Fashion-MNIST fixture (benchmarks/gpu_check.sh's step).

1. ``train-teacher`` in fp16 with DataLoader workers (and so pinned memory) on the device;
2. ``transfer`` with CKTF in bf16: per-anchor hard negatives (a faiss neighbour table), per-batch ``smallest``
   layer mapping, ``train.compile``, ``train.deterministic`` (its log names any op without a deterministic
   CUDA kernel), a checkpoint every few steps, SIGTERM inside the second epoch (``tests/signal_driver.py``
   sends it when a given batch is loaded), then ``--resume`` to the end;
3. ``probe`` of the transferred student.

Each command runs through ``python -m transfer.cli`` from the repository root (no cktf install needed) with a
timeout; the first failure stops the chain. Each command's output goes to ``OUT/<name>.log``, the results to
``OUT/chain.json`` (or ``--json``): every command with its exit status, seconds and the last lines of its
output, plus the teacher's, the transfer's and the probe's metrics.
Exit status 0 only if every command did what it should (the interrupted transfer exits 143 and says
"stopped by SIGTERM"; the resumed one finishes its epochs).

``--device cpu --teacher-precision fp32 --compile false`` runs the same chain on a CPU (CI checks it that way,
tests/test_gpu_check.py); ``--dry-run`` prints the commands without running them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs/fashion_split"
SIGTERM_EXIT = 143


def chain_commands(out: Path, args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """``(name, argv)`` of each command of the chain, in order."""
    py = [sys.executable]
    data, runs = out / "fashion", out / "runs"
    common = ["--data.root", str(data), "--log.root", str(runs), "--train.device", args.device,
              "--log.tensorboard", "false", "--train.seed", "0"]
    teacher = ["train-teacher", "--config", str(CONFIGS / "teacher.yaml"), *common, "--log.name", "teacher",
               "--model.name", "resnet8", "--train.epochs", "2", "--train.batch_size", "64",
               "--train.precision", args.teacher_precision, "--data.num_workers", "2"]
    transfer = ["transfer", "--config", str(CONFIGS / "cktf.yaml"), *common, "--log.name", "cktf",
                "--teacher", str(runs / "teacher/best.safetensors"), "--train.epochs", "3",
                "--train.batch_size", "64", "--train.precision", "bf16", "--train.compile", args.compile,
                "--train.checkpoint_every", "5", "--train.deterministic", "true", "--sampler.kind", "hard",
                "--sampler.shared", "false", "--sampler.num_negatives", "256",
                "--loss.terms.mckt.layer_mapping", "smallest", "--loss.terms.mckt.mapping_schedule", "per_batch"]
    probe = ["probe", "--config", str(CONFIGS / "probe.yaml"), *common[:2], *common[4:], "--student",
             str(runs / "cktf/last.safetensors"), "--probe.out", str(runs / "cktf/probe"), "--train.epochs", "5",
             "--data.options.labels_per_class", "20"]
    pool = args.items // 2  # target_unlabeled: the fixture's training images of the five target classes
    embedding_batches = -(-pool // 256)  # the hard sampler's neighbour table embeds the pool first
    stop_at = embedding_batches + pool // 64 * 3 // 2  # a batch inside the second epoch
    return [
        ("teacher", [*py, "-m", "transfer.cli", *teacher]),
        ("transfer_sigterm", [*py, "-m", "tests.signal_driver", "SIGTERM", str(stop_at), *transfer]),
        ("transfer_resume", [*py, "-m", "transfer.cli", *transfer, "--resume"]),
        ("probe", [*py, "-m", "transfer.cli", *probe]),
    ]


def expected(name: str, returncode: int, output: str) -> str | None:
    """Why command ``name`` did not do what it should, or None."""
    if name == "transfer_sigterm":
        if returncode != SIGTERM_EXIT:
            return f"exit {returncode}, expected {SIGTERM_EXIT} (stopped by SIGTERM after a checkpoint)"
        lines = output.strip().splitlines()
        if not lines or not lines[-1].startswith("stopped by SIGTERM"):
            return "no 'stopped by SIGTERM' line at the end"
        return None
    return None if returncode == 0 else f"exit {returncode}"


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def run_chain(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run the chain into ``out``; returns what ``chain.json`` records."""
    sys.path.insert(0, str(ROOT))
    from tests.data_fixtures import write_fashion_idx

    write_fashion_idx(out / "fashion", n_train=args.items, n_test=400)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    report: dict[str, Any] = {"device": args.device, "commands": [], "ok": False}
    for name, argv in chain_commands(out, args):
        started = time.perf_counter()
        try:
            done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
            code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as err:
            code, output = 124, f"timed out after {args.timeout} s\n{err.stderr or ''}"
        (out / f"{name}.log").write_text(output)
        problem = expected(name, code, output)
        report["commands"].append({"name": name, "command": shlex.join(argv), "returncode": code,
                                   "seconds": round(time.perf_counter() - started, 1), "problem": problem,
                                   "output_tail": output.strip().splitlines()[-8:]})
        print(f"{name}: {'ok' if problem is None else problem} ({report['commands'][-1]['seconds']} s)", flush=True)
        if problem is not None:
            return report
    runs = out / "runs"
    report["teacher"] = read_json(runs / "teacher/metrics.json")
    report["transfer"] = read_json(runs / "cktf/metrics.json")
    report["probe"] = read_json(runs / "cktf/probe/metrics.json")
    report["ok"] = True
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the fixture, runs and chain.json")
    parser.add_argument("--device", default="cuda", help="train.device of every command (default cuda)")
    parser.add_argument("--teacher-precision", default="fp16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--compile", default="true", choices=("true", "false"), help="train.compile of the transfer")
    parser.add_argument("--items", type=int, default=2000, help="fixture training images (default 2000)")
    parser.add_argument("--timeout", type=float, default=150, help="seconds allowed per command (default 150)")
    parser.add_argument("--json", type=Path, help="where to write the results (default OUT/chain.json)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    if args.dry_run:
        for name, command in chain_commands(args.out, args):
            print(f"{name}: {shlex.join(command)}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    report = run_chain(args.out, args)
    (args.json or args.out / "chain.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
