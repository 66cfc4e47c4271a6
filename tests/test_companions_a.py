"""Companion methods FitNet, AT, SP and CC (the terms ``fitnet``, ``at``, ``sp``, ``cc``).

Each loss is checked against a float64 computation of its paper's formula written here with explicit loops
and numpy (never the term's own helpers), gradients are checked by ``gradcheck`` and reach only the student
side; FitNet's hint pre-training trains only the guided part of the student; bad options are one line naming
the key; and every method runs ``cktf transfer`` end to end from its two configs (alone and CKTF + X, θ = 1),
unlabeled (γ = 0) and with ``ce`` on a labeled split.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from tests.cli_helpers import one_line_error
from tests.lowres_runs import LOWRES, lowres_transfer
from transfer.config import LossConfig
from transfer.engine.checkpoint import load_checkpoint
from transfer.errors import CKTFError
from transfer.losses.terms import TERMS, InitPhase, TermContext, TransferBatch, build_terms, resolve_terms
from transfer.models import FeatureTaps, TapOutputs, build_model, tap_spec_for

REPO = Path(__file__).resolve().parents[1]
METHODS = ("fitnet", "at", "sp", "cc")


# -- helpers ----------------------------------------------------------------------------------------------------

def context(student_stages, teacher_stages, penultimate=(6, 6)) -> TermContext:
    """A TermContext for per-sample stage shapes ``(C, H, W)`` and penultimate widths ``(student, teacher)``."""
    def side(stages, width):
        return ({"stem": stages[0][0], "stages": [s[0] for s in stages], "blocks": [], "penultimate": width,
                 "logits": 3},
                {"stem": tuple(stages[0]), "stages": [tuple(s) for s in stages], "blocks": [],
                 "penultimate": (width,), "logits": (3,)})
    (sc, ss), (tc, ts) = side(student_stages, penultimate[0]), side(teacher_stages, penultimate[1])
    return TermContext(sc, tc, num_items=10, student_shapes=ss, teacher_shapes=ts)


def build(name: str, ctx: TermContext, **options):
    terms, _ = build_terms(LossConfig(terms={name: options}), ctx)
    return terms[name].double()


def outputs(stages=None, penultimate=None) -> TapOutputs:
    b = (stages or [penultimate])[0].shape[0]
    dummy = torch.zeros(b, 3, dtype=torch.float64)
    return TapOutputs(stem=dummy, stages=list(stages or []), penultimate=penultimate if penultimate is not None
                      else dummy, logits=dummy)


def batch(student: TapOutputs, teacher: TapOutputs) -> TransferBatch:
    b = student.logits.shape[0]
    return TransferBatch(student, teacher, torch.arange(b), torch.full((b,), -1), None)


def rand(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def total(losses: dict) -> torch.Tensor:
    return sum(losses.values())


# -- FitNet: golden values --------------------------------------------------------------------------------------

def np_conv2d(x, w, b, stride, pad):
    """Direct convolution, x [B, Ci, H, W], w [Co, Ci, kh, kw] (cross-correlation, as deep-learning convs)."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    bsz, _, h, wd = x.shape
    co, ci, kh, kw = w.shape
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    out = np.zeros((bsz, co, oh, ow))
    for n in range(bsz):
        for o in range(co):
            for i in range(oh):
                for j in range(ow):
                    patch = x[n, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
                    out[n, o, i, j] = (patch * w[o]).sum() + b[o]
    return out


def np_conv_transpose2d(x, w, b, stride, pad):
    """Transposed convolution by scattering, x [B, Ci, H, W], w [Ci, Co, kh, kw]."""
    bsz, ci, h, wd = x.shape
    _, co, kh, kw = w.shape
    full = np.zeros((bsz, co, (h - 1) * stride + kh, (wd - 1) * stride + kw))
    for n in range(bsz):
        for c in range(ci):
            for i in range(h):
                for j in range(wd):
                    full[n, :, i * stride:i * stride + kh, j * stride:j * stride + kw] += x[n, c, i, j] * w[c]
    full += b[None, :, None, None]
    return full[:, :, pad:full.shape[2] - pad, pad:full.shape[3] - pad]


def np_batchnorm_train(y, gamma, beta, eps=1e-5):
    mean = y.mean(axis=(0, 2, 3), keepdims=True)
    var = ((y - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)  # biased, as BatchNorm normalises in training
    return (y - mean) / np.sqrt(var + eps) * gamma[None, :, None, None] + beta[None, :, None, None]


@pytest.mark.parametrize("s_shape,t_shape,kind", [
    ((3, 4, 4), (2, 4, 4), "1x1"),
    ((3, 4, 4), (2, 2, 2), "stride2"),
    ((3, 2, 2), (2, 4, 4), "transpose"),
    ((3, 5, 5), (2, 3, 3), "valid"),
])
def test_fitnet_hint_matches_the_formula(s_shape, t_shape, kind):
    term = build("fitnet", context([s_shape], [t_shape]), guided_stage=1, hint_stage=1)
    term.train()
    conv, bn = term.regressor[0], term.regressor[1]
    with torch.no_grad():
        for i, p in enumerate(term.parameters()):
            p.copy_(rand(*p.shape, seed=10 + i))
    s, t = rand(4, *s_shape, seed=1), rand(4, *t_shape, seed=2).abs()
    loss = term(batch(outputs([s]), outputs([t])))["fitnet"]

    w, b = conv.weight.detach().numpy(), conv.bias.detach().numpy()
    if kind == "transpose":
        y = np_conv_transpose2d(s.numpy(), w, b, stride=2, pad=1)
    else:
        stride, pad = (2, 1) if kind == "stride2" else (1, 0)
        y = np_conv2d(s.numpy(), w, b, stride, pad)
    assert y.shape[1:] == t_shape
    r = np.maximum(np_batchnorm_train(y, bn.weight.detach().numpy(), bn.bias.detach().numpy()), 0.0)
    expected = ((r - t.numpy()) ** 2).sum() / r.size
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    if kind == "valid":
        assert conv.kernel_size == (3, 3)  # FitNets: kernel (H_s − H_t + 1, W_s − W_t + 1)


def test_fitnet_is_zero_when_the_regressed_map_is_the_hint():
    term = build("fitnet", context([(2, 3, 3)], [(2, 3, 3)]), guided_stage=1, hint_stage=1)
    term.eval()  # BatchNorm with fresh running statistics is x / sqrt(1 + eps)
    with torch.no_grad():
        term.regressor[0].weight.zero_()
        term.regressor[0].weight[:, :, 0, 0] = torch.eye(2) * math.sqrt(1 + 1e-5)
        term.regressor[0].bias.zero_()
    s = rand(3, 2, 3, 3).abs()
    assert term(batch(outputs([s]), outputs([s.clone()])))["fitnet"].item() == pytest.approx(0.0, abs=1e-12)


# -- AT: golden values ------------------------------------------------------------------------------------------

def np_attention(a, p):
    """Σ_c |A_c|^p at every position, flattened and divided by its L2 norm (the paper's eq. 1-2)."""
    bsz, c, h, w = a.shape
    q = np.zeros((bsz, h * w))
    for n in range(bsz):
        for i in range(h):
            for j in range(w):
                q[n, i * w + j] = sum(abs(a[n, k, i, j]) ** p for k in range(c))
        q[n] /= math.sqrt((q[n] ** 2).sum())
    return q


def np_block_mean(a, size):
    bsz, c, h, w = a.shape
    fh, fw = h // size[0], w // size[1]
    return a.reshape(bsz, c, size[0], fh, size[1], fw).mean(axis=(3, 5))


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_at_matches_the_formula(p):
    s_stages = [(3, 4, 4), (5, 2, 2)]
    t_stages = [(6, 2, 2), (4, 2, 2)]  # stage 1: the student's 4×4 map is pooled to the teacher's 2×2
    term = build("at", context(s_stages, t_stages), p=p)
    s = [rand(3, *shape, seed=i) for i, shape in enumerate(s_stages)]
    t = [rand(3, *shape, seed=5 + i) for i, shape in enumerate(t_stages)]
    losses = term(batch(outputs(s), outputs(t)))
    assert set(losses) == {"at/stage1", "at/stage2"}
    s0 = np_block_mean(s[0].numpy(), (2, 2))
    expected = [((np_attention(s0, p) - np_attention(t[0].numpy(), p)) ** 2).mean(),
                ((np_attention(s[1].numpy(), p) - np_attention(t[1].numpy(), p)) ** 2).mean()]
    assert losses["at/stage1"].item() == pytest.approx(expected[0], rel=1e-10)
    assert losses["at/stage2"].item() == pytest.approx(expected[1], rel=1e-10)


def test_at_ignores_the_scale_and_sign_of_the_maps():
    term = build("at", context([(3, 2, 2)], [(2, 2, 2)]))
    s = rand(2, 3, 2, 2)
    # two teacher channels whose Σ_c |A_c|² is 25 times the student's three: the same attention after normalising
    t = torch.stack([-5 * s[:, 0], torch.sqrt(25 * s[:, 1] ** 2 + 25 * s[:, 2] ** 2)], 1)
    assert total(term(batch(outputs([s]), outputs([t])))).item() == pytest.approx(0.0, abs=1e-12)


# -- SP: golden values ------------------------------------------------------------------------------------------

def np_similarity(f):
    """Row-normalised Gram matrix of the flattened samples (paper eq. 1-2), with explicit loops."""
    q = f.reshape(f.shape[0], -1)
    b = q.shape[0]
    g = np.array([[sum(q[i, k] * q[j, k] for k in range(q.shape[1])) for j in range(b)] for i in range(b)])
    return np.stack([g[i] / math.sqrt(sum(v * v for v in g[i])) for i in range(b)])


@pytest.mark.parametrize("stages", ["last", "all"])
def test_sp_matches_the_formula(stages):
    s_stages, t_stages = [(2, 3, 3), (3, 2, 2)], [(4, 3, 3), (2, 1, 1)]
    term = build("sp", context(s_stages, t_stages), stages=stages)
    s = [rand(5, *shape, seed=i) for i, shape in enumerate(s_stages)]
    t = [rand(5, *shape, seed=7 + i) for i, shape in enumerate(t_stages)]
    losses = term(batch(outputs(s), outputs(t)))
    pairs = [(1, "sp")] if stages == "last" else [(0, "sp/stage1"), (1, "sp/stage2")]
    assert set(losses) == {key for _, key in pairs}
    for i, key in pairs:
        diff = np_similarity(t[i].numpy()) - np_similarity(s[i].numpy())
        assert losses[key].item() == pytest.approx((diff ** 2).sum() / 25, rel=1e-10)


def test_sp_is_zero_for_a_rescaled_copy():
    term = build("sp", context([(2, 2, 2)], [(2, 2, 2)]))
    s = rand(4, 2, 2, 2)
    assert term(batch(outputs([s]), outputs([3.0 * s])))["sp"].item() == pytest.approx(0.0, abs=1e-12)


# -- CC: golden values ------------------------------------------------------------------------------------------

def np_correlation(f, gamma, order):
    """ψ_ij = Σ_{p ≤ P} e^{−2γ} (2γ)^p / p! (f_i·f_j)^p of the L2-normalised rows, with explicit loops."""
    f = np.stack([row / math.sqrt((row ** 2).sum()) for row in f])
    n = len(f)
    return np.array([[sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * float(f[i] @ f[j]) ** p
                          for p in range(order + 1)) for j in range(n)] for i in range(n)])


@pytest.mark.parametrize("gamma,order", [(0.4, 2), (1.0, 0), (0.7, 5)])
def test_cc_matches_the_formula(gamma, order):
    term = build("cc", context([(2, 1, 1)], [(2, 1, 1)], penultimate=(4, 7)), gamma=gamma, order=order)
    s, t = rand(6, 4, seed=1), rand(6, 7, seed=2)
    loss = term(batch(outputs(penultimate=s), outputs(penultimate=t)))["cc"]
    diff = np_correlation(t.numpy(), gamma, order) - np_correlation(s.numpy(), gamma, order)
    assert loss.item() == pytest.approx((diff ** 2).sum() / 36, rel=1e-10)


def test_cc_kernel_tends_to_the_gaussian_rbf():
    """A high Taylor order gives the exact kernel exp(−γ‖x − y‖²) of the normalised vectors (paper §3.3)."""
    gamma = 0.4
    term = build("cc", context([(2, 1, 1)], [(2, 1, 1)], penultimate=(3, 3)), gamma=gamma, order=30)
    s, t = rand(4, 3, seed=3), rand(4, 3, seed=4)
    ns, nt = (x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True) for x in (s, t))
    rbf = [np.exp(-gamma * ((v[:, None, :] - v[None, :, :]) ** 2).sum(-1)) for v in (ns, nt)]
    loss = term(batch(outputs(penultimate=s), outputs(penultimate=t)))["cc"]
    assert loss.item() == pytest.approx(((rbf[1] - rbf[0]) ** 2).sum() / 16, rel=1e-9)


