"""Companion methods VID, RKD, PKT and NST (CKTF Table 2's L_distill) as loss terms.

Each term is checked against an independent float64 computation of its paper's formula written here with
explicit loops in numpy (golden values on small known inputs), gets a gradient check (``gradcheck`` in float64:
gradients reach the student side, never the teacher), refuses bad options in one line naming the full key, and
runs ``cktf transfer`` end to end from its two configs (alone, and CKTF + it with θ = 1) and next to ``ce`` on a
labeled split.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.cli_helpers import one_line_error
from tests.lowres_runs import LOWRES, lowres_transfer
from transfer.config import LossConfig
from transfer.engine.checkpoint import load_checkpoint
from transfer.errors import CKTFError
from transfer.losses.terms import BUILTIN_TERMS, TERMS, TermContext, TransferBatch, build_terms, resolve_terms
from transfer.models.taps import TapOutputs

REPO = Path(__file__).resolve().parents[1]
METHODS = ("vid", "rkd", "pkt", "nst")


# -- tiny contexts and batches ----------------------------------------------------------------------------------

def context(s_stages=((2, 4, 4), (3, 2, 2)), t_stages=((3, 2, 2), (2, 2, 2)), s_pen=5, t_pen=4) -> TermContext:
    """A context for two-stage networks with the given per-sample stage shapes and penultimate widths."""
    def channels(stages, pen):
        return {"stem": 2, "stages": [s[0] for s in stages], "blocks": [], "penultimate": pen, "logits": 3}

    def shapes(stages, pen):
        return {"stem": (2, 4, 4), "stages": [tuple(s) for s in stages], "blocks": [], "penultimate": (pen,),
                "logits": (3,)}

    return TermContext(channels(s_stages, s_pen), channels(t_stages, t_pen), num_items=10,
                       student_shapes=shapes(s_stages, s_pen), teacher_shapes=shapes(t_stages, t_pen))


def build(name: str, ctx: TermContext, **options):
    terms, _ = build_terms(LossConfig(terms={name: options}), ctx)
    return terms[name].double()


def taps(stages, pen, batch=4) -> TapOutputs:
    return TapOutputs(stem=torch.zeros(batch, 2, 4, 4, dtype=torch.float64), stages=list(stages),
                      penultimate=pen, logits=torch.zeros(batch, 3, dtype=torch.float64))


def random_batch(ctx: TermContext, batch=4, seed=0, grad=False) -> TransferBatch:
    gen = torch.Generator().manual_seed(seed)

    def side(shapes):
        stages = [torch.randn(batch, *s, generator=gen, dtype=torch.float64).requires_grad_(grad)
                  for s in shapes["stages"]]
        pen = torch.randn(batch, *shapes["penultimate"], generator=gen, dtype=torch.float64).requires_grad_(grad)
        return taps(stages, pen, batch)

    return TransferBatch(side(ctx.student_shapes), side(ctx.teacher_shapes), torch.arange(batch),
                         torch.full((batch,), -1), None)


def total(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(losses.values())


def block_mean(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[B, C, H, W] averaged over equal blocks down to ``size`` (what adaptive pooling does for divisors)."""
    b, c, h, w = x.shape
    out = np.zeros((b, c, *size))
    fh, fw = h // size[0], w // size[1]
    for y in range(size[0]):
        for z in range(size[1]):
            out[:, :, y, z] = x[:, :, y * fh:(y + 1) * fh, z * fw:(z + 1) * fw].mean(axis=(2, 3))
    return out


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) <= 1 else abs(x) - 0.5


# -- golden values: the papers' formulas by hand ------------------------------------------------------------------

