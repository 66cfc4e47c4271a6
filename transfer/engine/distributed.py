"""Training under ``torchrun``: the process group, who is rank 0, and the few collectives cktf needs.

cktf is launched by ``torchrun`` (``torch.distributed``, DDP), never by a launcher of its own. torchrun sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in every process; :func:`setup`
reads them, joins the process group (NCCL on CUDA, gloo on CPU) and returns this rank's device
(``cuda:LOCAL_RANK`` for ``train.device`` auto/cuda). Without those variables, or with ``WORLD_SIZE=1``,
nothing here does anything and a run is exactly the single-process run.

Why one small module: every place that must agree across ranks calls one helper here (the memory-bank write
gathers, ``Z`` is combined, loss sums are reduced, rank 0 alone writes files), so the single-process code
paths stay as they were and the multi-process rules are in one file.

Example::

    device = setup(cfg.train.device)            # joins the group under torchrun, else resolve_device
    if is_main():
        save(...)
    rows = gather_cat(indices)                  # every rank's indices, in rank order
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from transfer.engine.ranks import launched
from transfer.engine.runtime import derive_seed, resolve_device
from transfer.errors import CKTFError

T = TypeVar("T")

TIMEOUT_ENV = "CKTF_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0  # long enough for rank 0 to build a faiss table while the others wait

log = logging.getLogger("cktf")


class RankError(CKTFError):
    """A user error every rank raises identically (it came through a collective): printed once, by rank 0."""

    replicated = True


# -- who am I ----------------------------------------------------------------------------------------------
def active() -> bool:
    """Whether a process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0: the only rank that writes files, logs and prints."""
    return rank() == 0


# -- setup and teardown ------------------------------------------------------------------------------------
def timeout_seconds() -> float:
    """How long a rank waits for the others (joining, and every collective): ``$CKTF_DIST_TIMEOUT`` seconds."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise CKTFError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise CKTFError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return value


def rank_device(name: str) -> torch.device:
    """This rank's device for ``train.device`` ``name``: ``cuda:LOCAL_RANK`` for auto/cuda when CUDA exists."""
    if name.startswith("cuda:"):
        raise CKTFError(f"train.device {name} would put every torchrun rank on one GPU; use cuda or auto "
                        "(each rank then takes cuda:LOCAL_RANK)")
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise CKTFError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) on this node; "
                        "lower torchrun --nproc_per_node")
    return torch.device("cuda", local)


def setup(device_name: str) -> torch.device:
    """Join torchrun's process group (once per process) and return this rank's device.

    Outside torchrun (or with one process) this is :func:`~transfer.engine.runtime.resolve_device`. A rank
    that cannot reach the others within ``$CKTF_DIST_TIMEOUT`` seconds stops with one line naming the
    ``MASTER_ADDR:MASTER_PORT`` it tried. Ranks other than 0 log only errors from then on.
    """
    if not launched():
        return resolve_device(device_name)
    device = rank_device(device_name)
    if dist.is_initialized():
        return device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seconds = timeout_seconds()
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                timeout=datetime.timedelta(seconds=seconds))
    except Exception as err:  # DistNetworkError, DistStoreError, TimeoutError, RuntimeError: all the same to a user
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CKTFError(f"could not reach the other torchrun ranks at MASTER_ADDR:MASTER_PORT {where} within "
                        f"{seconds:g} s ({TIMEOUT_ENV}; RANK {os.environ.get('RANK')} of WORLD_SIZE "
                        f"{os.environ.get('WORLD_SIZE')}): {detail[:200]}") from None
    if dist.get_rank() != 0:
        log.setLevel(logging.ERROR)
    return device


def teardown() -> None:
    """Leave the process group (end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- checks before a run starts ----------------------------------------------------------------------------
def per_rank_batch(batch_size: int, world: int | None = None) -> int:
    """``train.batch_size / world_size``: each rank's share of the global batch (the global batch is the
    configured one, so the learning rate and the results stay comparable across world sizes)."""
    world = world_size() if world is None else world
    if batch_size % world:
        raise RankError(f"train.batch_size {batch_size} is not divisible by the {world} torchrun processes; it is "
                        f"the global batch, split evenly across ranks (e.g. {max(world, batch_size // world * world)})")
    return batch_size // world


def check_same_config(text: str) -> None:
    """Refuse ranks that resolved different configs (compares a hash of ``text`` across ranks)."""
    if not active():
        return
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    digests = all_gather_objects(digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RankError(f"torchrun ranks disagree on the resolved config (rank {differ[0]} hash {digests[differ[0]]} "
                        f"vs rank 0 {digests[0]}); launch every rank with the same --config and overrides")


def check_sync_bn(sync_bn: bool, device: torch.device) -> None:
    """``train.sync_bn`` needs CUDA: DDP refuses torch's SyncBatchNorm on CPU modules."""
    if sync_bn and active() and device.type != "cuda":
        raise RankError("train.sync_bn needs CUDA devices (torch's SyncBatchNorm does not run on CPU/gloo); set "
                        "--train.sync_bn false: BatchNorm statistics are then averaged across ranks every epoch")


