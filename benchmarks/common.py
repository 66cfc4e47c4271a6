"""Helpers shared by the benchmark scripts: machine description, timing, JSON results and text tables.

Every benchmark prints the machine and the exact command line above its table and stores both, with
the raw numbers, in a JSON file under ``benchmarks/results/`` (see :func:`default_json_path`), so a
number is never separated from how and where it was made.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
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
