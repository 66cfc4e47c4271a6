"""Benchmark of negative sampling: faiss neighbour-table builds and the time to draw a batch of negatives.

(i) Neighbour tables (``--parts tables``): ``build_neighbour_table(features, k)`` on ``N × C`` features
(default 100 000 × 512, k=32) with ``index="flat"`` (exact; ~1 min at full size on 2 cores, ``--skip-flat``
leaves it out) and ``index="ivf"`` for every ``--nprobe`` (default nlist ``round(4·sqrt(N))``). Columns:

* ``build s``: wall time of the whole ``build_neighbour_table`` call (IVF: training, adding, searching).
* ``recall@k``: mean over a random subset of ``--recall-rows`` rows (at most 2000) of the fraction of
  the exact k nearest other items (cosine, brute force with torch on that subset, i.e. what the flat
  index returns for those rows) that the table holds. The flat row, ≈1, checks that reference.

Features: by default synthetic clustered ones, a mixture of 100 Gaussians in C dims (centres and points
``N(0, I)`` around them, seeded by ``--seed``). ``--features PATH`` loads the tensor ``features`` [N, C] of
a ``.safetensors`` file instead (``--items``/``--dim`` then come from the file), e.g. a teacher's
penultimate features of the unlabeled pool, written by::

    import torch
    from safetensors.torch import save_file
    from transfer.data import build_dataset
    from transfer.data.transforms import build_transform
    from transfer.models import FeatureTaps, TapSpec, tap_spec_for
    from transfer.models.checkpoints import freeze, load_network
    from transfer.stages.transfer import embed_pool

    net = load_network("runs/teacher/best.safetensors", prefix="model.", kinds=("teacher",), option="teacher")
    spec = TapSpec.from_dict(net.taps) if net.taps else tap_spec_for(net.name, net.model)
    teacher = FeatureTaps(freeze(net.model), spec)
    pool = build_dataset("stl10", "unlabeled", "data/stl10", build_transform("stl10", train=False))
    features = embed_pool(teacher, pool, batch_size=256, device=torch.device("cpu"), workers=4)
    save_file({"features": features.contiguous()}, "teacher-features.safetensors")

(ii) Draws (``--parts draws``): time per batch of negatives of each sampler mode, ``uniform`` ([B, K]),
``uniform shared`` ([K] for the batch), ``debiased`` and ``hard`` (exclude 32, hard pool 64, hard
fraction 0.1: the defaults), at B=64, K=16384 over the same N (median of ``--draws`` draws after 3
warm-ups, on ``--device``). The debiased and hard samplers get a table of the width they need (32 and
96 columns); it is a *random* valid table (distinct indices, never the row's own), which costs the same
to sample from as a real one. Columns: ``setup s`` (building the sampler from the table), ``median ms``
per draw, ``M neg/s`` (negatives per draw, B·K or K when shared, / median).

Run (from the repository root)::

    .venv/bin/python benchmarks/sampler.py                          # full size, flat and IVF
    .venv/bin/python benchmarks/sampler.py --skip-flat --nprobe 8,16,32
    .venv/bin/python benchmarks/sampler.py --features teacher-features.safetensors
    .venv/bin/python benchmarks/sampler.py --items 2000 --dim 16 --k 4 --negatives 64 --draws 5

faiss runs on ``--threads`` CPU threads (or its GPUs when faiss has GPU support). Results go to ``--json``
(default ``benchmarks/results/sampler-<host>-<device>.json``) with the machine and the command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

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
    time_calls,
    write_json,
)
from transfer.sampling import build_neighbour_table, build_sampler, default_nlist  # noqa: E402

PARTS = ("tables", "draws")
COMPONENTS = 100
MAX_RECALL_ROWS = 2000
EXCLUDE, HARD_POOL, HARD_FRACTION = 32, 64, 0.1
DRAW_WARMUP = 3


# ------------------------------------------------------------------------------------------ neighbour tables


def clustered_features(items: int, dim: int, seed: int) -> Tensor:
    """``items`` points of a seeded mixture of ``COMPONENTS`` unit-variance Gaussians with ``N(0, I)`` centres."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(COMPONENTS, dim, generator=gen)
    labels = torch.randint(0, COMPONENTS, (items,), generator=gen)
    return centres[labels].add_(torch.randn(items, dim, generator=gen))


