"""Helpers shared by the benchmark scripts: machine description, timing, JSON results and text tables.

Every benchmark prints the machine and the exact command line above its table and stores both, with
the raw numbers, in a JSON file under ``benchmarks/results/`` (see :func:`default_json_path`), so a
number is never separated from how and where it was made.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's marketing name from ``/proc/cpuinfo`` (``platform.processor()`` where that is missing)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_name(device: torch.device) -> str:
    """``cpu`` or the CUDA device's name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def machine_info(threads: int, device: torch.device) -> dict[str, Any]:
    """Where the numbers come from: host, CPU, cores, library versions, torch threads and device."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "device": str(device),
        "device_name": device_name(device),
    }


def command_line() -> str:
    """The command that started this process, quoted so that it can be pasted into a shell."""
    return shlex.join([sys.executable, *sys.argv])


def describe(machine: dict[str, Any], command: str) -> str:
    """The lines printed above a result table (with the faiss version when ``machine`` has one)."""
    return "\n".join([
        f"command: {command}",
        f"machine: {machine['host']}, {machine['cpu']}, {machine['usable_cores']} usable of "
        f"{machine['logical_cores']} logical cores",
        f"software: python {machine['python']}, torch {machine['torch']}"
        + (f", faiss {machine['faiss']}" if "faiss" in machine else "") + f"; {machine['threads']} torch thread(s)",
        f"device:  {machine['device']} ({machine['device_name']})",
    ])


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a host clock measures it; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def default_json_path(benchmark: str, device: torch.device) -> Path:
    """``benchmarks/results/<benchmark>-<host>-<device type>.json``."""
    host = re.sub(r"[^A-Za-z0-9_.-]+", "_", socket.gethostname()) or "host"
    return RESULTS_DIR / f"{benchmark}-{host}-{device.type}.json"


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (paths and other objects as strings), creating the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain text columns separated by two spaces; columns whose cells are all numbers (or ``-``) align right."""
    columns = list(zip(headers, *rows, strict=True))
    widths = [max(len(cell) for cell in column) for column in columns]
    right = [all(_numeric(cell) for cell in column[1:]) for column in columns]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])


def _numeric(cell: str) -> bool:
    return cell == "-" or bool(re.fullmatch(r"[-+]?[\d.,]+(e[-+]?\d+)?x?", cell))


# ------------------------------------------------------------------------ helpers for end-to-end benchmarks


def spawn_worker(script: str | Path, spec: dict[str, Any], cwd: str | Path | None = None) -> dict[str, Any]:
    """Run ``script --worker JSON(spec)`` in a fresh interpreter; its last stdout line is read as JSON.

    A fresh process per configuration keeps one configuration's memory (allocator caches, large banks)
    and thread pools from leaking into the next. A crash is returned as ``{"error": ...}``.
    """
    proc = subprocess.run([sys.executable, str(script), "--worker", json.dumps(spec)], capture_output=True,
                          text=True, check=False, cwd=cwd)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {"error": f"worker exited with {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mib() -> float | None:
    """This process's peak resident set size so far (``VmHWM``) in MiB; None where ``/proc`` is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class TimedBatches:
    """An iterable over the first ``limit`` batches of ``source`` that times the loop consuming them.

    For batch ``i`` it records ``fetch_s[i]`` (getting the batch from ``source``: loading, transforms) and
    ``compute_s[i]`` (from handing the batch to the loop until the loop asks for the next one: the whole
    training step, logging included). CUDA work is synchronised at both boundaries. It has ``__len__`` and
    a ``sampler`` attribute (that of ``source``, or None) so a training loop treats it as its DataLoader;
    ``on_exhausted`` runs once after the last batch's step (e.g. to read the peak memory of the steps).
    """

    def __init__(self, source: Iterable[Any], limit: int, device: torch.device,
                 on_exhausted: Callable[[], None] | None = None) -> None:
        self.source = source
        self.limit = limit
        self.device = device
        self.sampler = getattr(source, "sampler", None)
        self.on_exhausted = on_exhausted
        self.fetch_s: list[float] = []
        self.compute_s: list[float] = []

    def __len__(self) -> int:
        return self.limit

    def __iter__(self) -> Iterator[Any]:
        self.fetch_s, self.compute_s = [], []
        iterator = iter(self.source)
        for _ in range(self.limit):
            synchronize(self.device)
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                break
            handed = time.perf_counter()
            self.fetch_s.append(handed - start)
            yield batch
            synchronize(self.device)
            self.compute_s.append(time.perf_counter() - handed)
        if self.on_exhausted is not None:
            self.on_exhausted()

    def step_s(self) -> list[float]:
        """Seconds per batch as a loop with in-process loading sees it: fetch + compute."""
        return [f + c for f, c in zip(self.fetch_s, self.compute_s, strict=False)]


def config_overrides(passthrough: Sequence[str], sets: Sequence[str]) -> list[str]:
    """``--section.key VALUE`` overrides from pass-through arguments and ``--set section.key=VALUE`` options."""
    overrides = list(passthrough)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {item!r}: expected section.key=VALUE, e.g. --set train.precision=bf16")
        overrides += [f"--{key.removeprefix('--')}", value]
    return overrides


PERFORMANCE_OPTIONS = ("precision", "channels_last", "compile")


def performance_options(train_config: Any) -> dict[str, Any]:
    """The speed-related ``train.*`` options this version of the config schema has, with their values.

    Options that the schema does not (yet) have are reported as ``"absent"``, so a result says exactly
    which switches existed when it was measured.
    """
    return {name: getattr(train_config, name, "absent") for name in PERFORMANCE_OPTIONS}


@contextlib.contextmanager
def patched(owner: Any, name: str, wrap: Callable[[Any], Any]) -> Iterator[Any]:
    """Replace ``owner.name`` by ``wrap(original)`` while the block runs, then restore it; yields the original.

    How the end-to-end benchmarks instrument the real code path (time a call, hand a loop a timed loader)
    without copying it. A missing attribute raises ``AttributeError`` at once: after a refactor the
    benchmark fails loudly instead of timing nothing.
    """
    original = getattr(owner, name)
    setattr(owner, name, wrap(original))
    try:
        yield original
    finally:
        setattr(owner, name, original)


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def csv_choices(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """argparse type: a non-empty comma-separated list of ``choices``."""
    allowed = list(choices)

    def parse(text: str) -> list[str]:
        values = [v for v in text.split(",") if v]
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or 'empty list'}; choose from "
                                             f"{', '.join(allowed)}")
        return values
    return parse
