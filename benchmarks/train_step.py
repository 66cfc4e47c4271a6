"""Training-step throughput of the registered networks under the model-side performance flags.

One step = forward, cross-entropy, backward and an SGD update of one network on a random batch, i.e. what
``cktf train-teacher`` does per batch without data loading. Variants: ``nchw`` (the default layout before
``train.channels_last``), ``channels_last`` (weights converted; inputs as the loader gives them), ``compile``
(``train.compile``: the forward through ``torch.compile``; its compile time is the first step's wall time
minus a plain step's) and ``channels_last+compile``. Variants are timed in turns, ``--rounds`` times, so a
noisy shared machine disturbs them alike; the table gives the median images/s over the rounds. On a machine
shared with other jobs, ``--clock process`` counts this process's CPU seconds instead of wall seconds (images
per CPU-second; meaningful with ``--threads 1``, where no thread waits on another).

    .venv/bin/python benchmarks/train_step.py
    .venv/bin/python benchmarks/train_step.py --models resnet8 --variants nchw,compile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

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
    synchronize,
    time_calls,
    write_json,
)
from transfer.engine.performance import compile_module, use_channels_last  # noqa: E402
from transfer.models import build_model  # noqa: E402

# (model, in_channels, image size): the fashion_split students/teachers and the paper's STL-10 pair
DEFAULT_CASES = "resnet8:1:28,resnet14:1:28,vgg8:3:64,vgg19:3:64"
VARIANTS = ("nchw", "channels_last", "compile")


@dataclass
class Case:
    model: str
    in_channels: int
    size: int


def parse_cases(text: str) -> list[Case]:
    cases = []
    for item in text.split(","):
        name, channels, size = item.split(":")
        cases.append(Case(name, int(channels), int(size)))
    return cases


def make_step(case: Case, variant: str, batch: int, device: torch.device) -> Callable[[], None]:
    """A closure running one SGD step of a fresh network (same initialisation for every variant)."""
    torch.manual_seed(0)
    model = build_model(case.model, in_channels=case.in_channels, num_classes=10).to(device)
    flags = set(variant.split("+"))
    if "channels_last" in flags:
        use_channels_last(model)
    if "compile" in flags:
        compile_module(model, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, case.in_channels, case.size, case.size, device=device)
    targets = torch.randint(0, 10, (batch,), device=device)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), targets).backward()
        optimizer.step()

    return step


def process_times(step: Callable[[], None], repeats: int) -> list[float]:
    """CPU seconds of this process per call (after one untimed call), for machines shared with other jobs."""
    step()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, help="model:in_channels:size,… (default: %(default)s)")
    parser.add_argument("--models", default=None, help="only these models of --cases (comma-separated)")
    parser.add_argument("--variants", default="nchw,channels_last",
                        help=f"comma-separated of {', '.join(VARIANTS)}; join flags with + (channels_last+compile)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="wall seconds, or this process's CPU seconds (robust to other jobs on the machine)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = parse_cases(args.cases)
    if args.models:
        wanted = set(args.models.split(","))
        cases = [c for c in cases if c.model in wanted]
    variants = args.variants.split(",")
    machine = machine_info(args.threads, device)
    print(describe(machine, command_line()))

    rows, results = [], []
    for case in cases:
        steps = {}
        first_step_s = {}
        for variant in variants:
            steps[variant] = make_step(case, variant, args.batch, device)
            start = time.perf_counter()
            steps[variant]()
            synchronize(device)
            first_step_s[variant] = time.perf_counter() - start
        rates: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for variant in variants:
                if args.clock == "wall":
                    times = time_calls(steps[variant], args.steps, warmup=1, device=device)
                else:
                    times = process_times(steps[variant], args.steps)
                rates[variant].append(args.batch / median(times))
        base = median(rates[variants[0]])
        for variant in variants:
            rate = median(rates[variant])
            spread = statistics.pstdev(rates[variant]) / rate
            compile_s = first_step_s[variant] - args.batch / rate if "compile" in variant else None
            results.append({"model": case.model, "in_channels": case.in_channels, "size": case.size,
                            "batch": args.batch, "variant": variant, "clock": args.clock, "images_per_s": rate,
                            "rounds": rates[variant], "spread": spread, "first_step_s": first_step_s[variant],
                            "compile_s": compile_s})
            rows.append([case.model, f"{case.in_channels}x{case.size}x{case.size}", variant, f"{rate:.0f}",
                         f"{100 * spread:.0f}%", f"{rate / base:.2f}x",
                         "-" if compile_s is None else f"{compile_s:.1f}"])
            print("  ".join(rows[-1]), flush=True)
    unit = "img/s" if args.clock == "wall" else "img/cpu-s"
    print(format_table(["model", "input", "variant", unit, "spread", f"vs {variants[0]}", "compile s"], rows))
    path = args.json or default_json_path("train_step", device)
    write_json(path, {"machine": machine, "command": command_line(), "results": results})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