# -- gradients: gradcheck in float64, student only ---------------------------------------------------------------

GRAD_CASES = {
    "fitnet": ({"guided_stage": 1, "hint_stage": 2}, [(2, 4, 4), (2, 2, 2)], [(2, 4, 4), (3, 2, 2)]),
    "at": ({}, [(2, 2, 2), (2, 2, 2)], [(3, 2, 2), (2, 1, 1)]),
    "sp": ({"stages": "all"}, [(2, 2, 2), (3, 1, 1)], [(2, 2, 2), (2, 1, 1)]),
    "cc": ({"embed_dim": 3}, [(2, 1, 1)], [(2, 1, 1)]),
}


@pytest.mark.parametrize("name", METHODS)
def test_gradients_pass_gradcheck_and_never_reach_the_teacher(name):
    options, s_stages, t_stages = GRAD_CASES[name]
    term = build(name, context(s_stages, t_stages, penultimate=(4, 5)), **options)
    s = [rand(3, *shape, seed=i).requires_grad_() for i, shape in enumerate(s_stages)]
    t = [rand(3, *shape, seed=9 + i).abs().requires_grad_() for i, shape in enumerate(t_stages)]
    ps, pt = rand(3, 4, seed=20).requires_grad_(), rand(3, 5, seed=21).requires_grad_()

    def loss(*student):
        return total(term(batch(outputs(list(student[:-1]), student[-1]), outputs(t, pt))))

    assert torch.autograd.gradcheck(loss, (*s, ps), eps=1e-6, atol=1e-7)
    loss(*s, ps).backward()
    reached = [x.grad is not None and x.grad.abs().sum() > 0 for x in (*s, ps)]
    assert any(reached)
    assert all(x.grad is None for x in (*t, pt))  # the teacher's side is detached inside the term
    assert all(p.grad is not None for p in term.parameters())  # regressor / embeddings are trained


