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
a ``.safetensors`` file instead (``--items``/``--dim`` then come from the file). ``--features
teacher:CHECKPOINT`` embeds the unlabeled pool of the transfer config ``--config`` (default
``configs/fashion_split/crd.yaml``: fashion_split's 30 000 ``target_unlabeled`` images) with that teacher's
penultimate features, through the transfer stage's own path (``load_network``, ``FeatureTaps``, the eval
transform, ``embed_pool``), i.e. exactly the features ``cktf transfer`` builds its neighbour table from;
``--set section.key=VALUE`` overrides a key of that config (e.g. ``--set data.root=DIR``).

(ii) Draws (``--parts draws``): time per batch of negatives of each sampler mode, ``uniform`` ([B, K]),
``uniform shared`` ([K] for the batch), ``debiased`` and ``hard`` (exclude 32, hard pool 64, hard
fraction 0.1: the defaults), at B=64, K=16384 over the same N (median of ``--draws`` draws after 3
warm-ups, on ``--device``). The debiased and hard samplers get a table of the width they need (32 and
96 columns); it is a *random* valid table (distinct indices, never the row's own), which costs the same
to sample from as a real one. Columns: ``setup s`` (building the sampler from the table), ``median ms``
per draw, ``M neg/s`` (negatives per draw, B·K or K when shared, / median).

(iii) Scaling (``--parts scaling``, not in the default parts): what grows with the pool size N_d, for
``--scaling-items`` (measured, default 10^5 and 10^6) and ``--scaling-estimate`` (extrapolated, default 10^7):

* memory of the memory banks, 2 banks x ``--objectives`` (6, CKTF) x N_d x d=128, in fp32 and fp16
  (computed), and of the teacher features ``N_d x C`` fp32 and the int64 neighbour table ``N_d x k``;
* ``GEMM ms``: one full-bank scoring GEMM of the per-anchor path, ``[B, d] @ [d, N_d]`` forward plus the
  ``[B, N_d] @ [N_d, d]`` backward (B=``--batch``, fp32), and ``GEMM step ms`` = that x 2 sides x objectives;
* ``NCE step ms``: the real per-anchor objective (``NCEObjective`` with its heads, K=``--negatives``: scoring,
  loss, backward, bank update; ``benchmarks/nce.py``'s ``fast`` path) for one objective, x objectives;
* ``IVF s`` / ``flat s``: ``build_neighbour_table`` on N_d x C clustered features (IVF at the first
  ``--nprobe``; flat only up to ``--scaling-flat-max`` items, ~N_d^2) with recall@k on ``--recall-rows``.

Sizes that are not measured (or need more than 80 % of the free memory) are extrapolated as ``t ~ N^p`` from
the largest measured size and marked ``est.``; ``p`` (printed) is the log-log slope of the two largest
measured sizes, or where only one was measured the model exponent: 1 for the GEMMs and the NCE step (they
read the whole bank), 1.5 for IVF (N queries, each scanning N/nlist ~ sqrt(N) vectors), 2 for flat. Full
size takes ~15-20 min on 2 cores, most of it the IVF build at 10^6.

Run (from the repository root)::

    .venv/bin/python benchmarks/sampler.py                          # full size, flat and IVF
    .venv/bin/python benchmarks/sampler.py --skip-flat --nprobe 8,16,32
    .venv/bin/python benchmarks/sampler.py --features teacher-features.safetensors
    .venv/bin/python benchmarks/sampler.py --features teacher:runs/fashion_teacher/best.safetensors \\
        --config configs/fashion_split/crd.yaml --parts tables --nprobe 1,4,16,64
    .venv/bin/python benchmarks/sampler.py --parts scaling --json benchmarks/results/sampler-scaling.json
    .venv/bin/python benchmarks/sampler.py --items 2000 --dim 16 --k 4 --negatives 64 --draws 5

faiss runs on ``--threads`` CPU threads (or its GPUs when faiss has GPU support). Results go to ``--json``
(default ``benchmarks/results/sampler-<host>-<device>.json``) with the machine and the command.
"""

from __future__ import annotations

import argparse
import math
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
    config_overrides,
    default_json_path,
    describe,
    format_table,
    machine_info,
    median,
    time_calls,
    write_json,
)
from transfer.config import TransferConfig, load_config  # noqa: E402
from transfer.data import build_dataset  # noqa: E402
from transfer.data.transforms import build_transform  # noqa: E402
from transfer.engine.frozen import Frozen  # noqa: E402
from transfer.models import FeatureTaps, TapSpec, tap_spec_for  # noqa: E402
from transfer.models.checkpoints import load_network  # noqa: E402
from transfer.sampling import build_neighbour_table, build_sampler, default_nlist  # noqa: E402
from transfer.stages.transfer import embed_pool  # noqa: E402

PARTS = ("tables", "draws", "scaling")
DEFAULT_PARTS = ("tables", "draws")
TEACHER_PREFIX = "teacher:"
DEFAULT_POOL_CONFIG = ROOT / "configs/fashion_split/crd.yaml"
EMBED_DIM = 128
MEMORY_FRACTION = 0.8
GIB = 2**30
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


def teacher_features(checkpoint: Path, config: Path, overrides: list[str], device: torch.device) -> Tensor:
    """Penultimate features of the transfer config's unlabeled pool under ``checkpoint``'s teacher, ``[N, C]``.

    The transfer stage's path: the teacher rebuilt from its file, its feature taps, the pool with the eval
    transform and ``embed_pool`` (what ``cktf transfer`` hands to ``build_neighbour_table``).
    """
    cfg = load_config(config, TransferConfig, ["--teacher.checkpoint", str(checkpoint), *overrides])
    net = load_network(checkpoint, prefix="model.", kinds=("teacher",), option="--features teacher:")
    taps = cfg.teacher.taps or net.taps
    spec = TapSpec.from_dict(taps, option="teacher.taps") if taps else tap_spec_for(net.name, net.model)
    teacher = Frozen(FeatureTaps(net.model, spec))
    eval_tf = build_transform(cfg.data.name, train=False, image_size=cfg.data.image_size)
    pool = build_dataset(cfg.data.name, cfg.data.train_split, cfg.data.root, eval_tf, **cfg.data.options)
    return embed_pool(teacher.to(device), pool, cfg.train.eval_batch_size, device, cfg.data.num_workers)


def feature_source(args: argparse.Namespace, device: torch.device) -> tuple[Tensor, str, dict[str, Any]]:
    """The features of ``--features`` (teacher:CHECKPOINT, a file, or synthetic), their label and timings."""
    if args.features is None:
        return (clustered_features(args.items, args.dim, args.seed),
                f"clustered ({COMPONENTS}-component Gaussian mixture)", {})
    if args.features.startswith(TEACHER_PREFIX):
        checkpoint = Path(args.features[len(TEACHER_PREFIX):])
        config = args.config or DEFAULT_POOL_CONFIG
        start = time.perf_counter()
        features = teacher_features(checkpoint, config, config_overrides([], args.set), device)
        info = {"teacher": str(checkpoint), "pool_config": str(config), "embed_s": time.perf_counter() - start}
        print(f"  embedded {features.shape[0]} pool items with {checkpoint} in {info['embed_s']:.1f} s",
              file=sys.stderr, flush=True)
        return features, f"teacher {checkpoint} on the pool of {config}", info
    return load_features(Path(args.features)), args.features, {}


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


# ------------------------------------------------------------------------------------------------- scaling


def grown_memory(items: int, objectives: int, dim: int, k: int) -> dict[str, float]:
    """GiB that grow with N_d: the banks (fp32 and fp16), teacher features (fp32), the neighbour table (int64)."""
    banks = 2 * objectives * items * EMBED_DIM
    return {"banks_fp32_gib": banks * 4 / GIB, "banks_fp16_gib": banks * 2 / GIB,
            "features_gib": items * dim * 4 / GIB, "table_gib": items * k * 8 / GIB}


def measure_gemms(items: int, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """Median seconds of one side's full-bank scoring GEMM ``[B, d] @ [d, N]`` and of its backward GEMM."""
    gen = torch.Generator(device).manual_seed(args.seed)
    bank = F.normalize(torch.randn(items, EMBED_DIM, device=device, generator=gen), dim=1)
    anchors = F.normalize(torch.randn(args.batch, EMBED_DIM, device=device, generator=gen), dim=1)
    grad_scores = torch.randn(args.batch, items, device=device, generator=gen)
    forward = median(time_calls(lambda: anchors @ bank.T, args.scaling_repeats, 1, device))
    backward = median(time_calls(lambda: grad_scores @ bank, args.scaling_repeats, 1, device))
    return forward, backward


def measure_scoring(items: int, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """The full-bank scoring GEMMs and the real per-anchor NCE step of one objective."""
    from benchmarks.nce import Size, TrainingStep

    forward, backward = measure_gemms(items, args, device)
    step = TrainingStep("fast", Size(args.batch, min(args.negatives, items - 1), items), 1, device, args.seed)
    nce = median(time_calls(step, args.scaling_repeats, 2, device))
    return {"gemm_fwd_s": forward, "gemm_bwd_s": backward,
            "gemm_step_s": 2 * args.objectives * (forward + backward), "nce_objective_s": nce,
            "nce_step_s": args.objectives * nce}


def measure_table_builds(items: int, args: argparse.Namespace) -> dict[str, float]:
    """IVF (and, up to ``--scaling-flat-max`` items, flat) neighbour-table builds on clustered features."""
    features = clustered_features(items, args.dim, args.seed)
    rows = torch.randperm(items, generator=torch.Generator().manual_seed(args.seed))[:args.recall_rows]
    truth = exact_neighbours(features, rows, args.k)
    out: dict[str, float] = {}
    for kind in ["ivf"] + (["flat"] if items <= args.scaling_flat_max else []):
        options = {"nlist": args.nlist or default_nlist(items), "nprobe": args.nprobe[0]} if kind == "ivf" else {}
        start = time.perf_counter()
        table = build_neighbour_table(features, args.k, index=kind, **options)
        out[f"{kind}_s"] = time.perf_counter() - start
        out[f"{kind}_recall"] = recall_at_k(table[rows], truth)
        print(f"  scaling N={items}: {kind} table in {out[f'{kind}_s']:.1f} s", file=sys.stderr, flush=True)
    return out


# t ~ N^p assumed where fewer than two sizes were measured: GEMMs and the NCE step read the whole bank (N);
# IVF with nlist ~ sqrt(N) scans N/nlist ~ sqrt(N) vectors for each of N queries; flat compares all pairs
MODEL_EXPONENTS = {"gemm_fwd_s": 1.0, "gemm_bwd_s": 1.0, "gemm_step_s": 1.0, "nce_objective_s": 1.0,
                   "nce_step_s": 1.0, "ivf_s": 1.5, "flat_s": 2.0}


def extrapolate(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Fill each missing time of :data:`MODEL_EXPONENTS` as ``t ~ N^p`` from the largest measured size.

    ``p`` is the log-log slope between the two largest sizes that measured the quantity, or the model
    exponent of :data:`MODEL_EXPONENTS` where only one did. Filled keys are listed in the row's
    ``estimated``; returns ``{quantity: {"exponent": p, "source": "measured slope" | "model"}}``.
    """
    exponents: dict[str, dict[str, Any]] = {}
    for key, model in MODEL_EXPONENTS.items():
        known = sorted((row["items"], row[key]) for row in rows if row.get(key) is not None)
        if not known:
            continue
        n2, t2 = known[-1]
        if len(known) >= 2:
            n1, t1 = known[-2]
            exponents[key] = {"exponent": math.log(t2 / t1) / math.log(n2 / n1), "source": "measured slope"}
        else:
            exponents[key] = {"exponent": model, "source": "model"}
        for row in rows:
            if row.get(key) is None:
                row[key] = t2 * (row["items"] / n2) ** exponents[key]["exponent"]
                row["estimated"].append(key)
    return exponents


def available_memory(device: torch.device) -> int:
    from benchmarks.nce import available_bytes

    return available_bytes(device)


def bench_scaling(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Memory (computed) and GEMM, NCE-step and table-build times (measured or extrapolated) per N_d."""
    rows = []
    for items in sorted(set(args.scaling_items) | set(args.scaling_estimate)):
        row: dict[str, Any] = {"items": items, **grown_memory(items, args.objectives, args.dim, args.k),
                               "estimated": [], "skipped": None}
        if items in args.scaling_items:
            # the GEMMs' bank, scores and gradient plus the NCE banks (on --device); the table builds'
            # features, their normalised copy, faiss' copy and the exact reference (in host memory)
            needs = [(3 * items * EMBED_DIM * 4 + 3 * args.batch * items * 4, device),
                     (4 * items * args.dim * 4, torch.device("cpu"))]
            short = [(need, where, available_memory(where)) for need, where in needs
                     if need > MEMORY_FRACTION * available_memory(where)]
            if short:
                need, where, free = short[0]
                row["skipped"] = f"needs ~{need / GIB:.1f} GiB on {where}, {free / GIB:.1f} GiB available"
            else:
                row.update(measure_scoring(items, args, device))
                row.update(measure_table_builds(items, args))
        rows.append(row)
    exponents = extrapolate(rows)
    return {"rows": rows, "exponents": exponents, "objectives": args.objectives, "batch": args.batch,
            "negatives": args.negatives, "embed_dim": EMBED_DIM, "feature_dim": args.dim, "k": args.k,
            "nprobe": args.nprobe[0], "flat_max": args.scaling_flat_max}


def scaled_cell(row: dict[str, Any], key: str, scale: float, digits: int) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    return f"{value * scale:.{digits}f}" + (" est." if key in row["estimated"] else "")


def scaling_cells(row: dict[str, Any]) -> list[str]:
    recall = row.get("ivf_recall")
    return [f"{row['items']:.0e}".replace("e+0", "e"), f"{row['banks_fp32_gib']:.2f}",
            f"{row['banks_fp16_gib']:.2f}", f"{row['features_gib']:.2f}", f"{row['table_gib']:.2f}",
            scaled_cell(row, "gemm_fwd_s", 1e3, 1), scaled_cell(row, "gemm_bwd_s", 1e3, 1),
            scaled_cell(row, "gemm_step_s", 1e3, 0), scaled_cell(row, "nce_step_s", 1e3, 0),
            scaled_cell(row, "ivf_s", 1, 1), "-" if recall is None else f"{recall:.4f}",
            scaled_cell(row, "flat_s", 1, 1)]


SCALING_HEADERS = ["N_d", "banks fp32 GiB", "banks fp16 GiB", "features GiB", "table GiB", "GEMM fwd ms",
                   "GEMM bwd ms", "GEMM step ms", "NCE step ms", "IVF s", "IVF recall", "flat s"]


def print_scaling(scaling: dict[str, Any]) -> None:
    print(f"\nscaling with N_d: {scaling['objectives']} objectives x 2 banks x d={EMBED_DIM}; GEMM and NCE at "
          f"B={scaling['batch']}, K={scaling['negatives']}; tables on N_d x {scaling['feature_dim']} clustered "
          f"features, k={scaling['k']}, IVF nprobe={scaling['nprobe']}, flat measured up to {scaling['flat_max']}")
    print(format_table(SCALING_HEADERS, [scaling_cells(row) for row in scaling["rows"]]))
    for row in scaling["rows"]:
        if row["skipped"]:
            print(f"N_d={row['items']}: not measured, {row['skipped']}")
    slopes = ", ".join(f"{key.removesuffix('_s')} {p['exponent']:.2f}" + (" (model)" if p["source"] == "model" else "")
                       for key, p in scaling["exponents"].items())
    print(f"est. = extrapolated as t ~ N^p from the largest measured size, p = the log-log slope of the two largest "
          f"measured sizes, or the model exponent where only one was measured: {slopes or 'none'}.")
    print("GEMM fwd/bwd: one side of one objective; GEMM step = (fwd + bwd) x 2 sides x objectives; NCE step = one "
          "objective's real per-anchor step (heads, scoring, loss, backward, bank update) x objectives.")


# ---------------------------------------------------------------------------------------------------- main


def int_list(text: str) -> list[int]:
    """Comma-separated integers; ``1e6`` is accepted."""
    return [int(float(v)) for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS), help="comma-separated: " + ", ".join(PARTS))
    parser.add_argument("--items", type=int, default=100_000, help="N (synthetic features and the draws)")
    parser.add_argument("--dim", type=int, default=512, help="C of the synthetic features (tables and scaling)")
    parser.add_argument("--features", help="a .safetensors file with a 'features' [N, C] tensor, or "
                        "teacher:CHECKPOINT (the pool of --config embedded by that teacher)")
    parser.add_argument("--config", type=Path, help="transfer config whose pool --features teacher:CHECKPOINT "
                        f"embeds (default {DEFAULT_POOL_CONFIG.relative_to(ROOT)})")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a key of --config (e.g. data.root=DIR), repeatable")
    parser.add_argument("--k", type=int, default=32, help="neighbours per item in the tables")
    parser.add_argument("--nlist", type=int, help="IVF lists (default round(4*sqrt(N)))")
    parser.add_argument("--nprobe", type=int_list, default=[16], help="comma-separated IVF nprobe values "
                        "(scaling: the first)")
    parser.add_argument("--skip-flat", action="store_true", help="leave out the exact flat build")
    parser.add_argument("--recall-rows", type=int, default=MAX_RECALL_ROWS, help=f"at most {MAX_RECALL_ROWS}")
    parser.add_argument("--batch", type=int, default=64, help="B of the draws and of the scaling GEMMs")
    parser.add_argument("--negatives", type=int, default=16384, help="K of the draws and of the scaling NCE step")
    parser.add_argument("--draws", type=int, default=30, help="timed draws per mode")
    parser.add_argument("--scaling-items", type=int_list, default=[100_000, 1_000_000],
                        help="scaling: measured N_d values, comma-separated")
    parser.add_argument("--scaling-estimate", type=int_list, default=[10_000_000],
                        help="scaling: N_d values that are only extrapolated")
    parser.add_argument("--scaling-flat-max", type=int, default=100_000,
                        help="scaling: largest N_d whose exact (flat) table build is measured")
    parser.add_argument("--scaling-repeats", type=int, default=5, help="scaling: timed GEMMs and NCE steps per size")
    parser.add_argument("--objectives", type=int, default=6, help="scaling: contrastive objectives (CKTF: 6)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and faiss threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device of the draws, the teacher's embedding and the scaling GEMMs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path,
                        help="result file (default benchmarks/results/sampler-<host>-<device>.json)")
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if (args.config is not None or args.set) and not (args.features or "").startswith(TEACHER_PREFIX):
        parser.error("--config and --set only apply with --features teacher:CHECKPOINT")
    if not 1 <= args.recall_rows <= MAX_RECALL_ROWS:
        parser.error(f"--recall-rows must be between 1 and {MAX_RECALL_ROWS}")
    if min(args.scaling_items + args.scaling_estimate, default=2) < 2:
        parser.error("--scaling-items and --scaling-estimate must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = {**machine_info(args.threads, device), "faiss": faiss.__version__}
    command, parts = command_line(), args.parts.split(",")
    print(describe(machine, command), flush=True)
    payload: dict[str, Any] = {"benchmark": "sampler", "machine": machine, "command": command, "args": vars(args)}

    if "tables" in parts or "draws" in parts:
        features, source, info = feature_source(args, device)
        items = features.shape[0]
        payload.update(features=source, features_shape=list(features.shape), **info)
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
    if "scaling" in parts:
        payload["scaling"] = bench_scaling(args, device)
        print_scaling(payload["scaling"])
    payload["wall_s"] = time.perf_counter() - started
    out = write_json(args.json or default_json_path("sampler", device), payload)
    print(f"\nresults: {out} (whole command: {payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