def describe(batch_size: int) -> str:
    """The start line's account of the ranks and the batch in force (empty for one process)."""
    if not active():
        return ""
    return (f"{world_size()} processes ({dist.get_backend()}) x batch {batch_size // world_size()} per rank = "
            f"global batch {batch_size}")


# -- collectives -------------------------------------------------------------------------------------------
def barrier() -> None:
    if active():
        dist.barrier()


def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order (identical on all ranks).

    Every rank must pass the same shape and dtype (true of a training batch: each rank holds
    ``train.batch_size / world_size`` items). One process: ``tensor`` itself.
    """
    if not active():
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum``, ``max`` or ``mean``) of ``tensor``; a no-op for one process."""
    if active():
        dist.all_reduce(tensor, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            tensor.div_(world_size())
    return tensor


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's picklable ``obj``, in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def run_on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank (other ranks wait).

    A :class:`CKTFError` raised by ``fn`` is raised on every rank (printed once), so all ranks stop together
    instead of the others waiting for a rank that has gone.
    """
    if not active():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = (True, fn())
        except CKTFError as err:
            box[0] = (False, str(err))
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise RankError(value)
    return value


def average_step(params: list[nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
    """Average ``loss`` and the gradients of ``params`` across ranks in one all-reduce: a training step outside
    DDP (the init phases) then moves every rank's weights as one process with the global batch would.

    Returns the mean loss (``loss`` itself, detached, for one process); parameters without a gradient are
    skipped (the same ones on every rank: every rank runs the same graph).
    """
    if not active():
        return loss.detach()
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([loss.detach().float().reshape(1), *(g.reshape(-1).float() for g in grads)])
    all_reduce_(flat, "mean")
    offset = 1
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view(grad.shape))
        offset += grad.numel()
    return flat[0]


def no_buffer_broadcast() -> dict[str, bool]:
    """DDP's option for *not* broadcasting buffers before every forward (memory banks would be copied from rank 0
    every step): ``forward_sync_buffers=False`` where torch has it (2.15+, still syncing once at construction),
    ``broadcast_buffers=False`` before."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


# -- what the engine keeps identical -----------------------------------------------------------------------
def rank_seed(seed: int) -> int:
    """The seed of this rank's global RNGs (augmentation, negatives): ``seed`` itself for one process, mixed
    with the rank otherwise, so ranks do not draw identical crops and negatives."""
    return derive_seed(seed, rank()) if active() else seed


def enable_gather(module: nn.Module) -> None:
    """Set ``gather_distributed = True`` on every submodule that declares that flag (memory banks, NCE ``Z``),
    so their writes take every rank's batch into account and stay identical on all ranks."""
    for sub in module.modules():
        if hasattr(sub, "gather_distributed"):
            sub.gather_distributed = active()


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by SyncBatchNorm (``train.sync_bn``).

    Feature taps run a traced copy of their model's graph that holds the original layers, so every
    :class:`~transfer.models.taps.FeatureTaps` inside is re-traced: otherwise the converted layers would sit
    unused in the model while the old ones kept computing per-rank statistics. timm networks are converted by
    timm (its ``BatchNormAct2d`` keeps its activation).
    """
    from transfer.models.taps import FeatureTaps
    from transfer.models.timm_models import convert_sync_batchnorm as convert_layers

    module = convert_layers(module)
    for sub in module.modules():
        if isinstance(sub, FeatureTaps):
            sub.retrace()
    return module


def _batchnorms(module: nn.Module, training_only: bool = False) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """BatchNorm layers that track running statistics (``training_only``: those in training mode, i.e. not the
    frozen teacher's, which stays in eval)."""
    return [(name, m) for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and (m.training or not training_only)]


def batchnorm_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's BatchNorm running statistics (they differ across ranks inside an epoch)."""
    return {f"{name}.{key}": buf.detach().cpu().clone() for name, m in _batchnorms(module)
            for key, buf in m.named_buffers(recurse=False)}


@torch.no_grad()
def load_batchnorm_buffers(module: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Put back what :func:`batchnorm_buffers` captured (a mid-epoch checkpoint's entry for this rank)."""
    for name, m in _batchnorms(module):
        for key, buf in m.named_buffers(recurse=False):
            buf.copy_(buffers[f"{name}.{key}"])


@torch.no_grad()
def average_batchnorm(module: nn.Module) -> None:
    """Average BatchNorm running means and variances across ranks (end of every epoch), so evaluation and
    checkpoints see one set of statistics. The update of running statistics is affine in them, so averaging
    once per epoch equals averaging after every step, up to rounding."""
    if not active():
        return
    for _, m in _batchnorms(module, training_only=True):
        for buf in (m.running_mean, m.running_var):
            if buf is not None:
                all_reduce_(buf, "mean")
