"""CRD's two-sided NCE objective between a student and a teacher embedding (CRD eq. 10-19, CKTF eq. 3-5).

For an anchor ``i`` with dataset index ``indices[i]`` the *teacher-anchored* side scores the teacher
embedding ``g_t,i`` against the student memory bank: ``s_ij = <bank_student[j], g_t,i>`` for the positive
``j = indices[i]`` and the K negatives of ``i``; ``P_ij = exp(s_ij/τ) / Z_student``. The *student-anchored*
side is symmetric (``g_s,i`` against ``bank_teacher``, normaliser ``Z_teacher``). With ``c = K/N`` each side
is the NCE loss

    -(1/B) Σ_i [ log(P_i,pos / (P_i,pos + c)) + Σ_k log(c / (P_i,k + c)) ]

evaluated in log space (``ℓ = s/τ - log Z``; ``-softplus(log c - ℓ)`` and ``-softplus(ℓ - log c)``), which
needs no ``eps`` (CRD adds 1e-7 inside the logs) and cannot overflow. ``Z`` is CRD's Monte-Carlo estimate
``N·mean(exp(s/τ))`` taken once, on the first training batch, then frozen in a buffer, so a resumed run
reuses it instead of re-estimating.

Scoring never gathers the ``[B, K+1, d]`` block of bank rows the reference code builds (537 MB at B=64,
K=16384, d=128): per-anchor negatives use a GEMM against the bank (in column chunks for large banks) and
pick the needed entries; negatives shared by the batch use a single ``[B, d] @ [d, K]`` GEMM.

Example::

    nce = NCEObjective(num_items=len(dataset), dim=128, temperature=0.1)
    out = nce(head_s(feat_s), head_t(feat_t), batch_indices, negatives)   # negatives [B, K] or [K]
    out.loss.backward()
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfer.engine import distributed
from transfer.errors import CKTFError
from transfer.losses.memory_bank import MemoryBank


@dataclass
class NCEOutput:
    """``loss = teacher_anchored + student_anchored`` (CRD's ``criterion_t + criterion_s``)."""

    loss: Tensor
    teacher_anchored: Tensor
    student_anchored: Tensor


class NCEObjective(nn.Module):
    """Two memory banks, two frozen normalisers and the two-sided NCE loss of one embedding pair.

    ``forward(g_s, g_t, indices, negatives)``: ``g_s``, ``g_t`` are ``[B, d]`` unit-norm embeddings (their
    gradients reach the student and its head, and the teacher's projection head); ``indices`` ``[B]`` are
    the samples' dataset indices (the positives); ``negatives`` is ``[B, K]`` (per anchor) or ``[K]``
    (shared by the batch, MoCo-style). In training mode the first call estimates ``Z`` and every call
    then updates both banks at ``indices``; scores always use the banks as they were before the update.
    In eval mode nothing is written; before ``Z`` exists an eval call uses the batch's own estimate
    without storing it. Everything is computed in fp32, also under autocast (``exp(1/0.07)`` overflows
    fp16). Banks and ``Z`` are buffers: no gradients, checkpointed with ``state_dict()``; ``bank_dtype``
    stores the banks in bf16/fp16 (rows are read back as fp32 for scoring).

    ``gather_distributed`` (set by the engine under torchrun, together with the banks' flag of that name):
    ``Z`` is estimated from every rank's first batch (the per-rank ``mean(exp(s/τ))`` are all-gathered and
    averaged), so all ranks freeze the same ``Z``, the one a single process would get from the global batch.
    """

    z_student: Tensor
    z_teacher: Tensor
    gather_distributed: bool

    def __init__(self, num_items: int, dim: int = 128, temperature: float = 0.1, momentum: float = 0.5,
                 chunk_size: int = 262144, generator: torch.Generator | None = None,
                 bank_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if num_items < 2:
            raise CKTFError(f"NCE needs at least 2 unlabeled items (N={num_items}) to draw a negative from")
        if not temperature > 0:
            raise CKTFError(f"loss.nce.temperature must be positive; got {temperature}")
        if chunk_size < 1:
            raise CKTFError(f"NCE chunk_size must be a positive number of score elements; got {chunk_size}")
        self.num_items = num_items
        self.dim = dim
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.bank_student = MemoryBank(num_items, dim, momentum, generator, bank_dtype)
        self.bank_teacher = MemoryBank(num_items, dim, momentum, generator, bank_dtype)
        self.gather_distributed = False
        self.register_buffer("z_student", torch.tensor(float("nan")), persistent=True)
        self.register_buffer("z_teacher", torch.tensor(float("nan")), persistent=True)
        self._z_known = False  # host-side copy of "both Z are set", so steps on a GPU need no sync for it

    def forward(self, g_s: Tensor, g_t: Tensor, indices: Tensor, negatives: Tensor) -> NCEOutput:
        indices, negatives, z_missing = self._check_inputs(g_s, g_t, indices, negatives)
        update = self.training
        chunks = None
        if negatives.dim() == 2:  # one column plan serves both sides: they score the same (row, column) pairs
            chunks = _PLANS.plan(indices, negatives, self.num_items, max(1, self.chunk_size // negatives.shape[0]))
        guards: tuple[_PreUpdateRows, ...] = ()
        with torch.autocast(device_type=g_s.device.type, enabled=False):
            g_s, g_t = g_s.float(), g_t.float()
            # teacher-anchored: g_t against the student bank; student-anchored: g_s against the teacher bank
            if chunks is None:
                teacher_anchored = self._shared_side_loss(self.bank_student, g_t, indices, negatives, "z_student",
                                                          z_missing[0])
                student_anchored = self._shared_side_loss(self.bank_teacher, g_s, indices, negatives, "z_teacher",
                                                          z_missing[1])
            else:
                # rows this step's update rewrites (every rank's under torchrun; both banks take the same ones)
                rewritten = self.bank_student.written_rows(indices) if update else None
                s_t, guard_s = self._scores(self.bank_student, g_t, chunks, rewritten)
                s_s, guard_t = self._scores(self.bank_teacher, g_s, chunks, rewritten)
                guards = (guard_s, guard_t)
                teacher_anchored = self._side_loss(s_t, self._normaliser("z_student", s_t, z_missing[0]))
                student_anchored = self._side_loss(s_s, self._normaliser("z_teacher", s_s, z_missing[1]))
        if update:
            self.bank_student.update(indices, g_s.detach())
            self.bank_teacher.update(indices, g_t.detach())
            for guard in guards:
                guard.bank_updated()
        return NCEOutput(teacher_anchored + student_anchored, teacher_anchored, student_anchored)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._z_known = False

    def _check_inputs(self, g_s: Tensor, g_t: Tensor, indices: Tensor,
                      negatives: Tensor) -> tuple[Tensor, Tensor, tuple[bool, bool]]:
        """Raise :class:`CKTFError` on bad shapes or indices; return the indices as int64 on the banks'
        device and which ``Z`` are still unset.

        The range and ``Z`` checks read device values, so they share one host sync. Off the CPU that sync
        stalls the GPU once per objective, so it stops once both ``Z`` are known in training (the indices
        come from the dataset and the sampler, which are checked the first times).
        """
        if g_s.dim() != 2 or g_t.dim() != 2:
            raise CKTFError(f"NCE embeddings must be [B, d]; got student {tuple(g_s.shape)}, teacher "
                            f"{tuple(g_t.shape)}")
        if g_s.shape[1] != self.dim or g_t.shape[1] != self.dim:
            raise CKTFError(f"embedding dims must equal the memory banks' loss.nce.embed_dim (d={self.dim}); got "
                            f"student {g_s.shape[1]}, teacher {g_t.shape[1]}")
        batch = g_s.shape[0]
        if batch == 0 or g_t.shape[0] != batch or indices.shape != (batch,):
            raise CKTFError(f"NCE batch sizes disagree: student {batch}, teacher {g_t.shape[0]}, indices "
                            f"{tuple(indices.shape)} (expected [{batch}])")
        if negatives.dim() not in (1, 2) or (negatives.dim() == 2 and negatives.shape[0] != batch):
            raise CKTFError(f"negatives must be [B, K] (per anchor) or [K] (shared); got {tuple(negatives.shape)} "
                            f"for B={batch}")
        for name, t in (("indices", indices), ("negatives", negatives)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise CKTFError(f"NCE {name} must be an integer tensor of dataset indices; got {t.dtype}")
        device = self.z_student.device
        indices, negatives = indices.to(device, torch.long), negatives.to(device, torch.long)
        k = negatives.shape[-1]
        if not 1 <= k < self.num_items:
            raise CKTFError(f"sampler.num_negatives (K={k}) must be at least 1 and smaller than the number of "
                            f"unlabeled items (N={self.num_items})")
        if self._z_known and device.type != "cpu":
            return indices, negatives, (False, False)  # checked on the first steps; no per-step device sync
        lo, hi, nan_s, nan_t = torch.stack([
            torch.minimum(indices.min(), negatives.min()), torch.maximum(indices.max(), negatives.max()),
            self.z_student.isnan().long(), self.z_teacher.isnan().long(),
        ]).tolist()
        if lo < 0 or hi >= self.num_items:
            raise CKTFError(f"NCE indices and negatives must lie in [0, N) with N={self.num_items} unlabeled items; "
                            f"got values from {lo} to {hi}")
        self._z_known = self.training and not (nan_s or nan_t)
        return indices, negatives, (bool(nan_s), bool(nan_t))

    def _scores(self, bank: MemoryBank, g: Tensor, chunks: _ColumnChunks,
                rewritten: Tensor | None) -> tuple[Tensor, _PreUpdateRows]:
        """Per-anchor ``[B, K+1]`` scores of ``g`` against ``bank`` (positive in column 0) and the backward's
        guard; ``rewritten``: the rows this step's bank update will overwrite before backward runs."""
        weight = bank.weight
        keep = rewritten if g.requires_grad and torch.is_grad_enabled() else None
        guard = _PreUpdateRows(weight, keep)
        return _BankScores.apply(g, weight, chunks, guard), guard

    def _shared_side_loss(self, bank: MemoryBank, g: Tensor, indices: Tensor, negatives: Tensor, z_name: str,
                          z_missing: bool) -> Tensor:
        """One side's loss with the batch's ``[K]`` shared negatives: one GEMM forward, one backward.

        The K bank rows are copied once (so the in-place bank update cannot reach the backward), and the
        ``[B, K]`` block goes through :class:`_SharedNegativeSoftplus`, which needs three elementwise passes
        over it instead of the ~15 that autograd through ``cat``/``div``/``sub``/``softplus`` takes.
        """
        weight = bank.weight
        rows = weight.index_select(0, negatives).float()
        positive = (g * weight.index_select(0, indices).float()).sum(dim=1)
        if z_missing:
            with torch.no_grad():
                scores = torch.cat([positive[:, None], g @ rows.T], dim=1)
            z = self._normaliser(z_name, scores, True)
        else:
            z = getattr(self, z_name)
        shift = torch.log(z) + math.log(negatives.shape[0] / self.num_items)  # log Z + log c
        inv_tau = 1.0 / self.temperature
        loss_positive = F.softplus(shift - positive * inv_tau).sum()
        loss_negative = _SharedNegativeSoftplus.apply(g, rows, inv_tau, shift.detach())
        return (loss_positive + loss_negative) / g.shape[0]

    def _normaliser(self, name: str, scores: Tensor, missing: bool) -> Tensor:
        """The frozen ``Z`` buffer; estimated and stored on the first training call."""
        if not missing:
            return getattr(self, name)
        z = self._estimate_z(scores.detach())
        if self.training:
            getattr(self, name).copy_(z)
        return z

    def _estimate_z(self, scores: Tensor) -> Tensor:
        """CRD's normaliser ``Z = N · mean(exp(s/τ))`` over all ``B·(K+1)`` scores of the batch.

        Taken through ``logsumexp`` so large ``1/τ`` cannot overflow before the mean. With
        ``gather_distributed`` (training only) the per-rank log-means are all-gathered and combined in log
        space: every rank scores the same number of entries, so their mean is the global batch's mean.
        """
        log_mean = torch.logsumexp(scores.flatten() / self.temperature, dim=0) - math.log(scores.numel())
        if self.gather_distributed and self.training:
            ranks = distributed.gather_cat(log_mean.reshape(1))
            log_mean = torch.logsumexp(ranks, dim=0) - math.log(ranks.numel())
        z = torch.exp(log_mean + math.log(self.num_items))
        if not torch.isfinite(z):
            raise CKTFError(f"loss.nce.temperature={self.temperature} is too small: the NCE normaliser "
                            "Z = N·mean(exp(s/τ)) overflows float32; raise it (CRD uses 0.07-0.1)")
        return z

    def _side_loss(self, scores: Tensor, z: Tensor) -> Tensor:
        """``-(1/B) Σ_i [log(P_pos/(P_pos+c)) + Σ_k log(c/(P_k+c))]`` in log space, ``c = K/N``."""
        log_c = math.log((scores.shape[1] - 1) / self.num_items)
        logits = scores / self.temperature - torch.log(z)
        positive = F.softplus(log_c - logits[:, 0])
        negative = F.softplus(logits[:, 1:] - log_c).sum(dim=1)
        return (positive + negative).mean()

    def extra_repr(self) -> str:
        return f"num_items={self.num_items}, dim={self.dim}, temperature={self.temperature}"


class _PreUpdateRows:
    """Keeps the backward of :class:`_BankScores` exact although the bank is updated in place before it.

    The scores are taken against the bank *before* this step's update, but ``backward`` runs after
    ``MemoryBank.update`` has rewritten the rows at ``indices``. Copying those ``B`` rows (``B·d`` floats)
    is enough to undo that for the gradient. Any *other* write between forward and backward (e.g. a
    second training forward before the first backward) would make the gradient wrong, so the bank's
    version counter is checked, as autograd does for saved tensors.
    """

    def __init__(self, weight: Tensor, rows: Tensor | None) -> None:
        self.weight = weight
        # sorted, repeats kept: ``torch.unique`` would stall a GPU in every training forward; the repeats are
        # dropped in backward, which reads the rows on the host anyway
        self.rows = None if rows is None else torch.sort(rows).values
        self.saved = None if self.rows is None else weight.index_select(0, self.rows)
        self.version = weight._version

    def bank_updated(self) -> None:
        """Accept the owner's own update (the only write allowed before backward)."""
        self.version = self.weight._version

    def pre_update_delta(self) -> tuple[list[int], Tensor, Tensor] | None:
        """``(rows as a list, rows, old - current)`` for the distinct rewritten rows, ascending; None if nothing
        was rewritten. Reading the rows is the backward's one host sync."""
        if self.weight._version != self.version:
            raise RuntimeError("an NCE memory bank was written between this loss's forward and backward; call "
                               "backward() before the next training forward of the NCEObjective")
        if self.rows is None:
            return None
        rows, saved = self.rows, self.saved
        row_list = rows.tolist()
        first = [i for i, row in enumerate(row_list) if i == 0 or row != row_list[i - 1]]
        if len(first) < len(row_list):
            keep = torch.tensor(first, device=rows.device)
            rows, saved = rows.index_select(0, keep), saved.index_select(0, keep)
            row_list = [row_list[i] for i in first]
        dtype = torch.promote_types(self.weight.dtype, torch.float32)  # half-precision banks: the delta in fp32
        return row_list, rows, saved.to(dtype) - self.weight.index_select(0, rows).to(dtype)


class _ColumnChunks:
    """The ``(row, column)`` pairs of a ``[B, K+1]`` column table grouped by chunk of bank columns.

    One chunk (``B·N ≤ chunk_size``): no sorting; pair ``p = (i, m)`` reads offset ``i·N + columns[i, m]``
    of the ``[B, N]`` score matrix. Otherwise the pairs are sorted (stably) by chunk, so each chunk's pairs
    are one contiguous slice of ``order`` (their positions in the flat table) and of ``offsets`` (their
    positions in that chunk's flat ``[B, width]`` scores). Cost: two int64 vectors of ``B·(K+1)``.
    """

    def __init__(self, columns: Tensor, num_items: int, chunk_columns: int) -> None:
        self.shape = columns.shape
        self.num_items = num_items
        self.chunk_columns = chunk_columns
        rows = torch.arange(columns.shape[0], device=columns.device)[:, None]
        if chunk_columns >= num_items:
            self.order, self.bounds = None, [0, columns.numel()]
            self.offsets = (columns + rows * num_items).reshape(-1)
            return
        flat = columns.reshape(-1)
        chunk_of, self.order = torch.sort((flat // chunk_columns).int(), stable=True)
        starts = torch.arange(-(-num_items // chunk_columns) + 1, dtype=chunk_of.dtype, device=chunk_of.device)
        self.bounds = torch.searchsorted(chunk_of, starts).tolist()  # the one host sync (bincount needs two)
        start = chunk_of.long() * chunk_columns
        width = (num_items - start).clamp_(max=chunk_columns)
        self.offsets = (self.order // columns.shape[1]) * width + flat.index_select(0, self.order) - start

    def __iter__(self) -> Iterator[tuple[int, int, Tensor | None, Tensor]]:
        """Yield ``(start, end, positions, offsets)`` for each non-empty chunk ``[start, end)`` of columns.

        ``positions`` (None: the whole table, in order) index the flat ``[B, K+1]`` table; ``offsets``
        index the flat ``[B, end - start]`` scores of the chunk.
        """
        if self.order is None:
            yield 0, self.num_items, None, self.offsets
            return
        for chunk in range(len(self.bounds) - 1):
            lo, hi = self.bounds[chunk], self.bounds[chunk + 1]
            if lo < hi:
                start = chunk * self.chunk_columns
                yield start, min(start + self.chunk_columns, self.num_items), self.order[lo:hi], self.offsets[lo:hi]


class _LastPlan:
    """The column plan of the last ``(indices, negatives)`` seen, reused while the same unchanged tensors come
    again: every objective of a step (CKTF: six) scores the same columns, and sorting ``B·(K+1)`` pairs by
    chunk costs as much as a GEMM against the bank. The key holds the tensors themselves (so their ``id`` is
    not reused while cached) and their version counters (an in-place write makes a new plan)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.tensors: tuple[Tensor, Tensor] | None = None
        self.chunks: _ColumnChunks | None = None

    def plan(self, indices: Tensor, negatives: Tensor, num_items: int, chunk_columns: int) -> _ColumnChunks:
        key = (id(indices), indices._version, id(negatives), negatives._version, num_items, chunk_columns)
        if self.chunks is None or key != self.key:
            columns = torch.cat([indices[:, None], negatives], dim=1)
            self.chunks = _ColumnChunks(columns, num_items, chunk_columns)
            self.key, self.tensors = key, (indices, negatives)
        return self.chunks


_PLANS = _LastPlan()


class _BankScores(torch.autograd.Function):
    """``scores[i, m] = <weight[columns[i, m]], g[i]>`` through GEMMs against (chunks of) the bank.

    Forward: for each chunk of bank columns ``g @ weight[start:end].T`` gives ``[B, width]`` scores from
    which the needed entries are picked, so peak memory is ``chunk_size`` floats plus two int64 vectors
    of ``B·(K+1)``, whatever N. Backward: ``grad_g_i = Σ_m grad_im · weight[columns[i, m]]``; the incoming
    ``[B, K+1]`` gradient is scattered (``index_add_``, so repeated columns add up) into a dense
    ``[B, width]`` block that is multiplied with the same bank chunk: a GEMM again. Chosen by measurement
    at B=64, K=16384, N=100 000, d=128 on one CPU thread: scatter + GEMM ≈ 30 ms, the same product as a
    sparse COO/CSR matmul ≈ 150-170 ms, a gather of the needed rows + bmm (in anchor chunks) ≈ 570 ms.
    A whole training step (both sides, forward + backward, default chunk_size: 25 chunks) takes ≈ 175 ms
    and ≈ 48 MiB of peak memory, against ≈ 4.2 s and ≈ 1.1 GiB for the gather + bmm reference; at
    N = 10^6 the peak stays ≈ 44 MiB (256 MiB unchunked). The work is ``B·N·d`` per GEMM whatever K, so
    for banks far larger than ``B·(K+1)`` a gather of the needed rows would need fewer flops.
    Plain autograd through the chunk loop would be exact too, but it saves views of the bank, which
    ``MemoryBank.update`` then overwrites in place (autograd raises), and one index tensor per chunk;
    instead the rows the update rewrote are restored from :class:`_PreUpdateRows`, per chunk, as
    ``dense[:, rows] @ (old - current)[rows]``. The bank never gets a gradient.
    """

    @staticmethod
    def forward(ctx, g: Tensor, weight: Tensor, chunks: _ColumnChunks, guard: _PreUpdateRows) -> Tensor:
        scores = g.new_empty(chunks.shape.numel())
        for start, end, positions, offsets in chunks:
            picked = (g @ weight[start:end].to(g.dtype).T).view(-1).index_select(0, offsets)
            if positions is None:
                scores = picked
            else:
                scores.index_copy_(0, positions, picked)
        ctx.chunks, ctx.weight, ctx.guard = chunks, weight, guard
        return scores.view(chunks.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        chunks, weight = ctx.chunks, ctx.weight
        fix = ctx.guard.pre_update_delta()
        batch = grad.shape[0]
        flat_grad = grad.contiguous().view(-1)
        grad_g = grad.new_zeros(batch, weight.shape[1])
        for start, end, positions, offsets in chunks:
            values = flat_grad if positions is None else flat_grad.index_select(0, positions)
            dense = grad.new_zeros(batch * (end - start)).index_add_(0, offsets, values).view(batch, end - start)
            grad_g.addmm_(dense, weight[start:end].to(grad.dtype))
            if fix is not None:
                row_list, rows, delta = fix
                lo, hi = bisect.bisect_left(row_list, start), bisect.bisect_left(row_list, end)
                if lo < hi:
                    grad_g.addmm_(dense.index_select(1, rows[lo:hi] - start), delta[lo:hi])
        return grad_g, None, None, None


class _SharedNegativeSoftplus(torch.autograd.Function):
    """``Σ_ik softplus(<g_i, rows_k>/τ - shift)``: the negatives' part of one side with shared negatives.

    Forward is one ``addmm`` (scale and shift folded into the GEMM) and one softplus-and-sum; backward is
    ``sigmoid`` of the saved logits and one GEMM, ``grad_g = (σ(u) @ rows) / τ``. ``rows`` is a copy of
    the bank's rows and gets no gradient, nor does ``shift`` (``Z`` is frozen).
    """

    @staticmethod
    def forward(ctx, g: Tensor, rows: Tensor, inv_tau: float, shift: Tensor) -> Tensor:
        logits = torch.addmm(shift.neg().reshape(1, 1), g, rows.T, alpha=inv_tau)
        ctx.save_for_backward(rows, logits)
        ctx.inv_tau = inv_tau
        return F.softplus(logits).sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        rows, logits = ctx.saved_tensors
        grad_g = torch.sigmoid(logits) @ rows
        return grad_g.mul_(grad * ctx.inv_tau), None, None, None