# -- FitNet's hint pre-training ----------------------------------------------------------------------------------

class Images(Dataset):
    def __init__(self, n: int) -> None:
        self.x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], -1, i


def tapped(name: str, seed: int) -> FeatureTaps:
    torch.manual_seed(seed)
    return FeatureTaps(build_model(name, 1, 5), tap_spec_for(name))


def test_fitnet_init_phase_trains_only_the_guided_part_and_lowers_the_hint():
    student, teacher = tapped("resnet8", 0), tapped("resnet8", 1).eval()
    shape = (1, 28, 28)
    ctx = TermContext(student.channels(shape), teacher.channels(shape), 16, student_shapes=student.shapes(shape),
                      teacher_shapes=teacher.shapes(shape))
    terms, _ = build_terms(LossConfig(terms={"fitnet": {"init_epochs": 4, "init_lr": 0.1}}), ctx)
    term = terms["fitnet"]
    assert term.needs.init_phase
    before_s, before_t = ({k: v.clone() for k, v in m.state_dict().items()} for m in (student, teacher))
    student.eval()
    loader = DataLoader(Images(16), batch_size=8)
    term.init_phase(InitPhase(student, teacher, torch.device("cpu"), loader, loader))

    after = student.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before_s[k])}
    assert any(k.startswith("model.layer1.") for k in changed) and any(k.startswith("model.layer2.") for k in changed)
    assert any(k.startswith("model.stem.") for k in changed)
    assert not any(k.startswith(("model.layer3.", "model.fc.")) for k in changed), changed  # weights and BN stats
    assert all(torch.equal(v, before_t[k]) for k, v in teacher.state_dict().items())
    assert len(term.init_losses) == 4 and term.init_losses[-1] < term.init_losses[0]
    assert not resolve_terms(LossConfig(terms={"fitnet": {"init_epochs": 0}}))[0].needs.init_phase


