"""Parity of every companion term (and KD) with RepDistiller, the code the CKTF paper's Table 2 ran.

RepDistiller (HobbitLong/RepDistiller, ``distiller_zoo/``, ``models/util.py``, ``helper/pretrain.py``) is CRD's
code, on which the CKTF code builds; the Table 2 configs use its weights β. Each ``ref_*`` function below is a
transcription, written for this test, of what RepDistiller computes (read there, not copied), in float64 on
random inputs; the term gets the same inputs and shares its weights (regressors, connectors, embeddings,
paraphraser, translator) with the transcription, which re-implements each layer from those weights.

- The reference variant (``variant repdistiller``, or the only form of the terms that never differed: fitnet,
  sp, vid, nst, fsp, kd) agrees to a relative difference below 1e-10, structural parts included: FitNet's
  ConvReg cases, VID's variance parametrisation, AB's connector rule, FT's paraphraser/translator layers and
  its init phase (one SGD step with momentum and weight decay, transcribed).
- Each paper variant is checked against its stated relation to the reference (e.g. RKD's exact (B−1)/B).

``python -m tests.test_repdistiller_parity`` prints the measured relative differences (the "equals RepDistiller"
column of the companion table, docs/methods/index.md).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from transfer.config import LossConfig
from transfer.engine.rundir import RunDir
from transfer.errors import CKTFError
from transfer.losses.terms import TERMS, InitPhase, TermContext, TransferBatch, build_terms
from transfer.losses.terms.listing import describe_terms
from transfer.models import TapOutputs
from transfer.stages.common import write_run_config

B = 8
STEM = (4, 8, 8)
S_STAGES = [(3, 8, 8), (5, 4, 4), (6, 2, 2)]
T_STAGES = [(4, 8, 8), (6, 4, 4), (8, 4, 4)]  # the last teacher map is larger: pooled to the student's
S_WIDTH, T_WIDTH = 6, 10


# -- building the term and its inputs -------------------------------------------------------------------------------

def context(s_stages, t_stages, s_stem=STEM, t_stem=STEM) -> TermContext:
    def side(stem, stages, width):
        channels = {"stem": stem[0], "stages": [s[0] for s in stages], "blocks": [], "penultimate": width,
                    "logits": 5}
        shapes = {"stem": tuple(stem), "stages": [tuple(s) for s in stages], "blocks": [], "penultimate": (width,),
                  "logits": (5,)}
        return channels, shapes
    (sc, ss), (tc, ts) = side(s_stem, s_stages, S_WIDTH), side(t_stem, t_stages, T_WIDTH)
    return TermContext(sc, tc, num_items=B, student_shapes=ss, teacher_shapes=ts)


def rand(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def outputs(ctx: TermContext, side: str, seed: int, batch: int = B) -> TapOutputs:
    shapes = ctx.student_shapes if side == "student" else ctx.teacher_shapes
    return TapOutputs(stem=rand(batch, *shapes["stem"], seed=seed),
                      stages=[rand(batch, *s, seed=seed + 1 + i) for i, s in enumerate(shapes["stages"])],
                      penultimate=rand(batch, shapes["penultimate"][0], seed=seed + 10),
                      logits=rand(batch, 5, seed=seed + 11))


def inputs(ctx: TermContext, seed: int = 0, batch: int = B) -> TransferBatch:
    return TransferBatch(outputs(ctx, "student", seed, batch), outputs(ctx, "teacher", seed + 100, batch),
                         torch.arange(batch), torch.full((batch,), -1), None)


def term(name: str, ctx: TermContext, **options) -> nn.Module:
    torch.manual_seed(0)
    terms, _ = build_terms(LossConfig(terms={name: options}), ctx)
    return terms[name].double().train()


def total(losses: dict) -> Tensor:
    return sum(losses.values())


def rel(ours: Tensor, ref: Tensor) -> float:
    ours, ref = float(ours.detach()), float(ref.detach())
    return abs(ours - ref) / abs(ref)


def randomise_batchnorms(module: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm affine parameters, so that the transcription must apply them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen, dtype=torch.float64))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen, dtype=torch.float64))


# -- layers of the transcriptions ---------------------------------------------------------------------------------

def bn_train(x: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    """BatchNorm in training mode: batch mean and biased variance per channel."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


