"""Small helpers shared by everything that calls faiss (neighbour tables, the kNN probe)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import faiss
import numpy as np
import torch


def normalised_float32(features: torch.Tensor) -> np.ndarray:
    """Rows l2-normalised, as the contiguous float32 numpy array faiss expects (inner product = cosine)."""
    x = torch.nn.functional.normalize(features.detach().to("cpu", torch.float32), dim=1)
    return np.ascontiguousarray(x.numpy())


@contextlib.contextmanager
def faiss_threads(threads: int) -> Iterator[None]:
    """Run faiss's OpenMP code with ``threads`` threads, restoring the previous setting afterwards."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