# -- declared needs and one-line errors --------------------------------------------------------------------------

def test_declared_needs():
    needs = {s.name: s.needs for s in resolve_terms(LossConfig(terms={m: {} for m in METHODS}))}
    assert needs["fitnet"].init_phase and not needs["fitnet"].same_stage_count
    assert needs["at"].same_stage_count and not needs["sp"].same_stage_count
    assert resolve_terms(LossConfig(terms={"sp": {"stages": "all"}}))[0].needs.same_stage_count
    assert needs["cc"].taps == ("penultimate",)
    assert not any(n.labels or n.negatives or n.memory_banks for n in needs.values())
    assert [s.name for s in resolve_terms(LossConfig(terms={"cc": {}, "mckt": {}, "fitnet": {}}))] == \
        ["mckt", "fitnet", "cc"]
    for name in METHODS:
        assert TERMS[name].paper and TERMS[name].__doc__


def resnet8_context() -> TermContext:
    net = tapped("resnet8", 0)
    shape = (1, 28, 28)
    return TermContext(net.channels(shape), net.channels(shape), 10, student_shapes=net.shapes(shape),
                       teacher_shapes=net.shapes(shape))


@pytest.mark.parametrize("terms,needles", [
    ({"fitnet": {"guided_stag": 2}},
     ["'loss.terms.fitnet.guided_stag'", "did you mean 'loss.terms.fitnet.guided_stage'"]),
    ({"fitnet": {"guided_stage": 0}}, ["loss.terms.fitnet.guided_stage", "≥ 1"]),
    ({"at": {"q": 2}}, ["'loss.terms.at.q'"]),
    ({"at": {"p": 0.5}}, ["loss.terms.at.p", "≥ 1"]),
    ({"sp": {"stages": "first"}}, ["loss.terms.sp.stages", "one of 'last', 'all'"]),
    ({"cc": {"order": 40}}, ["loss.terms.cc.order"]),
    ({"cc": {"gamma": "wide"}}, ["loss.terms.cc.gamma", "expected a number"]),
])
def test_bad_options_are_one_line_naming_the_key(terms, needles):
    with pytest.raises(CKTFError) as excinfo:
        resolve_terms(LossConfig(terms=terms))
    message = str(excinfo.value)
    assert "\n" not in message and all(n in message for n in needles), message


