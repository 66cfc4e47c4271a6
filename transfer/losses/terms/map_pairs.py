"""Helpers of the terms that pair student and teacher stage maps one to one (``vid``, ``nst``).

Which stages a term reads (its ``stages`` option, 1-based like the logged ``<term>/stage<i>`` keys), a check
that every read tap is a ``[C, H, W]`` map, and bringing a pair of maps to one spatial size the way the
methods' reference code does (adaptive average pooling of the larger map down to the smaller one). Also the
precision helpers every companion term uses (:func:`fp32`, :func:`full_precision`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transfer.errors import CKTFError


def check_distinct_stages(stages: list[int] | None, key: str) -> None:
    """A ``stages`` option is null or a non-empty list of distinct stage numbers (checked when the config loads,
    before the networks, and so the stage count, are known)."""
    if stages is not None and (not stages or len(set(stages)) != len(stages)):
        raise CKTFError(f"config key '{key}': expected distinct stage numbers (or null for every stage), "
                        f"got {stages!r}")


def selected_stages(stages: list[int] | None, count: int, key: str) -> list[int]:
    """0-based indices of the stages named by a term's ``stages`` option (``None``: every stage).

    Args:
        stages: the option's value, 1-based stage numbers, or ``None``.
        count: how many stages the student (and teacher: ``same_stage_count``) has.
        key: the option's full config key, for the error, e.g. ``loss.terms.vid.stages``.

    Raises:
        CKTFError: an empty list, a repeated stage or one that does not exist (one line naming ``key``).
    """
    if stages is None:
        return list(range(count))
    if not stages:
        raise CKTFError(f"{key} is empty; name at least one stage 1..{count}, or null for every stage")
    missing = [s for s in stages if not 1 <= s <= count]
    if missing:
        raise CKTFError(f"{key}: stage {missing[0]} does not exist; the networks have {count} stages (1..{count})")
    if len(set(stages)) != len(stages):
        raise CKTFError(f"{key}={stages} names a stage twice; expected distinct stages 1..{count}")
    return [s - 1 for s in stages]


def check_maps(shapes: dict | None, side: str, indices: list[int], key: str) -> None:
    """Every selected stage tap of ``side`` (student/teacher) is a ``[C, H, W]`` map (not tokens or vectors)."""
    if shapes is None:
        return
    for i in indices:
        shape = tuple(shapes["stages"][i])
        if len(shape) != 3:
            raise CKTFError(f"{key} compares [C, H, W] maps, but {side} stage {i + 1} has per-sample shape {shape}; "
                            "tap convolutional stages (student.taps / teacher.taps) or leave the term out")


def check_vector(shapes: dict | None, side: str, key: str) -> None:
    """The ``side`` (student/teacher) penultimate tap is a flat ``[C]`` vector per sample."""
    if shapes is not None and len(tuple(shapes["penultimate"])) != 1:
        raise CKTFError(f"{key} compares penultimate vectors, but the {side}'s penultimate tap has per-sample shape "
                        f"{tuple(shapes['penultimate'])}; tap a flat [C] vector")


def common_size(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher maps ``[B, C, H, W]`` average-pooled to the smaller of their heights and widths."""
    size = (min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3]))
    if tuple(fs.shape[2:]) != size:
        fs = F.adaptive_avg_pool2d(fs, size)
    if tuple(ft.shape[2:]) != size:
        ft = F.adaptive_avg_pool2d(ft, size)
    return fs, ft


def fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 unless it is already float64 (losses are computed in fp32 under autocast)."""
    return x if x.dtype == torch.float64 else x.float()


def full_precision(x: torch.Tensor) -> torch.autocast:
    """A context turning autocast off on ``x``'s device, so a loss's products stay in fp32 (or fp64)."""
    return torch.autocast(device_type=x.device.type, enabled=False)