def pool_square(fs: Tensor, ft: Tensor) -> tuple[Tensor, Tensor]:
    """RepDistiller's size matching: the map with the larger height is average-pooled to (H, H) of the other."""
    hs, ht = fs.shape[2], ft.shape[2]
    if hs > ht:
        fs = F.adaptive_avg_pool2d(fs, (ht, ht))
    elif hs < ht:
        ft = F.adaptive_avg_pool2d(ft, (hs, hs))
    return fs, ft


def smooth_l1_mean(a: Tensor, b: Tensor) -> Tensor:
    d = (a - b).abs()
    return torch.where(d < 1, 0.5 * d * d, d - 0.5).mean()


def unit_rows(x: Tensor, dim: int = 1) -> Tensor:
    """``x / max(‖x‖, 1e-12)`` along ``dim`` (RepDistiller's F.normalize)."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-12)


# -- transcriptions of RepDistiller ---------------------------------------------------------------------------------

def ref_kd(ys: Tensor, yt: Tensor, T: float = 4.0) -> Tensor:
    """DistillKL: Σ p_t (log p_t − log p_s) · T² / B, p = softmax(·/T)."""
    log_ps = ys / T - torch.logsumexp(ys / T, dim=1, keepdim=True)
    log_pt = yt / T - torch.logsumexp(yt / T, dim=1, keepdim=True)
    return (log_pt.exp() * (log_pt - log_ps)).sum() * T * T / ys.shape[0]


def ref_conv_reg(x: Tensor, conv: nn.Module, bn: nn.BatchNorm2d, s_shape, t_shape, relu: bool) -> Tensor:
    """ConvReg: the conv chosen from the heights (3×3/2 if twice, 4×4/2 transposed if half, else a valid conv
    of kernel 1 + H_s − H_t), with bias, then BatchNorm (training) and, for FitNet, ReLU."""
    (_, hs, ws), (_, ht, wt) = s_shape, t_shape
    w, b = conv.weight, conv.bias
    assert b is not None, "ConvReg's convolutions have a bias"
    if hs == 2 * ht:
        assert isinstance(conv, nn.Conv2d) and w.shape[2:] == (3, 3)
        y = F.conv2d(x, w, b, stride=2, padding=1)
    elif 2 * hs == ht:
        assert isinstance(conv, nn.ConvTranspose2d) and w.shape[2:] == (4, 4)
        y = F.conv_transpose2d(x, w, b, stride=2, padding=1)
    else:
        assert isinstance(conv, nn.Conv2d) and w.shape[2:] == (1 + hs - ht, 1 + ws - wt)
        y = F.conv2d(x, w, b)
    y = bn_train(y, bn.weight, bn.bias, bn.eps)
    return y.clamp_min(0) if relu else y


def ref_at(g_s: list[Tensor], g_t: list[Tensor], p: float = 2) -> Tensor:
    """Attention: Σ_stages mean (at(s) − at(t))², at(f) = normalize(mean_c f^p) with the signed power."""
    loss = 0
    for fs, ft in zip(g_s, g_t, strict=True):
        fs, ft = pool_square(fs, ft)
        at_s, at_t = (unit_rows(f.pow(p).mean(1).flatten(1)) for f in (fs, ft))
        loss = loss + (at_s - at_t).pow(2).mean()
    return loss


def ref_sp(fs: Tensor, ft: Tensor) -> Tensor:
    """Similarity: row-normalised Gram matrices, Σ (G_t − G_s)² / B²."""
    b = fs.shape[0]
    gs, gt = (unit_rows(f.flatten(1) @ f.flatten(1).t()) for f in (fs, ft))
    return ((gt - gs) ** 2).sum() / (b * b)


def ref_cc(fs: Tensor, ft: Tensor, embed_s: nn.Linear, embed_t: nn.Linear) -> Tensor:
    """Correlation through LinearEmbed on each side: mean_i Σ_d |e_i|·|e_{i+1}|, e = E_S(s) − E_T(t)."""
    es = fs @ embed_s.weight.t() + embed_s.bias
    et = ft @ embed_t.weight.t() + embed_t.bias
    delta = (es - et).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()


def ref_vid(fs: Tensor, ft: Tensor, convs: list[Tensor], log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    """VIDLoss: 1×1 conv → ReLU → 1×1 conv → ReLU → 1×1 conv (no bias) mean, σ² = log(1 + e^α) + ε per channel,
    mean of ½((μ − t)²/σ² + log σ²)."""
    fs, ft = pool_square(fs, ft)
    h = F.conv2d(fs, convs[0]).clamp_min(0)
    h = F.conv2d(h, convs[1]).clamp_min(0)
    mu = F.conv2d(h, convs[2])
    var = (torch.log(1.0 + torch.exp(log_scale)) + eps).view(1, -1, 1, 1)
    return (0.5 * ((mu - ft) ** 2 / var + torch.log(var))).mean()


def ref_pdist(e: Tensor) -> Tensor:
    sq = (e ** 2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp_min(1e-12).sqrt()
    return d * (1 - torch.eye(len(e), dtype=e.dtype))


def ref_rkd(fs: Tensor, ft: Tensor) -> tuple[Tensor, Tensor]:
    """RKDLoss: (25 · distance loss, 50 · angle loss), each a smooth-L1 mean over all B² pairs / B³ triplets."""
    ds, dt = ref_pdist(fs), ref_pdist(ft)
    ds, dt = ds / ds[ds > 0].mean(), dt / dt[dt > 0].mean()

    def angles(x: Tensor) -> Tensor:
        e = unit_rows(x.unsqueeze(0) - x.unsqueeze(1), dim=2)  # e[i, j] = unit vector from x_i to x_j
        return torch.einsum("ijd,ikd->ijk", e, e)

    return 25 * smooth_l1_mean(ds, dt), 50 * smooth_l1_mean(angles(fs), angles(ft))


def ref_pkt(fs: Tensor, ft: Tensor, eps: float = 1e-7, keep_self: bool = True, exact_norm: bool = False) -> Tensor:
    """PKT: x/(‖x‖ + ε), K = ½(cos + 1) row-normalised, mean of p log((p + ε)/(q + ε)) over the B² entries.

    ``keep_self=False, exact_norm=True`` is the paper's form: the diagonal left out of the rows and the mean,
    x/‖x‖ — the stated relation of the paper variant.
    """
    def probabilities(x: Tensor) -> Tensor:
        x = x / (x.norm(dim=1, keepdim=True) + (0 if exact_norm else eps))
        k = (x @ x.t() + 1) / 2
        if not keep_self:
            k = k * (1 - torch.eye(len(x), dtype=x.dtype))
        return k / k.sum(1, keepdim=True)

    p, q = probabilities(ft), probabilities(fs)
    kl = p * torch.log((p + eps) / (q + eps))
    if keep_self:
        return kl.mean()
    n = len(fs)
    return (kl * (1 - torch.eye(n, dtype=kl.dtype))).sum() / (n * (n - 1))


def ref_nst(g_s: list[Tensor], g_t: list[Tensor]) -> Tensor:
    """NSTLoss: per stage, channels' spatial patterns normalised, MMD² with the kernel (aᵀb)², means."""
    loss = 0
    for fs, ft in zip(g_s, g_t, strict=True):
        fs, ft = pool_square(fs, ft)
        fs, ft = unit_rows(fs.flatten(2), dim=2), unit_rows(ft.flatten(2), dim=2)

        def k(a: Tensor, b: Tensor) -> Tensor:
            return torch.einsum("bid,bjd->bij", a, b).pow(2)

        loss = loss + k(ft, ft).mean() + k(fs, fs).mean() - 2 * k(fs, ft).mean()
    return loss