@pytest.mark.parametrize("name,options,ctx,needles", [
    ("fitnet", {"guided_stage": 4}, None, ["loss.terms.fitnet.guided_stage is 4", "student has 3 stage(s)"]),
    ("fitnet", {"hint_stage": 7}, None, ["loss.terms.fitnet.hint_stage is 7", "teacher has 3 stage(s)"]),
    ("fitnet", {"guided_stage": 3, "hint_stage": 1}, None, ["loss.terms.fitnet", "(64, 7, 7)", "(16, 28, 28)"]),
    ("fitnet", {"guided_stage": 1, "hint_stage": 1}, context([(4, 3, 3)], [(4, 5, 5)]),
     ["loss.terms.fitnet", "(4, 3, 3)", "(4, 5, 5)"]),
    ("at", {}, context([(2, 2, 2)], [(2, 2, 2), (2, 1, 1)]), ["loss.terms.at", "1 stages", "teacher 2"]),
    ("at", {}, context([(2, 4)], [(2, 2, 2)]), ["loss.terms.at", "student stage 1", "(2, 4)", "[C, H, W]"]),
    ("sp", {"stages": "all"}, context([(2, 2, 2)], [(2, 2, 2), (2, 1, 1)]), ["loss.terms.sp.stages all"]),
])
def test_impossible_pairings_are_one_line_naming_the_key(name, options, ctx, needles):
    with pytest.raises(CKTFError) as excinfo:
        build_terms(LossConfig(terms={name: options}), ctx or resnet8_context())
    message = str(excinfo.value)
    assert "\n" not in message and all(n in message for n in needles), message