def test_vid_matches_the_gaussian_negative_log_likelihood_by_hand():
    ctx = context()
    term = build("vid", ctx, init_variance=3.0, eps=1e-5)
    torch.manual_seed(1)
    with torch.no_grad():
        for reg in term.regressors.values():
            for p in reg.parameters():
                p.copy_(torch.randn_like(p))
    batch = random_batch(ctx, seed=2)
    got = term(batch)
    assert set(got) == {"vid/stage1", "vid/stage2"}

    def relu(x):
        return np.maximum(x, 0.0)

    for i in range(2):
        reg = term.regressors[f"stage{i + 1}"]
        s = batch.student.stages[i].detach().numpy()
        t = batch.teacher.stages[i].detach().numpy()
        size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
        s, t = block_mean(s, size), block_mean(t, size)
        w1, w2, w3 = (reg.mean[k].weight.detach().numpy()[:, :, 0, 0] for k in (0, 2, 4))
        alpha = reg.alpha.detach().numpy()
        total_nll, count = 0.0, 0
        for b in range(s.shape[0]):
            for y in range(size[0]):
                for z in range(size[1]):
                    mu = w3 @ relu(w2 @ relu(w1 @ s[b, :, y, z]))
                    for c in range(t.shape[1]):
                        var = math.log(1 + math.exp(alpha[c])) + 1e-5
                        total_nll += math.log(math.sqrt(var)) + (t[b, c, y, z] - mu[c]) ** 2 / (2 * var)
                        count += 1
        assert got[f"vid/stage{i + 1}"].item() == pytest.approx(total_nll / count, rel=1e-10)


def test_vid_starts_at_the_initial_variance():
    terms, _ = build_terms(LossConfig(terms={"vid": {"init_variance": 5.0}}), context())
    for reg in terms["vid"].regressors.values():  # α is a float32 parameter
        torch.testing.assert_close(reg.variance(), torch.full((reg.alpha.numel(),), 5.0), rtol=1e-6, atol=0)


def test_rkd_matches_distance_and_angle_losses_by_hand():
    ctx = context()
    term = build("rkd", ctx, distance_weight=2.0, angle_weight=3.0)
    batch = random_batch(ctx, batch=5, seed=3)
    got = term(batch)
    s, t = batch.student.penultimate.detach().numpy(), batch.teacher.penultimate.detach().numpy()
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]

    def dist(x, i, j):
        return math.sqrt(sum((x[i, c] - x[j, c]) ** 2 for c in range(x.shape[1])))

    mu_s = sum(dist(s, i, j) for i, j in pairs) / len(pairs)
    mu_t = sum(dist(t, i, j) for i, j in pairs) / len(pairs)
    l_d = sum(huber(dist(s, i, j) / mu_s - dist(t, i, j) / mu_t) for i, j in pairs) / len(pairs)

    def cos_angle(x, i, j, k):  # angle at x_j between x_i and x_k
        a, b = x[i] - x[j], x[k] - x[j]
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    triplets = [(i, j, k) for i in range(n) for j in range(n) for k in range(n) if len({i, j, k}) == 3]
    l_a = sum(huber(cos_angle(s, i, j, k) - cos_angle(t, i, j, k)) for i, j, k in triplets) / len(triplets)
    assert got["rkd/distance"].item() == pytest.approx(2.0 * l_d, rel=1e-10)
    assert got["rkd/angle"].item() == pytest.approx(3.0 * l_a, rel=1e-10)


def test_rkd_huber_beyond_delta_and_scale_invariance():
    ctx = context()
    term = build("rkd", ctx)
    batch = random_batch(ctx, batch=4, seed=4)
    # a teacher that is the student scaled (any width): identical relations, zero loss
    s = batch.student.penultimate.detach()
    same = TransferBatch(batch.student, taps(batch.teacher.stages, 7.0 * s), batch.indices, batch.targets, None)
    assert total(term(same)).item() == pytest.approx(0.0, abs=1e-12)
    # one far outlier in the student pushes some distance differences past δ = 1 (the linear part of Huber)
    far = s.clone()
    far[0] *= 100
    out = term(TransferBatch(taps(batch.student.stages, far), batch.teacher, batch.indices, batch.targets, None))
    assert torch.isfinite(total(out))


def test_rkd_one_of_the_two_losses_can_be_left_out():
    ctx = context()
    assert set(build("rkd", ctx, angle_weight=0.0)(random_batch(ctx))) == {"rkd/distance"}
    assert set(build("rkd", ctx, distance_weight=0.0)(random_batch(ctx))) == {"rkd/angle"}