def ref_fsp(g_s: list[Tensor], g_t: list[Tensor]) -> Tensor:
    """FSP over [stem, stage 1, …]: consecutive maps, larger pooled, G = mean_hw top ⊗ bottom, Σ mean (ΔG)²."""
    def matrices(g: list[Tensor]) -> list[Tensor]:
        out = []
        for bot, top in zip(g[:-1], g[1:], strict=True):
            bot, top = pool_square(bot, top)
            out.append(torch.einsum("bjhw,bihw->bij", bot, top) / (bot.shape[2] * bot.shape[3]))
        return out
    return sum(((s - t) ** 2).mean() for s, t in zip(matrices(g_s), matrices(g_t), strict=True))


def ref_ab(g_s: list[Tensor], g_t: list[Tensor], margin: float = 1.0) -> Tensor:
    """ABLoss on the connector outputs: Σ_i 2^(i−n+1) · Σ[(s + μ)²·1(s > −μ, t ≤ 0) + (s − μ)²·1(s ≤ μ, t > 0)]
    / B · 3/1000."""
    n, b = len(g_s), g_s[0].shape[0]
    loss = 0
    for i, (s, t) in enumerate(zip(g_s, g_t, strict=True)):
        l2 = ((s + margin) ** 2 * ((s > -margin) & (t <= 0)) + (s - margin) ** 2 * ((s <= margin) & (t > 0))).sum()
        loss = loss + 2.0 ** (i - n + 1) * l2 / b / 1000 * 3
    return loss