# -- end to end: cktf transfer from the fashion_lowres configs ---------------------------------------------------


LOGGED = {"fitnet": ["fitnet"], "at": ["at/stage1", "at/stage2", "at/stage3"], "sp": ["sp"], "cc": ["cc"]}


def quick(name: str) -> list[str]:
    return ["--loss.terms.fitnet.init_epochs", "1"] if name == "fitnet" else []


@pytest.mark.parametrize("cktf", [False, True], ids=["alone", "cktf"])
@pytest.mark.parametrize("name", METHODS)
def test_each_config_runs_a_transfer(lowres_fixture, name, cktf):
    config_name = f"cktf_{name}.yaml" if cktf else f"{name}.yaml"
    run_name = config_name.removesuffix(".yaml")
    code, out = lowres_transfer(lowres_fixture, LOWRES / config_name, run_name, *quick(name))
    assert code == 0, out
    ckpt = load_checkpoint(lowres_fixture / "runs" / run_name / "last.safetensors")
    epoch = ckpt.state["history"][0]
    expected = LOGGED[name] + (["mckt/stem", "pckt"] if cktf else [])
    for key in expected:
        assert math.isfinite(epoch[f"train/{key}_epoch"]), (key, epoch)
    weights = yaml.safe_load(ckpt.metadata["terms"])
    assert weights[name] == TERMS[name].Options().weight  # CKTF+X: θ = 1 on X's loss at its usual weight β
    assert set(weights) == ({"mckt", "pckt", name} if cktf else {name})
    if name == "fitnet":
        assert "terms.fitnet.regressor.0.weight" in ckpt.state["task"]
        assert "loss.terms.fitnet pre-training: epoch 1/1  loss" in out  # the init phase ran before epoch 1


@pytest.mark.parametrize("name", METHODS)
def test_each_method_with_ce_on_a_labeled_split(lowres_fixture, name):
    config = LOWRES / f"{name}.yaml"
    code, out = lowres_transfer(lowres_fixture, config, f"{name}_ce", "--data.train_split", "target_train",
                                "--data.options.labels_per_class", "5", "--loss.terms.ce.weight", "1", *quick(name))
    assert code == 0, out
    epoch = load_checkpoint(lowres_fixture / f"runs/{name}_ce/last.safetensors").state["history"][0]
    assert math.isfinite(epoch["train/ce_epoch"]) and math.isfinite(epoch[f"train/{LOGGED[name][0]}_epoch"])


@pytest.mark.parametrize("extra,needles", [
    (["--loss.terms.fitnet.guided_stage", "9"], ["loss.terms.fitnet.guided_stage is 9"]),
    (["--loss.terms.fitnet.init_epoch", "1"], ["did you mean 'loss.terms.fitnet.init_epochs'"]),
    (["--loss.terms.sp.stages", "every"], ["loss.terms.sp.stages"]),
])
def test_bad_input_on_the_command_line_is_one_line_before_the_run(lowres_fixture, extra, needles):
    code, out = lowres_transfer(lowres_fixture, LOWRES / "cktf_fitnet.yaml", "bad_a", *extra)
    one_line_error(code, out, *needles)
    assert not (lowres_fixture / "runs/bad_a").exists()
