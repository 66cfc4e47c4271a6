"""The summary of a benchmarks/gpu_check.sh run: every step's result and every number, in one file each.

Reads ``OUT/status.tsv`` (one ``step<TAB>result<TAB>seconds`` line per step, written by the script) and the
JSON files the steps wrote (``transfer_step_fp32.json``/``transfer_step_bf16.json``: ``rows``; ``sampler.json``:
``tables``; ``chain.json``: the CLI chain's commands and metrics), writes ``OUT/gpu_check.json`` and
``OUT/gpu_check.md`` and prints the Markdown. Exit status 1 when any step failed (a result other than ``ok``
or ``skipped ...``) or no step ran, else 0. No torch import: it runs wherever the steps could not.

Usage: ``python benchmarks/gpu_check_summary.py OUT``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# result file -> the key holding its table rows
TABLES = {"transfer_step_fp32": "rows", "transfer_step_bf16": "rows", "sampler": "tables"}


def read_status(out: Path) -> list[dict[str, str]]:
    """The steps of ``OUT/status.tsv`` in order (empty when the file is missing)."""
    path = out / "status.tsv"
    if not path.is_file():
        return []
    fields = ("step", "result", "seconds")
    return [dict(zip(fields, line.split("\t"), strict=False)) for line in path.read_text().splitlines() if line]


def step_failed(step: dict[str, str]) -> bool:
    result = step.get("result", "")
    return not (result == "ok" or result.startswith("skipped"))


def markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    """Rows as a Markdown table of their scalar fields (columns in first-seen order; nested values left out)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k, v in row.items() if k not in keys and not isinstance(v, (dict, list))]
    if not keys:
        return []

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value).replace("|", "/").replace("\n", " ")

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return lines + ["| " + " | ".join(cell(row.get(k)) for k in keys) + " |" for row in rows]


def chain_lines(chain: dict[str, Any]) -> list[str]:
    lines = markdown_table([{k: c.get(k) for k in ("name", "returncode", "seconds", "problem")}
                            for c in chain.get("commands", [])])
    metrics = {"teacher": ("test/acc", "train/images_per_s"), "transfer": ("train/loss_epoch", "train/images_per_s"),
               "probe": ("final_acc", "knn_acc")}
    for stage, keys in metrics.items():
        found = chain.get(stage) or {}
        found = {**found, **(found.get("final") or {})}  # teacher and transfer: the last epoch's row
        shown = ", ".join(f"{k} {found[k]:.4g}" for k in keys if isinstance(found.get(k), (int, float)))
        if shown:
            lines.append(f"- {stage}: {shown}")
    return lines


def summarise(out: Path) -> tuple[dict[str, Any], str, bool]:
    """``(report, markdown, ok)`` for the run in ``out``; ``ok`` is False when a step failed or none ran."""
    steps = read_status(out)
    report: dict[str, Any] = {"steps": steps}
    for name in (*TABLES, "chain"):
        path = out / f"{name}.json"
        if path.is_file():
            try:
                report[name] = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                report[name] = {"unreadable": str(err)}
    lines = ["| step | result | seconds |", "|---|---|---|"]
    lines += [f"| {s.get('step', '')} | {s.get('result', '')} | {s.get('seconds', '')} |" for s in steps]
    if "chain" in report:
        lines += ["", "### chain", "", *chain_lines(report["chain"])]
    for name, key in TABLES.items():
        rows = (report.get(name) or {}).get(key) or []
        table = markdown_table(rows)
        if table:
            lines += ["", f"### {name}", "", *table]
    ok = bool(steps) and not any(step_failed(s) for s in steps)
    report["ok"] = ok
    return report, "\n".join(lines) + "\n", ok


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: gpu_check_summary.py OUT", file=sys.stderr)
        return 2
    out = Path(argv[0])
    report, markdown, ok = summarise(out)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown)
    print(markdown, end="")
    failed = [s["step"] for s in report["steps"] if step_failed(s)]
    print(f"written: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    if not ok:
        print(f"gpu_check: failed steps: {', '.join(failed) or 'none ran'}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