def ref_ab_connector(x: Tensor, s_shape, t_shape, module: nn.Module) -> Tensor:
    """Connector: nothing when channels and height agree, else ConvReg without ReLU (1×1 conv with bias + BN)."""
    if s_shape[0] == t_shape[0] and s_shape[1] == t_shape[1]:
        assert not any(True for _ in module.parameters()), "RepDistiller puts no connector on equal shapes"
        return x
    conv, bn = module[0], module[1]
    return ref_conv_reg(x, conv, bn, s_shape, t_shape, relu=False)


def leaky(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, 0.1 * x)


def ref_paraphraser(x: Tensor, params: list[Tensor], c: int, k: int) -> tuple[Tensor, Tensor]:
    """Paraphraser(use_bn=False): 3×3 convs C→C→kC→kC and 3×3 transposed convs kC→kC→C→C, each with bias and
    LeakyReLU(0.1); returns (factor, reconstruction). ``params`` are the six (weight, bias) pairs, in order."""
    shapes = [(c, c), (k, c), (k, k), (k, k), (k, c), (c, c)]  # conv weights [out, in]; transposed [in, out]
    h = x
    for i in range(6):
        w, b = params[2 * i], params[2 * i + 1]
        assert tuple(w.shape) == (*shapes[i], 3, 3) and b.shape == (w.shape[0] if i < 3 else w.shape[1],)
        h = leaky(F.conv2d(h, w, b, padding=1) if i < 3 else F.conv_transpose2d(h, w, b, padding=1))
        if i == 2:
            factor = h
    return factor, h


def ref_translator(x: Tensor, module: nn.Sequential, cs: int, k: int) -> Tensor:
    """Translator(use_bn=True): three 3×3 convs Cs→Cs→kCt→kCt with bias, each + BatchNorm + LeakyReLU(0.1)."""
    convs = [m for m in module if isinstance(m, nn.Conv2d)]
    bns = [m for m in module if isinstance(m, nn.BatchNorm2d)]
    h = x
    for conv, bn, shape in zip(convs, bns, [(cs, cs), (k, cs), (k, k)], strict=True):
        assert tuple(conv.weight.shape) == (*shape, 3, 3) and conv.bias is not None
        h = leaky(bn_train(F.conv2d(h, conv.weight, conv.bias, padding=1), bn.weight, bn.bias, bn.eps))
    return h


def ref_factor_loss(factor_s: Tensor, factor_t: Tensor) -> Tensor:
    """FactorTransfer (p1 = 2, p2 = 1): pooled, factor(f) = normalize(mean_c f²), mean |Δ|."""
    factor_s, factor_t = pool_square(factor_s, factor_t)
    a_s, a_t = (unit_rows(f.pow(2).mean(1).flatten(1)) for f in (factor_s, factor_t))
    return (a_s - a_t).abs().mean()


# -- one case per term and variant: (our value, RepDistiller's) ----------------------------------------------------

