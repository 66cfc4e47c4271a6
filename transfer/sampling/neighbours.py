"""Nearest-neighbour tables in the frozen teacher's feature space, built with faiss and cached on disk.

Why: on an unlabeled target set we cannot exclude same-class samples from an anchor's negatives the
way CRD does with labels. Its nearest neighbours under the teacher are the likeliest same-class
samples, so the debiased and hard samplers need, for every item, its ``k`` nearest *other* items.
The table depends only on the frozen teacher and the data, so it is computed once and cached by
content (teacher checkpoint hash, dataset, transform, ...), and every DDP rank reads the same file.

Example::

    table = cached_neighbour_table("cache", {"teacher": file_sha256(ckpt), "dataset": "stl10",
                                             "split": "unlabeled", "N": len(ds)},
                                   lambda: extract_features(teacher, ds), k=96)
    table.shape  # [N, 96], row i = the 96 nearest other items of item i (cosine), nearest first
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from transfer.engine.checkpoint import save_safetensors_atomic
from transfer.errors import CKTFError
from transfer.sampling.faiss_utils import faiss_threads, normalised_float32

log = logging.getLogger("cktf")

FLAT_MAX_ITEMS = 200_000  # ``index="auto"`` searches exactly up to this many vectors, with IVF beyond
_TRAIN_PER_LIST = 39  # faiss' minimum training points per IVF list
_TENSOR = "neighbours"


def build_neighbour_table(
    features: torch.Tensor,
    k: int,
    *,
    index: Literal["auto", "flat", "ivf"] = "auto",
    nlist: int | None = None,
    nprobe: int = 16,
    use_gpu: bool | None = None,
    batch_size: int = 16384,
) -> torch.Tensor:
    """The ``k`` nearest other items of every row of ``features`` by cosine similarity, nearest first.

    Returns a LongTensor ``[N, k]`` on the CPU. Rows never contain their own index and always hold
    ``k`` distinct indices, also with duplicate vectors (where the item may be outranked by its
    copies) and with IVF (rows the approximate search cannot fill are searched exactly).

    ``index``: ``flat`` is exact; ``ivf`` is an inverted file with ``nlist`` lists (default
    ``round(4·sqrt(N))``) of which ``nprobe`` are scanned per query - much faster on large sets at a
    small loss of recall; ``auto`` is flat up to 200 000 items. faiss uses ``torch.get_num_threads()``
    CPU threads, or the GPUs when faiss was built with GPU support (unless ``use_gpu=False``): all of
    them for ``flat``, the first for ``ivf``.

    Example::

        build_neighbour_table(torch.randn(1000, 64), 8)                       # exact, [1000, 8]
        build_neighbour_table(feats, 32, index="ivf", nlist=1024, nprobe=16)  # approximate
    """
    n = features.shape[0] if features.dim() == 2 else 0
    if features.dim() != 2 or n < 2:
        raise ValueError(f"features must be a 2-D [N, C] tensor with N >= 2, got shape {tuple(features.shape)}")
    if not 1 <= k < n:
        raise CKTFError(f"sampler.k: expected 1 <= k < N={n} (neighbours per item), got {k}")
    if index not in ("auto", "flat", "ivf"):
        raise CKTFError(f"sampler.index: expected one of auto, flat, ivf, got {index!r}")
    if nprobe < 1:
        raise CKTFError(f"sampler.nprobe: expected a positive number of IVF lists to scan, got {nprobe}")
    if batch_size < 1:
        raise CKTFError(f"sampler.batch_size: expected a positive number of queries per batch, got {batch_size}")
    if not torch.isfinite(features).all():
        raise CKTFError("teacher features contain NaN or inf; check the teacher checkpoint (sampler neighbours)")
    gpu = _resolve_gpu(use_gpu)
    x = normalised_float32(features)
    kind = ("flat" if n <= FLAT_MAX_ITEMS else "ivf") if index == "auto" else index

    with faiss_threads(torch.get_num_threads()):
        if kind == "flat":
            ids = _search(_flat_index(x, gpu), x, k + 1, batch_size)
        else:
            lists = nlist if nlist is not None else default_nlist(n)
            if not 1 <= lists <= n:
                raise CKTFError(f"sampler.nlist: expected 1 <= nlist <= N={n} (IVF lists), got {lists}")
            ids = _search(_ivf_index(x, lists, min(nprobe, lists), gpu), x, k + 1, batch_size)
            missing = (ids < 0).any(axis=1).nonzero()[0]
            if missing.size:  # too few candidates in the probed lists: fill those rows exactly
                log.debug("neighbour table: %d of %d rows searched exactly (IVF returned too few)", missing.size, n)
                ids[missing] = _search(_flat_index(x, gpu), x[missing], k + 1, batch_size)
    if (ids < 0).any():
        raise RuntimeError("faiss returned -1 from an exact search; please report this as a bug")
    return _drop_self(torch.from_numpy(ids), k)


def default_nlist(num_items: int) -> int:
    """IVF lists for ``num_items`` vectors: ``4·sqrt(N)``, the usual speed/recall balance."""
    return max(1, min(num_items, round(4 * math.sqrt(num_items))))


def _resolve_gpu(use_gpu: bool | None) -> bool:
    available = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu and not available:
        raise CKTFError("sampler.use_gpu: true needs faiss with GPU support and a visible GPU; "
                        "set it to null or false to search on the CPU")
    return available if use_gpu is None else bool(use_gpu)




def _flat_index(x: np.ndarray, gpu: bool) -> faiss.Index:
    index = faiss.IndexFlatIP(x.shape[1])
    if gpu:  # exact search splits over all GPUs
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    return index


def _ivf_index(x: np.ndarray, nlist: int, nprobe: int, gpu: bool) -> faiss.Index:
    quantizer = faiss.IndexFlatIP(x.shape[1])
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    if gpu:  # one GPU: its index exposes nprobe and the clustering parameters directly
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
        index.referenced_objects = [resources]  # keep the resources alive as long as the index
    index.nprobe = nprobe
    if hasattr(index, "cp"):
        index.cp.spherical = True  # unit-norm centroids, as the inner-product metric expects
    n_train = min(x.shape[0], _TRAIN_PER_LIST * nlist)
    if n_train < x.shape[0]:  # fixed seed: the same features always give the same table
        rows = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:n_train].sort().values
        index.train(x[rows.numpy()])
    else:
        index.train(x)
    index.add(x)
    return index


def _search(index: faiss.Index, queries: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], batch_size):
        _, out[start:start + batch_size] = index.search(queries[start:start + batch_size], k)
    return out


def _drop_self(ids: torch.Tensor, k: int) -> torch.Tensor:
    """Keep ``k`` of the ``k+1`` results: remove the item itself, or the last result where it is absent."""
    is_self = ids == torch.arange(ids.shape[0]).unsqueeze(1)
    keep = ~is_self
    keep[:, -1] &= is_self.any(dim=1)
    return ids[keep].view(ids.shape[0], k)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's content, read in chunks; keys caches by e.g. the teacher checkpoint.

    Example: ``file_sha256("runs/teacher/best.safetensors")`` -> ``"3f5a..."`` (64 hex digits).
    """
    path = Path(path)
    if not path.is_file():
        raise CKTFError(f"{path} does not exist (expected a file to hash, e.g. the teacher checkpoint)")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cached_neighbour_table(
    cache_dir: str | Path,
    key: dict[str, Any],
    compute_features: Callable[[], torch.Tensor],
    k: int,
    **build_kwargs: Any,
) -> torch.Tensor:
    """:func:`build_neighbour_table` of ``compute_features()``, cached in ``cache_dir`` by content.

    Why: extracting teacher features and searching neighbours costs minutes on a large pool, but the
    result only depends on the teacher, the data and the search settings. The file name is a hash
    of ``key`` (JSON: e.g. teacher checkpoint sha256, dataset, split, options, transform repr, ``N``)
    plus ``k`` and the index settings, so a new teacher or dataset never reuses a stale table. On a
    hit ``compute_features`` is not called; a file of the wrong shape or a damaged one is rebuilt.
    Files are written atomically, so concurrent ranks or a crash never leave a half-written table.

    Example::

        table = cached_neighbour_table("runs/cache", {"teacher": sha, "N": 100000}, features_fn, 64,
                                       index="ivf", nprobe=32)
    """
    full_key = {"key": key, "k": k, "search": _search_settings(build_kwargs)}
    key_json = json.dumps(full_key, sort_keys=True, separators=(",", ":"), default=_json_default)
    path = Path(cache_dir) / f"neighbours-{hashlib.sha256(key_json.encode()).hexdigest()[:16]}.safetensors"
    rows = key.get("N")

    if path.is_file():
        table, problem = _load_table(path, key_json, rows, k)
        if table is not None:
            log.info("neighbour table: reused %s (N=%d, k=%d)", path, table.shape[0], k)
            return table
        log.warning("neighbour table: rebuilding %s (%s)", path, problem)

    start = time.perf_counter()
    features = compute_features()
    if rows is not None and features.shape[0] != rows:
        raise ValueError(f"compute_features returned {features.shape[0]} rows but the cache key says N={rows}")
    table = build_neighbour_table(features, k, **build_kwargs)
    _save_table(path, table, key_json)
    log.info("neighbour table: built %s (N=%d, k=%d) in %.1f s", path, table.shape[0], k, time.perf_counter() - start)
    return table