def test_pkt_matches_the_conditional_probability_kl_by_hand():
    ctx = context()
    term = build("pkt", ctx, eps=1e-7)
    batch = random_batch(ctx, batch=5, seed=5)
    got = term(batch)["pkt"].item()
    s, t = batch.student.penultimate.detach().numpy(), batch.teacher.penultimate.detach().numpy()
    n = len(s)

    def kernel(x, i, j):
        return 0.5 * (float(x[i] @ x[j]) / (np.linalg.norm(x[i]) * np.linalg.norm(x[j])) + 1.0)

    def cond(x, j, i):  # p_{j|i}
        return kernel(x, j, i) / sum(kernel(x, k, i) for k in range(n) if k != i)

    kl = 0.0
    for i in range(n):
        for j in range(n):
            if j != i:
                p, q = cond(t, j, i), cond(s, j, i)
                kl += p * math.log((p + 1e-7) / (q + 1e-7))
    assert got == pytest.approx(kl / (n * (n - 1)), rel=1e-10)
    assert got > 0
    same = TransferBatch(batch.student, taps(batch.teacher.stages, 3.0 * batch.student.penultimate.detach()),
                         batch.indices, batch.targets, None)
    assert term(same)["pkt"].item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("degree,coef", [(2, 0.0), (1, 0.0), (3, 0.5)])
def test_nst_matches_the_squared_mmd_by_hand(degree, coef):
    ctx = context()
    term = build("nst", ctx, degree=degree, coef=coef)
    batch = random_batch(ctx, seed=6)
    got = term(batch)
    assert set(got) == {"nst/stage1", "nst/stage2"}
    for i in range(2):
        s = batch.student.stages[i].detach().numpy()
        t = batch.teacher.stages[i].detach().numpy()
        size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
        s, t = block_mean(s, size), block_mean(t, size)
        per_sample = []
        for b in range(s.shape[0]):
            fs = [v / np.linalg.norm(v) for v in s[b].reshape(s.shape[1], -1)]
            ft = [v / np.linalg.norm(v) for v in t[b].reshape(t.shape[1], -1)]

            def k(x, y):
                return (float(x @ y) + coef) ** degree

            mmd = (sum(k(a, a2) for a in ft for a2 in ft) / len(ft) ** 2
                   + sum(k(b1, b2) for b1 in fs for b2 in fs) / len(fs) ** 2
                   - 2 * sum(k(a, b1) for a in ft for b1 in fs) / (len(ft) * len(fs)))
            per_sample.append(mmd)
        assert got[f"nst/stage{i + 1}"].item() == pytest.approx(sum(per_sample) / len(per_sample), rel=1e-10)


def test_nst_is_zero_for_the_same_maps_and_selects_stages():
    ctx = context(s_stages=((2, 4, 4), (3, 2, 2)), t_stages=((2, 4, 4), (3, 2, 2)))
    batch = random_batch(ctx, seed=7)
    same = TransferBatch(batch.student, taps([5.0 * m.detach() for m in batch.student.stages],
                                             batch.teacher.penultimate), batch.indices, batch.targets, None)
    for value in build("nst", ctx)(same).values():
        assert value.item() == pytest.approx(0.0, abs=1e-12)
    assert set(build("nst", ctx, stages=[2])(batch)) == {"nst/stage2"}
    assert set(build("vid", ctx, stages=[1])(batch)) == {"vid/stage1"}


# -- gradients: the student side, never the teacher ---------------------------------------------------------------

READS = {"vid": "stages", "nst": "stages", "rkd": "penultimate", "pkt": "penultimate"}


