"""The paper's Table 1/Table 2 view of a compression study: baselines, then each method X alone next to CKTF+X.

Reads the ``comparison.csv`` that ``cktf compare`` wrote over labeled transfer runs (methods named ``X`` and
``cktf_X``) and, optionally, the teacher's ``metrics.json``; prints a Markdown table of last-epoch and
best-validation-epoch test accuracy. Used by ``benchmarks/compression_table.sh``.

    python benchmarks/paired_table.py docs/fashion_labeled/comparison.csv RUNS/fashion_labeled_teacher/metrics.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

PREFIX = "cktf_"


def cell(row: dict[str, str] | None, key: str) -> str:
    """``mean ± std`` (or ``mean`` for one seed) of a percentage column; ``—`` when absent."""
    if row is None or not row[f"{key}_mean_pct"]:
        return "—"
    mean, std = float(row[f"{key}_mean_pct"]), row[f"{key}_std_pct"]
    return f"{mean:.2f} ± {float(std):.2f}" if std else f"{mean:.2f}"


def delta(base: dict[str, str] | None, combined: dict[str, str] | None, key: str) -> str:
    if base is None or combined is None or not base[f"{key}_mean_pct"] or not combined[f"{key}_mean_pct"]:
        return "—"
    return f"{float(combined[f'{key}_mean_pct']) - float(base[f'{key}_mean_pct']):+.2f}"


def render(rows: list[dict[str, str]], teacher: dict | None) -> str:
    """The Markdown text: one table of the rows without a CKTF+X partner, one of the X / CKTF+X pairs."""
    by_method = {row["method"]: row for row in rows}
    paired = [m for m in by_method if PREFIX + m in by_method]
    partners = {PREFIX + m for m in paired}
    lines = ["| method | seeds | last-epoch test acc (%) | best-val-epoch test acc (%) |", "|---|---|---|---|"]
    if teacher is not None:
        acc = teacher["final"]["test/acc"] * 100
        best = teacher.get("best", {}).get("test/acc")
        best_text = "—" if best is None else f"{best * 100:.2f}"
        lines.append(f"| teacher ({teacher['model']}, {teacher['epochs']} epochs) | 1 | {acc:.2f} | {best_text} |")
    for method, row in by_method.items():
        if method not in paired and method not in partners:
            lines.append(f"| {method} | {row['n_seeds']} | {cell(row, 'final_acc')} | "
                         f"{cell(row, 'test_acc_at_best')} |")
    lines += ["", "| X | X alone | CKTF+X | Δ last epoch | X alone, best val | CKTF+X, best val | Δ best val |",
              "|---|---|---|---|---|---|---|"]
    for method in paired:
        alone, combined = by_method[method], by_method[PREFIX + method]
        lines.append(f"| {method} | {cell(alone, 'final_acc')} | {cell(combined, 'final_acc')} | "
                     f"{delta(alone, combined, 'final_acc')} | {cell(alone, 'test_acc_at_best')} | "
                     f"{cell(combined, 'test_acc_at_best')} | {delta(alone, combined, 'test_acc_at_best')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comparison", type=Path, help="comparison.csv written by cktf compare")
    parser.add_argument("teacher", type=Path, nargs="?", help="the teacher run's metrics.json")
    args = parser.parse_args()
    with args.comparison.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    teacher = json.loads(args.teacher.read_text()) if args.teacher else None
    print(render(rows, teacher), end="")


if __name__ == "__main__":
    main()