def case_kd(variant: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    ctx = context(S_STAGES, T_STAGES)
    batch = inputs(ctx, seed)
    ours = total(term("kd", ctx)(batch))
    return ours, ref_kd(batch.student.logits, batch.teacher.logits)


FITNET_PAIRS = {"1x1": ((3, 4, 4), (5, 4, 4)), "stride2": ((3, 8, 8), (5, 4, 4)),
                "transpose": ((3, 2, 2), (5, 4, 4)), "valid": ((3, 5, 5), (5, 3, 3))}


def case_fitnet(variant: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    s_shape, t_shape = FITNET_PAIRS[variant]
    ctx = context([s_shape, (6, 2, 2)], [t_shape, (8, 2, 2)])
    fit = term("fitnet", ctx, guided_stage=1, hint_stage=1, init_epochs=0)
    randomise_batchnorms(fit, 1)
    batch = inputs(ctx, seed)
    ours = total(fit(batch))
    conv, bn = fit.regressor[0], fit.regressor[1]
    ref = ((ref_conv_reg(batch.student.stages[0], conv, bn, s_shape, t_shape, relu=True)
            - batch.teacher.stages[0]) ** 2).mean()
    return ours, ref


def case_at(variant: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    p = {"p2": 2, "p3": 3}[variant.split("-")[-1]]
    ctx = context(S_STAGES, T_STAGES)
    batch = inputs(ctx, seed)
    ours = total(term("at", ctx, p=p, variant=variant.split("-")[0])(batch))
    return ours, ref_at(batch.student.stages, batch.teacher.stages, p)


def case_sp(variant: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    ctx = context(S_STAGES, T_STAGES)
    batch = inputs(ctx, seed)
    return total(term("sp", ctx)(batch)), ref_sp(batch.student.stages[-1], batch.teacher.stages[-1])


def case_cc(variant: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    ctx = context(S_STAGES, T_STAGES)
    batch = inputs(ctx, seed)
    cc = term("cc", ctx, variant=variant, embed_dim=128, weight=0.02)
    ref_embedded = term("cc", ctx, variant="repdistiller", embed_dim=128)  # same seed: the same embeddings
    return total(cc(batch)), ref_cc(batch.student.penultimate, batch.teacher.penultimate, ref_embedded.embed_s,
                                    ref_embedded.embed_t)


def case_vid(variant: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    ctx = context(S_STAGES, T_STAGES)
    vid = term("vid", ctx)
    for i, reg in enumerate(vid.regressors.values()):  # VID's init value, checked below, then moved off it
        with torch.no_grad():
            reg.alpha.add_(0.5 * rand(*reg.alpha.shape, seed=40 + i))
    batch = inputs(ctx, seed)
    ref = 0
    for i, reg in enumerate(vid.regressors.values()):
        convs = [m.weight for m in reg.mean if isinstance(m, nn.Conv2d)]
        assert all(m.bias is None for m in reg.mean if isinstance(m, nn.Conv2d))
        ref = ref + ref_vid(batch.student.stages[i], batch.teacher.stages[i], convs, reg.alpha)
    return total(vid(batch)), ref


def case_rkd(variant: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    ctx = context(S_STAGES, T_STAGES)
    batch = inputs(ctx, seed)
    ours = total(term("rkd", ctx, variant=variant)(batch))
    return ours, sum(ref_rkd(batch.student.penultimate, batch.teacher.penultimate))


def case_pkt(variant: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    ctx = context(S_STAGES, T_STAGES)
    batch = inputs(ctx, seed)
    ours = total(term("pkt", ctx, variant=variant)(batch))
    return ours, ref_pkt(batch.student.penultimate, batch.teacher.penultimate)


def case_nst(variant: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    ctx = context(S_STAGES, T_STAGES)
    batch = inputs(ctx, seed)
    return total(term("nst", ctx)(batch)), ref_nst(batch.student.stages, batch.teacher.stages)


FSP_STAGES = [(4, 8, 8), (6, 4, 4), (8, 2, 2)]


def case_fsp(variant: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    ctx = context(FSP_STAGES, FSP_STAGES)
    batch = inputs(ctx, seed)
    fsp = term("fsp", ctx, init_epochs=0)
    ref = ref_fsp([batch.student.stem, *batch.student.stages], [batch.teacher.stem, *batch.teacher.stages])
    return total(fsp.losses(batch)), ref


AB_S, AB_T = [(4, 8, 8), (5, 4, 4)], [(4, 8, 8), (6, 4, 4)]  # stage 1: shapes agree; stage 2: widths differ


def case_ab(variant: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The init-phase objective (``losses``; RepDistiller's main loop has no AB loss) through the connectors."""
    ctx = context(AB_S, AB_T)
    ab = term("ab", ctx, variant=variant, init_epochs=0)
    randomise_batchnorms(ab, 2)
    batch = inputs(ctx, seed)
    if variant == "repdistiller":
        g_s = [ref_ab_connector(s, AB_S[i], AB_T[i], conn)
               for i, (s, conn) in enumerate(zip(batch.student.stages, ab.connectors, strict=True))]
    else:  # the paper's connector on every stage: 1×1 conv without bias + BN; the loss is RepDistiller's
        g_s = []
        for s, conn in zip(batch.student.stages, ab.connectors, strict=True):
            assert conn[0].bias is None and conn[0].kernel_size == (1, 1)
            g_s.append(bn_train(F.conv2d(s, conn[0].weight), conn[1].weight, conn[1].bias, conn[1].eps))
    return total(ab.losses(batch)), ref_ab(g_s, batch.teacher.stages)


FT_S, FT_T = [(6, 2, 2)], [(8, 4, 4)]


def case_ft(variant: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    ctx = context(FT_S, FT_T)
    ft = term("ft", ctx, variant=variant, init_epochs=0)
    randomise_batchnorms(ft, 3)
    batch = inputs(ctx, seed)
    ours = total(ft(batch))
    k = int(FT_T[0][0] * 0.5)
    factor_t, _ = ref_paraphraser(batch.teacher.stages[0], list(ft.paraphraser.parameters()), FT_T[0][0], k)
    factor_s = ref_translator(batch.student.stages[0], ft.translator, FT_S[0][0], k)
    return ours, ref_factor_loss(factor_s, factor_t)


CASES: dict[str, tuple[Callable[..., tuple[Tensor, Tensor]], tuple[str, ...]]] = {
    "kd": (case_kd, ("-",)),
    "fitnet": (case_fitnet, tuple(FITNET_PAIRS)),
    "at": (case_at, ("repdistiller-p2", "repdistiller-p3")),
    "sp": (case_sp, ("-",)),
    "cc": (case_cc, ("repdistiller",)),
    "vid": (case_vid, ("-",)),
    "rkd": (case_rkd, ("repdistiller",)),
    "pkt": (case_pkt, ("repdistiller",)),
    "ab": (case_ab, ("repdistiller",)),
    "ft": (case_ft, ("repdistiller",)),
    "nst": (case_nst, ("-",)),
    "fsp": (case_fsp, ("-",)),
}
REFERENCE = [(name, v) for name, (_, variants) in CASES.items() for v in variants]


@pytest.mark.parametrize("name,variant", REFERENCE)
def test_the_reference_variant_equals_repdistiller(name, variant):
    ours, ref = CASES[name][0](variant)
    ref = ref.detach()
    assert ours.dtype == torch.float64 and math.isfinite(float(ref)) and float(ref) != 0
    assert rel(ours, ref) < 1e-10, (ours.item(), ref.item())


# -- structural parts -----------------------------------------------------------------------------------------------

def test_vid_starts_at_the_reference_variance_parametrisation():
    vid = term("vid", context(S_STAGES, T_STAGES))
    for reg, (c, _, _) in zip(vid.regressors.values(), T_STAGES, strict=True):
        assert reg.alpha.shape == (c,)
        expected = math.log(math.exp(5.0 - 1e-5) - 1.0)  # log_scale = log(e^(v − ε) − 1), v = 5, kept in fp32
        assert torch.equal(reg.alpha.detach(), torch.full((c,), expected).double())
        assert [m.weight.shape[:2] for m in reg.mean if isinstance(m, nn.Conv2d)] == [(c, reg.mean[0].in_channels),
                                                                                      (c, c), (c, c)]


def test_ab_connector_rule():
    ab = term("ab", context(AB_S, AB_T), variant="repdistiller", init_epochs=0)
    assert isinstance(ab.connectors[0], nn.Identity)
    conv, bn = ab.connectors[1]
    assert conv.kernel_size == (1, 1) and conv.bias is not None and isinstance(bn, nn.BatchNorm2d)
    paper = term("ab", context(AB_S, AB_T), init_epochs=0)
    assert all(c[0].bias is None and isinstance(c[1], nn.BatchNorm2d) for c in paper.connectors)


@pytest.mark.parametrize("name", ["ab", "fsp"])
def test_with_main_loop_false_the_weight_multiplies_nothing_as_in_repdistiller(name):
    """RepDistiller's main loop has no AB/FSP loss (β · 0): only the init phase transfers."""
    ctx = context(AB_S, AB_T) if name == "ab" else context(FSP_STAGES, FSP_STAGES)
    assert float(total(term(name, ctx, main_loop=False, init_epochs=0)(inputs(ctx)))) == 0.0


class StageTeacher(nn.Module):
    """A teacher whose only stage is its input (the FT init phase reads the teacher's last stage)."""

    def forward(self, x: Tensor) -> TapOutputs:
        return TapOutputs(stem=x, stages=[x], penultimate=x.mean((2, 3)), logits=x.mean((2, 3)))


def test_ft_init_phase_is_repdistillers_paraphraser_pre_training():
    """Two SGD steps (lr 0.01, momentum 0.9, weight decay 5e-4) of MSE(decoder(encoder(T)), T) on the
    paraphraser alone, transcribed step by step; the translator is untouched."""
    ctx = context(FT_S, FT_T)
    ft = term("ft", ctx, init_epochs=2, init_lr=0.01)
    start = [p.detach().clone() for p in ft.paraphraser.parameters()]
    translator = copy.deepcopy(ft.translator.state_dict())
    images = rand(B, *FT_T[0], seed=7)
    loader = DataLoader(TensorDataset(images, torch.zeros(B), torch.arange(B)), batch_size=B)
    ft.init_phase(InitPhase(student=nn.Identity(), teacher=StageTeacher(), device=torch.device("cpu"),
                            eval_loader=loader, train_loader=loader))

    params = [p.clone().requires_grad_(True) for p in start]
    momenta = [torch.zeros_like(p) for p in params]
    c, k = FT_T[0][0], int(FT_T[0][0] * 0.5)
    for _ in range(2):
        _, rec = ref_paraphraser(images, params, c, k)
        grads = torch.autograd.grad(((rec - images) ** 2).mean(), params)
        with torch.no_grad():
            for p, g, m in zip(params, grads, momenta, strict=True):
                m.mul_(0.9).add_(g + 5e-4 * p)
                p.sub_(0.01 * m)
    for ours, ref, first in zip(ft.paraphraser.parameters(), params, start, strict=True):
        assert (ref - first).abs().max() > 1e-6  # the steps moved every parameter
        assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-13)
    assert not any(p.requires_grad for p in ft.paraphraser.parameters())  # fixed in the main loop
    assert all(torch.equal(v, translator[key]) for key, v in ft.translator.state_dict().items())


# -- the paper variants: their stated relation to the reference ----------------------------------------------------

def test_rkd_paper_variant_is_the_reference_over_distinct_pairs_and_triplets():
    """Exactly (B−1)/B · L_D and (B−1)(B−2)/B² · L_A: the reference's degenerate pairs/triplets add zeros."""
    ctx = context(S_STAGES, T_STAGES)
    batch = inputs(ctx)
    paper = term("rkd", ctx)(batch)
    ref_d, ref_a = ref_rkd(batch.student.penultimate, batch.teacher.penultimate)
    assert rel(paper["rkd/distance"] * (B - 1) / B, ref_d) < 1e-10
    assert rel(paper["rkd/angle"] * (B - 1) * (B - 2) / B**2, ref_a) < 1e-10


def test_pkt_paper_variant_is_the_reference_without_self_similarity():
    """The reference with the diagonal left out of each row's normalisation and of the mean, and x/‖x‖."""
    ctx = context(S_STAGES, T_STAGES)
    batch = inputs(ctx)
    paper = total(term("pkt", ctx)(batch))
    s, t = batch.student.penultimate, batch.teacher.penultimate
    assert rel(paper, ref_pkt(s, t, keep_self=False, exact_norm=True)) < 1e-10
    assert rel(paper, ref_pkt(s, t)) > 1e-3


def test_at_paper_variant_is_the_reference_on_absolute_maps():
    """|A|^p: equal to the reference for even p; for odd p, the reference applied to |A| (on maps of one size:
    the reference pools the signed map, this term too, before the absolute value)."""
    ctx = context(S_STAGES, [(4, 8, 8), (6, 4, 4), (8, 2, 2)])
    batch = inputs(ctx)
    s, t = batch.student.stages, batch.teacher.stages
    assert rel(total(term("at", ctx, p=2)(batch)), ref_at(s, t, 2)) < 1e-10
    odd = total(term("at", ctx, p=3)(batch))
    assert rel(odd, ref_at([x.abs() for x in s], [x.abs() for x in t], 3)) < 1e-10
    assert rel(odd, ref_at(s, t, 3)) > 1e-2


def test_ab_paper_variant_is_the_reference_loss_on_its_own_connectors():
    ours, ref = case_ab("paper")
    assert rel(ours, ref) < 1e-10


@pytest.mark.parametrize("name", ["cc", "ft"])
def test_cc_and_ft_paper_variants_are_no_rescaling_of_the_reference(name):
    """Different quantities: the ratio to the reference changes with the inputs, so no β converts one."""
    ratios = [ours.item() / ref.item() for ours, ref in (CASES[name][0]("paper", seed) for seed in (0, 1000))]
    assert abs(ratios[0] / ratios[1] - 1) > 1e-3, ratios


# -- configs and the listing ------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
TABLE2 = sorted([*REPO.glob("configs/cifar100/cktf_*_resnet32x4_resnet8x4.yaml"),
                 *REPO.glob("configs/tinyimagenet/cktf_*_vgg19_vgg8.yaml")])
COMPANIONS = ("fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "nst", "fsp")
WITH_VARIANT = ("at", "cc", "rkd", "pkt", "ab", "ft")


def has_variant(name: str) -> bool:
    return "variant" in {f.name for f in fields(TERMS[name].Options)}


def test_the_terms_that_differed_have_a_variant_and_the_others_none():
    assert [n for n in COMPANIONS if has_variant(n)] == list(WITH_VARIANT)
    assert all(TERMS[n].Options().variant == "paper" for n in WITH_VARIANT)


@pytest.mark.parametrize("path", TABLE2, ids=lambda p: p.name)
def test_every_table2_config_uses_the_variant_its_beta_was_tuned_for_and_names_it(path):
    text = path.read_text()
    terms = yaml.safe_load(text)["loss"]["terms"]
    (name,) = [n for n in terms if n in COMPANIONS]
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert re.search(r"^# Variant: ", header, re.M), "the header names the variant"
    if has_variant(name):
        assert terms[name]["variant"] == "repdistiller" and "# Variant: repdistiller" in header
    else:
        assert "Variant: none needed" in header
    if name == "cc":
        assert terms[name]["weight"] == 0.02 and terms[name]["embed_dim"] == 128
    if name in ("ab", "fsp"):
        assert terms[name]["main_loop"] is False
    alone = re.search(r"^# .* alone: add (.*)$", header, re.M).group(1)
    assert "variant" not in alone  # the X-alone override keeps the file's variant


def test_cktf_methods_shows_each_terms_variant_and_its_relation_to_repdistiller():
    text = describe_terms(TERMS)
    blocks = dict(re.findall(r"^(\w+): .*?\n(.*?)(?=^\w+: |\Z)", text, re.M | re.S))
    for name in (*COMPANIONS, "kd"):
        block = " ".join(blocks[name].split())
        assert "RepDistiller (the paper's Table 2 code): " in block, name
        if name in WITH_VARIANT:
            assert f"--loss.terms.{name}.variant one of 'paper', 'repdistiller'" in block
            assert "[default: paper]" in block.split(f"--loss.terms.{name}.variant")[1]
        else:
            assert ".variant" not in block and ("equal" in block)


@dataclass
class SavedLoss:
    loss: dict


@pytest.mark.parametrize("name", WITH_VARIANT)
def test_a_run_saved_before_the_variants_resumes_as_variant_paper(tmp_path, name):
    """Its config.yaml has no ``variant``: it computed the paper form, so resuming that is accepted and
    resuming as ``repdistiller`` (the configs' new choice) is refused, naming the key."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"loss": {"terms": {name: {"weight": 1.0}}}}))
    write_run_config(RunDir(tmp_path), SavedLoss({"terms": {name: {"weight": 1.0, "variant": "paper"}}}),
                     resume=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"loss": {"terms": {name: {"weight": 1.0}}}}))
    with pytest.raises(CKTFError, match=f"loss.terms.{name}.variant \\('paper' -> 'repdistiller'\\)"):
        write_run_config(RunDir(tmp_path), SavedLoss({"terms": {name: {"weight": 1.0, "variant": "repdistiller"}}}),
                         resume=True)


PAPER = [("at", "paper-p2"), ("at", "paper-p3"), ("cc", "paper"), ("rkd", "paper"), ("pkt", "paper"),
         ("ab", "paper"), ("ft", "paper")]


def measured() -> list[tuple[str, str, float]]:
    """(term, variant, relative difference to RepDistiller) of every case, for the docs' companion table."""
    return [(name, variant, rel(*CASES[name][0](variant))) for name, variant in REFERENCE + PAPER]


if __name__ == "__main__":
    for name, variant, value in measured():
        print(f"{name:7s} {variant:18s} {value:.2e}")
