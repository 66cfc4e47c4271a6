"""Negative sampling for the NCE loss: samplers (uniform, debiased, hard) and teacher-space neighbour tables.

Example::

    table = cached_neighbour_table(cache_dir, key, compute_features, k=96)
    sampler = build_sampler("hard", len(dataset), 16384, table, exclude=32, hard_fraction=0.1, hard_pool=64)
    negatives = sampler(anchor_indices)  # [B, 16384] int64
"""

from transfer.sampling.negative_sampler import (
    MODES,
    DebiasedSampler,
    HardSampler,
    NegativeSampler,
    SharedUniformSampler,
    UniformSampler,
    build_sampler,
)
from transfer.sampling.neighbours import (
    build_neighbour_table,
    cached_neighbour_table,
    default_nlist,
    file_sha256,
)

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