def _search_settings(build_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Settings that change the table (defaults filled in); batch size and GPU use only change the speed."""
    params = inspect.signature(build_neighbour_table).parameters
    unknown = sorted(set(build_kwargs) - {name for name, p in params.items() if p.kind is p.KEYWORD_ONLY})
    if unknown:
        raise TypeError(f"build_neighbour_table() got unexpected keyword arguments: {', '.join(unknown)}")
    settings = {name: build_kwargs.get(name, params[name].default) for name in ("index", "nlist", "nprobe")}
    if settings["index"] == "flat":  # IVF settings do not affect an exact search
        settings.update(nlist=None, nprobe=None)
    return settings


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (tuple, set, frozenset)):
        return sorted(obj) if isinstance(obj, (set, frozenset)) else list(obj)
    raise TypeError(f"cache key value of type {type(obj).__name__} is not JSON-serialisable")


def _load_table(path: Path, key_json: str, rows: int | None, k: int) -> tuple[torch.Tensor | None, str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("key") != key_json:
                return None, "its key differs"
            table = fh.get_tensor(_TENSOR).long()
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as err:
        return None, f"unreadable: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    if table.dim() != 2 or table.shape[1] != k or (rows is not None and table.shape[0] != rows):
        return None, f"shape {tuple(table.shape)}, expected [{rows if rows is not None else 'N'}, {k}]"
    n = table.shape[0]
    if table.numel() and (table.min() < 0 or table.max() >= n or (table == torch.arange(n).unsqueeze(1)).any()):
        return None, "indices out of range or rows containing themselves"
    return table, ""


def _save_table(path: Path, table: torch.Tensor, key_json: str) -> None:
    dtype = torch.int32 if table.shape[0] <= torch.iinfo(torch.int32).max else torch.int64
    save_safetensors_atomic(path, {_TENSOR: table.to(dtype).contiguous()}, {"key": key_json})
