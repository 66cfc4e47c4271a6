"""Cost of the training augmentation per image: per-image torchvision pipelines vs batched augmentation.

``per_image`` is ``data.augment per_image``: each item goes through its dataset's torchvision v2 training
pipeline, then the float batch is collated. ``batched`` is ``data.augment batched`` (the default): each
item only gets its decode transform (uint8, one size), the uint8 batch is collated, and the batched
augmentation of :mod:`transfer.data.batch_augment` runs once on the whole batch. Both include collation,
so the table compares what the main process (or a loader worker) spends per image before the network.
Random uint8 images of each dataset's decoded shape; no files are read.

    .venv/bin/python benchmarks/augment.py
    .venv/bin/python benchmarks/augment.py --datasets fashion_split --clock process --threads 1

``--clock process`` counts this process's CPU seconds (robust when other jobs share the machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import default_collate

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    command_line,
    csv_choices,
    default_json_path,
    describe,
    format_table,
    machine_info,
    median,
    positive_int,
    write_json,
)
from transfer.data.batch_augment import build_batch_transform  # noqa: E402
from transfer.data.transforms import build_decode_transform, build_transform  # noqa: E402

# decoded image shape and training batch size of each dataset's shipped configs
DATASETS = {
    "fashion_split": ((1, 28, 28), 128),
    "tinyimagenet": ((3, 64, 64), 64),
    "stl10": ((3, 96, 96), 64),
    "image_folder": ((3, 50, 80), 64),
}


def per_image_batch(dataset: str, images: list[torch.Tensor]) -> Callable[[], object]:
    transform = build_transform(dataset, train=True)
    return lambda: default_collate([transform(x) for x in images])


def batched_batch(dataset: str, images: list[torch.Tensor]) -> Callable[[], object]:
    decode = build_decode_transform(dataset)
    augment = build_batch_transform(dataset, train=True)
    return lambda: augment(default_collate([decode(x) if decode else x for x in images]))


def microseconds_per_image(make_batch: Callable[[], object], batch: int, repeats: int, clock: str) -> float:
    """Median over ``repeats`` batches (after one warm-up) of the time per image, in µs."""
    now = time.process_time if clock == "process" else time.perf_counter
    make_batch()
    times = []
    for _ in range(repeats):
        start = now()
        make_batch()
        times.append(now() - start)
    return median(times) / batch * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--datasets", type=csv_choices(DATASETS), default=list(DATASETS),
                        help="comma-separated: " + ", ".join(DATASETS))
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed batches per dataset and mode")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--clock", choices=("wall", "process"), default="process")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    machine = machine_info(args.threads, device)
    command = command_line()
    print(describe(machine, command))

    rows, results = [], []
    generator = torch.Generator().manual_seed(0)
    for dataset in args.datasets:
        shape, batch = DATASETS[dataset]
        images = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator) for _ in range(batch)]
        per_image = microseconds_per_image(per_image_batch(dataset, images), batch, args.repeats, args.clock)
        batched = microseconds_per_image(batched_batch(dataset, images), batch, args.repeats, args.clock)
        results.append({"dataset": dataset, "shape": list(shape), "batch": batch, "per_image_us": per_image,
                        "batched_us": batched, "speedup": per_image / batched})
        rows.append([dataset, "×".join(map(str, shape)), str(batch), f"{per_image:.1f}", f"{batched:.1f}",
                     f"{per_image / batched:.1f}x"])

    print(format_table(["dataset", "image", "batch", "per_image µs/img", "batched µs/img", "speed-up"], rows))
    print(f"µs/img: median over {args.repeats} batches of {args.clock} time, transforms + collation, "
          f"{args.threads} thread(s).")
    path = write_json(args.json or default_json_path("augment", device),
                      {"machine": machine, "command": command, "clock": args.clock, "results": results})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
