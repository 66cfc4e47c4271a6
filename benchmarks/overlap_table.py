"""The label-overlap study's summary: one table and one plot of final probe accuracy against the share of the
target's classes the teacher knew, per method, from each level's `cktf compare` report (comparison.csv).

    python benchmarks/overlap_table.py 100=docs/overlap_study/overlap_100 60=... 0=... --out docs/overlap_study

Writes ``overlap_table.md`` (probe and kNN accuracy, mean ± std over seeds, per level) and ``overlap.png``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

METHOD_ORDER = ["kd", "crd", "cktf", "cktf_kd", "cktf_untrained_teacher", "teacher", "supervised_ceiling",
                "pixels", "random_init"]


def read_level(report: Path) -> dict[str, dict[str, str]]:
    """``{method: csv row}`` of one level's comparison.csv."""
    with open(report / "comparison.csv", newline="") as fh:
        return {row["method"]: row for row in csv.DictReader(fh)}


def cell(row: dict[str, str] | None, key: str) -> str:
    if row is None or not row.get(f"{key}_mean_pct"):
        return "—"
    std = row.get(f"{key}_std_pct")
    return f"{float(row[f'{key}_mean_pct']):.2f}" + (f" ± {float(std):.2f}" if std else "")


def ordered(methods: set[str]) -> list[str]:
    return sorted(methods, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))


def markdown(levels: dict[int, dict[str, dict[str, str]]]) -> str:
    methods = ordered({m for rows in levels.values() for m in rows})
    header = "| method | " + " | ".join(f"{lv} %: probe | {lv} %: kNN" for lv in levels) + " | seeds |"
    lines = [header, "|" + "---|" * (2 * len(levels) + 2)]
    for method in methods:
        cells = []
        for rows in levels.values():
            cells += [cell(rows.get(method), "final_acc"), cell(rows.get(method), "knn_acc")]
        seeds = {rows[method]["n_seeds"] for rows in levels.values() if method in rows}
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {'/'.join(sorted(seeds))} |")
    return "\n".join(lines) + "\n"


def plot(levels: dict[int, dict[str, dict[str, str]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = sorted(levels)
    for method in ordered({m for rows in levels.values() for m in rows}):
        points = [(x, levels[x][method]) for x in xs if method in levels[x] and levels[x][method]["final_acc_mean_pct"]]
        if not points:
            continue
        means = [float(r["final_acc_mean_pct"]) for _, r in points]
        stds = [float(r["final_acc_std_pct"] or 0) for _, r in points]
        style = "--" if method in ("pixels", "random_init", "supervised_ceiling", "cktf_untrained_teacher") else "-"
        ax.errorbar([x for x, _ in points], means, yerr=stds, marker="o", capsize=3, linestyle=style, label=method)
    ax.set_xlabel("share of the target's classes among the teacher's (%)")
    ax.set_ylabel("final linear-probe accuracy (%)")
    ax.set_xticks(xs)
    ax.set_title("Fashion-MNIST, 5-class target: transfer vs label overlap")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", metavar="LEVEL=DIR", help="overlap in percent = a compare report dir")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    levels = {}
    for item in args.reports:
        level, _, folder = item.partition("=")
        levels[int(level)] = read_level(Path(folder))
    levels = dict(sorted(levels.items(), reverse=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overlap_table.md").write_text(markdown(levels))
    plot(levels, args.out / "overlap.png")
    print(f"wrote {args.out / 'overlap_table.md'} and {args.out / 'overlap.png'}")


if __name__ == "__main__":
    main()
