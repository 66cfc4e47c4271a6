"""Negative sampling for the NCE loss: samplers (uniform, debiased, hard) and teacher-space neighbour tables.

Example::

    table = cached_neighbour_table(cache_dir, key, compute_features, k=96)
    sampler = build_sampler("hard", len(dataset), 16384, table, exclude=32, hard_fraction=0.1, hard_pool=64)
    negatives = sampler(anchor_indices)  # [B, 16384] int64

The neighbour tables need faiss; they are imported on first use, so the samplers (and the Python API, which
only draws uniform negatives) work where faiss is not installed.
"""

from typing import Any

from transfer.sampling.negative_sampler import (
    MODES,
    DebiasedSampler,
    HardSampler,
    NegativeSampler,
    SharedUniformSampler,
    UniformSampler,
    build_sampler,
)

_NEIGHBOURS = ("build_neighbour_table", "cached_neighbour_table", "default_nlist", "file_sha256")


def __getattr__(name: str) -> Any:
    if name in _NEIGHBOURS:
        from transfer.sampling import neighbours

        return getattr(neighbours, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MODES",
    "DebiasedSampler",
    "HardSampler",
    "NegativeSampler",
    "SharedUniformSampler",
    "UniformSampler",
    "build_neighbour_table",
    "build_sampler",
    "cached_neighbour_table",
    "default_nlist",
    "file_sha256",
]