@pytest.mark.parametrize("name", METHODS)
def test_gradcheck_on_the_student_and_no_gradient_to_the_teacher(name):
    ctx = context(s_stages=((2, 4, 4), (2, 2, 2)), t_stages=((3, 2, 2), (3, 2, 2)), s_pen=3, t_pen=2)
    term = build(name, ctx)
    batch = random_batch(ctx, batch=4, seed=8, grad=True)
    student_inputs = (*batch.student.stages, batch.student.penultimate)

    def loss(*inputs):
        student = taps(list(inputs[:-1]), inputs[-1])
        return total(term(TransferBatch(student, batch.teacher, batch.indices, batch.targets, None)))

    assert torch.autograd.gradcheck(loss, student_inputs, eps=1e-6, atol=1e-6)
    value = loss(*student_inputs)
    value.backward()
    read = batch.student.stages if READS[name] == "stages" else [batch.student.penultimate]
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in read)
    teacher = (*batch.teacher.stages, batch.teacher.penultimate)
    assert all(x.grad is None for x in teacher)
    if name == "vid":  # the regressors and variances learn too
        assert all(p.grad is not None for p in term.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_fp32_under_bf16_autocast(name):
    ctx = context()
    terms, _ = build_terms(LossConfig(terms={name: {}}), ctx)
    batch = random_batch(ctx, seed=9)
    half = TransferBatch(*(taps([m.float().bfloat16() for m in side.stages], side.penultimate.float().bfloat16())
                           for side in (batch.student, batch.teacher)), batch.indices, batch.targets, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = terms[name](half)
    assert out and all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())


def test_tiny_batches_give_a_finite_zero_for_the_batch_relations():
    ctx = context()
    one = random_batch(ctx, batch=1)
    assert total(build("rkd", ctx)(one)).item() == 0.0 and build("pkt", ctx)(one)["pkt"].item() == 0.0
    two = build("rkd", ctx)(random_batch(ctx, batch=2))
    assert two["rkd/angle"].item() == 0.0 and two["rkd/distance"].item() >= 0.0


# -- registration, needs and bad input ------------------------------------------------------------------------------

def test_registered_after_the_cktf_terms_with_their_needs_and_papers():
    assert BUILTIN_TERMS[:4] == ("ce", "mckt", "pckt", "kd") and set(METHODS) <= set(BUILTIN_TERMS[4:])
    needs = {spec.name: spec for spec in resolve_terms(LossConfig(terms={m: {} for m in METHODS}))}
    assert needs["vid"].needs.same_stage_count and needs["nst"].needs.same_stage_count
    assert not needs["rkd"].needs.same_stage_count and not needs["pkt"].needs.same_stage_count
    for spec in needs.values():
        n = spec.needs
        assert not (n.labels or n.negatives or n.memory_banks or n.init_phase or n.teacher_blocks)
        assert "arXiv" in spec.cls.paper
    defaults = {name: spec.options for name, spec in needs.items()}
    assert (defaults["vid"].weight, defaults["vid"].init_variance, defaults["vid"].eps) == (1.0, 5.0, 1e-5)
    assert (defaults["rkd"].weight, defaults["rkd"].distance_weight, defaults["rkd"].angle_weight) == (1.0, 25.0, 50.0)
    assert (defaults["pkt"].weight, defaults["pkt"].eps) == (30000.0, 1e-7)
    assert (defaults["nst"].weight, defaults["nst"].degree, defaults["nst"].coef) == (50.0, 2, 0.0)


@pytest.mark.parametrize("name,options,needles", [
    ("vid", {"stages": [1, 3]}, ["loss.terms.vid.stages", "stage 3 does not exist", "2 stages"]),
    ("nst", {"stages": [0]}, ["loss.terms.nst.stages", "stage 0 does not exist"]),
    ("nst", {"stages": []}, ["loss.terms.nst.stages", "empty"]),
    ("vid", {"stages": [2, 2]}, ["loss.terms.vid.stages", "twice"]),
    ("vid", {"init_variance": 1e-3, "eps": 1e-2}, ["loss.terms.vid.init_variance", "loss.terms.vid.eps"]),
    ("vid", {"mid_channels": 0}, ["loss.terms.vid.mid_channels", "≥ 1"]),
    ("rkd", {"distance_weight": 0.0, "angle_weight": 0.0}, ["loss.terms.rkd.distance_weight", "both 0"]),
    ("rkd", {"distance": 1.0}, ["'loss.terms.rkd.distance'", "did you mean 'loss.terms.rkd.distance_weight'"]),
    ("pkt", {"eps": -1.0}, ["loss.terms.pkt.eps", "≥ 0.0"]),
    ("nst", {"degree": 1.5}, ["loss.terms.nst.degree", "an integer"]),
    ("nst", {"kernel": "gaussian"}, ["unknown config key 'loss.terms.nst.kernel'"]),
])
def test_bad_options_are_one_line_naming_the_key(name, options, needles):
    with pytest.raises(CKTFError) as excinfo:
        build_terms(LossConfig(terms={name: options}), context())
    message = str(excinfo.value)
    assert "\n" not in message and all(n in message for n in needles), message


@pytest.mark.parametrize("name,ctx,needles", [
    ("vid", context(s_stages=((2, 4, 4), (6,))), ["loss.terms.vid", "student stage 2", "(6,)"]),
    ("nst", context(t_stages=((4, 5), (3, 2, 2))), ["loss.terms.nst", "teacher stage 1"]),
    ("vid", context(t_stages=((3, 2, 2),)), ["loss.terms.vid", "student has 2 stages", "teacher 1"]),
])
def test_incompatible_shapes_are_one_line(name, ctx, needles):
    with pytest.raises(CKTFError) as excinfo:
        build_terms(LossConfig(terms={name: {}}), ctx)
    assert "\n" not in str(excinfo.value) and all(n in str(excinfo.value) for n in needles), str(excinfo.value)


@pytest.mark.parametrize("name", ["rkd", "pkt"])
def test_a_penultimate_tap_that_is_not_a_vector_is_one_line(name):
    ctx = context()
    ctx.teacher_shapes["penultimate"] = (4, 2, 2)
    with pytest.raises(CKTFError, match=f"loss.terms.{name} .*teacher's penultimate tap"):
        build_terms(LossConfig(terms={name: {}}), ctx)


# -- end to end: the configs, alone and with CKTF, and next to ce ---------------------------------------------------


def committed(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("name", METHODS)
def test_the_committed_configs_are_the_fashion_lowres_proxy(name):
    alone, cktf = committed(LOWRES / f"{name}.yaml"), committed(LOWRES / f"cktf_{name}.yaml")
    for cfg in (alone, cktf):
        assert cfg["data"]["options"] == {"source_classes": list(range(10)), "target_classes": list(range(10)),
                                          "split_images": True, "target_shift": "lowres"}
        assert cfg["data"]["train_split"] == "target_unlabeled" and cfg["student"]["name"] == "resnet8"
        assert cfg["teacher"]["checkpoint"] == "runs/fashion_lowres_teacher/best.safetensors"
    assert set(alone["loss"]["terms"]) == {name} and alone["loss"]["method"] == name
    assert set(cktf["loss"]["terms"]) == {"mckt", "pckt", name} and cktf["loss"]["method"] == f"cktf_{name}"
    assert cktf["loss"]["terms"][name]["weight"] == TERMS[name].Options().weight  # θ = 1 on X's loss at its usual β
    assert (cktf["loss"]["terms"]["mckt"]["weight"], cktf["loss"]["terms"]["pckt"]["weight"]) == (0.8, 0.2)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("combined", [False, True], ids=["alone", "cktf"])
def test_transfer_runs_from_the_configs(lowres_fixture, name, combined):
    config = LOWRES / (f"cktf_{name}.yaml" if combined else f"{name}.yaml")
    run = f"{'cktf_' if combined else ''}{name}"
    code, out = lowres_transfer(lowres_fixture, config, run)
    assert code == 0, out
    ckpt = load_checkpoint(lowres_fixture / "runs" / run / "last.safetensors")
    history = ckpt.state["history"][0]
    logged = {key for key in history if key.startswith(f"train/{name}")}
    assert logged, history
    assert all(math.isfinite(history[key]) for key in logged)
    state = ckpt.state["task"]
    assert any(k.startswith(f"terms.{name}.") for k in state) == (name == "vid")  # VID's regressors are saved
    assert any(k.startswith("terms.mckt.") for k in state) == combined
    assert ckpt.metadata["method"] == ("cktf_" if combined else "") + name


@pytest.mark.parametrize("name", METHODS)
def test_with_ce_on_a_labeled_split(lowres_fixture, name):
    config = LOWRES / f"{name}.yaml"
    code, out = lowres_transfer(lowres_fixture, config, f"ce_{name}", "--data.train_split", "target_train",
                                "--loss.terms.ce.weight", "1", "--data.options.labels_per_class", "5")
    assert code == 0, out
    history = load_checkpoint(lowres_fixture / "runs" / f"ce_{name}" / "last.safetensors").state["history"][0]
    assert "train/ce_epoch" in history and any(k.startswith(f"train/{name}") for k in history)


@pytest.mark.parametrize("extra,needles", [
    (["--loss.terms.vid.stages", "[1, 4]"], ["loss.terms.vid.stages", "stage 4 does not exist", "3 stages"]),
    (["--loss.terms.vid.init_varience", "2"], ["did you mean 'loss.terms.vid.init_variance'"]),
])
def test_bad_options_on_the_command_line_are_one_line(lowres_fixture, extra, needles):
    code, out = lowres_transfer(lowres_fixture, LOWRES / "vid.yaml", "bad_vid", *extra)
    one_line_error(code, out, *needles)
    assert not (lowres_fixture / "runs/bad_vid").exists()