def load_features(path: Path) -> Tensor:
    """The ``features`` tensor ``[N, C]`` of a ``.safetensors`` file, as float32."""
    tensors = load_file(str(path))
    if "features" not in tensors or tensors["features"].dim() != 2:
        raise SystemExit(f"{path}: expected a 2-D tensor named 'features'; found {', '.join(tensors) or 'nothing'}")
    return tensors["features"].float()


def exact_neighbours(features: Tensor, rows: Tensor, k: int, chunk: int = 256) -> Tensor:
    """The ``k`` nearest other items (cosine) of each of ``rows``, by brute force: ``[len(rows), k]``."""
    x = F.normalize(features.float(), dim=1)
    out = []
    for start in range(0, rows.numel(), chunk):
        queries = rows[start:start + chunk]
        sims = x[queries] @ x.T
        sims[torch.arange(queries.numel()), queries] = float("-inf")
        out.append(sims.topk(k, dim=1).indices)
    return torch.cat(out)


def recall_at_k(found: Tensor, truth: Tensor) -> float:
    """Mean fraction of each row of ``truth`` present in the same row of ``found``."""
    hits = (found[:, :, None] == truth[:, None, :]).any(dim=1)
    return hits.float().mean().item()


def bench_tables(features: Tensor, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Flat (unless skipped) and IVF builds with their build time and recall@k."""
    items = features.shape[0]
    rows = torch.randperm(items, generator=torch.Generator().manual_seed(args.seed))[:args.recall_rows]
    truth = exact_neighbours(features, rows, args.k)
    nlist = args.nlist or default_nlist(items)
    settings = [] if args.skip_flat else [{"index": "flat", "nlist": None, "nprobe": None}]
    settings += [{"index": "ivf", "nlist": nlist, "nprobe": nprobe} for nprobe in args.nprobe]
    results = []
    for setting in settings:
        options = {"nlist": setting["nlist"], "nprobe": setting["nprobe"]} if setting["index"] == "ivf" else {}
        start = time.perf_counter()
        table = build_neighbour_table(features, args.k, index=setting["index"], **options)
        build_s = time.perf_counter() - start
        results.append({**setting, "items": items, "dim": features.shape[1], "k": args.k, "build_s": build_s,
                        "recall": recall_at_k(table[rows], truth), "recall_rows": rows.numel()})
        label = setting["index"] if setting["nprobe"] is None else f"ivf nprobe={setting['nprobe']}"
        print(f"  {label}: built in {build_s:.2f} s", file=sys.stderr, flush=True)
    return results


def table_cells(row: dict[str, Any]) -> list[str]:
    return [row["index"], str(row["items"]), str(row["dim"]), str(row["k"]), str(row["nlist"] or "-"),
            str(row["nprobe"] or "-"), f"{row['build_s']:.2f}", f"{row['recall']:.4f}"]


# --------------------------------------------------------------------------------------------------- draws


def random_table(items: int, width: int, seed: int) -> Tensor:
    """A valid random neighbour table ``[items, width]``: distinct indices per row, never the row's own.

    Row ``i`` holds ``i + o`` (mod ``items``) for ``width`` distinct random offsets ``o`` in ``[1, 2·width]``.
    """
    window = min(2 * width, items - 1)
    scores = torch.rand(items, window, generator=torch.Generator().manual_seed(seed))
    offsets = scores.topk(width, dim=1).indices + 1
    return (torch.arange(items)[:, None] + offsets) % items


def bench_draws(items: int, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Median time per drawn batch of every sampler mode (uniform, uniform shared, debiased, hard)."""
    modes = [("uniform", "uniform", False, 0), ("uniform shared", "uniform", True, 0),
             ("debiased", "debiased", False, EXCLUDE), ("hard", "hard", False, EXCLUDE + HARD_POOL)]
    torch.manual_seed(args.seed)
    anchors = torch.randperm(items)[:args.batch].to(device)
    results = []
    for name, kind, shared, width in modes:
        table = random_table(items, width, args.seed) if width else None
        start = time.perf_counter()
        sampler = build_sampler(kind, items, args.negatives, table, exclude=EXCLUDE, hard_fraction=HARD_FRACTION,
                                hard_pool=HARD_POOL, shared=shared).to(device)
        setup_s = time.perf_counter() - start
        times = time_calls(lambda s=sampler: s(anchors), args.draws, DRAW_WARMUP, device)
        drawn = args.negatives * (1 if shared else args.batch)
        results.append({"mode": name, "batch": args.batch, "negatives": args.negatives, "items": items,
                        "table_width": width, "setup_s": setup_s, "times_s": times, "median_s": median(times),
                        "negatives_per_s": drawn / median(times)})
    return results


def draw_cells(row: dict[str, Any]) -> list[str]:
    return [row["mode"], str(row["batch"]), str(row["negatives"]), str(row["items"]), str(row["table_width"] or "-"),
            f"{row['setup_s']:.3f}", f"{row['median_s'] * 1e3:.2f}", f"{row['negatives_per_s'] / 1e6:.1f}"]


# ---------------------------------------------------------------------------------------------------- main


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    parser.add_argument("--items", type=int, default=100_000, help="N (synthetic features and the draws)")
    parser.add_argument("--dim", type=int, default=512, help="C of the synthetic features")
    parser.add_argument("--features", type=Path, help=".safetensors file with a 'features' [N, C] tensor")
    parser.add_argument("--k", type=int, default=32, help="neighbours per item in the tables")
    parser.add_argument("--nlist", type=int, help="IVF lists (default round(4*sqrt(N)))")
    parser.add_argument("--nprobe", type=int_list, default=[16], help="comma-separated IVF nprobe values")
    parser.add_argument("--skip-flat", action="store_true", help="leave out the exact flat build")
    parser.add_argument("--recall-rows", type=int, default=MAX_RECALL_ROWS, help=f"at most {MAX_RECALL_ROWS}")
    parser.add_argument("--batch", type=int, default=64, help="B of the draws")
    parser.add_argument("--negatives", type=int, default=16384, help="K of the draws")
    parser.add_argument("--draws", type=int, default=30, help="timed draws per mode")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and faiss threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device of the draws")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path,
                        help="result file (default benchmarks/results/sampler-<host>-<device>.json)")
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if not 1 <= args.recall_rows <= MAX_RECALL_ROWS:
        parser.error(f"--recall-rows must be between 1 and {MAX_RECALL_ROWS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = {**machine_info(args.threads, device), "faiss": faiss.__version__}
    command, parts = command_line(), args.parts.split(",")
    print(describe(machine, command), flush=True)
    features = load_features(args.features) if args.features else clustered_features(args.items, args.dim, args.seed)
    source = str(args.features) if args.features else f"clustered ({COMPONENTS}-component Gaussian mixture)"
    items = features.shape[0]
    payload: dict[str, Any] = {"benchmark": "sampler", "machine": machine, "command": command, "args": vars(args),
                               "features": source}

    if "tables" in parts:
        payload["tables"] = bench_tables(features, args)
        print(f"\nneighbour tables, features: {source}")
        print(format_table(["index", "N", "C", "k", "nlist", "nprobe", "build s", "recall@k"],
                           [table_cells(r) for r in payload["tables"]]))
        print(f"recall@k: exact neighbours of {min(args.recall_rows, items)} random rows found by the table.")
    if "draws" in parts:
        payload["draws"] = bench_draws(items, args, device)
        print(f"\nnegative draws (median of {args.draws}; debiased/hard use random valid tables of the width shown)")
        print(format_table(["mode", "B", "K", "N", "table width", "setup s", "median ms", "M neg/s"],
                           [draw_cells(r) for r in payload["draws"]]))
    print(f"\nresults: {write_json(args.json or default_json_path('sampler', device), payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
