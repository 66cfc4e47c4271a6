"""Companion methods AB, FT and FSP (loss.terms.ab / ft / fsp): golden values of each paper's formula computed
here independently (float64, numpy loops), gradient checks (student side only), one-line errors, the init phases,
and `cktf transfer` end to end from configs/fashion_lowres/{<name>,cktf_<name>}.yaml on the Fashion-MNIST fixture.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from tests.cli_helpers import assert_one_line, one_line_error
from tests.lowres_runs import LOWRES, lowres_transfer
from transfer.config import LossConfig
from transfer.engine.checkpoint import load_checkpoint
from transfer.errors import CKTFError
from transfer.losses.terms import BUILTIN_TERMS, TERMS, TermContext, TransferBatch, build_terms, resolve_terms
from transfer.models import FeatureTaps, TapOutputs, build_model, tap_spec_for
from transfer.tasks.transfer import TransferTask

REPO = Path(__file__).resolve().parents[1]
METHODS = ("ab", "ft", "fsp")
INIT = {"ab": "init_epochs", "ft": "init_epochs", "fsp": "init_epochs"}  # each init phase's epochs option


def context(s_stages, t_stages, s_stem=(4, 8, 8), t_stem=(4, 8, 8)) -> TermContext:
    """A hand-made context: per-sample shapes (C, H, W) of the stem and stages of both sides."""
    def side(stem, stages):
        channels = {"stem": stem[0], "stages": [s[0] for s in stages], "blocks": [], "penultimate": 8, "logits": 3}
        shapes = {"stem": stem, "stages": list(stages), "blocks": [], "penultimate": (8,), "logits": (3,)}
        return channels, shapes
    (sc, ss), (tc, ts) = side(s_stem, s_stages), side(t_stem, t_stages)
    return TermContext(sc, tc, num_items=10, student_shapes=ss, teacher_shapes=ts)


def one_term(name: str, ctx: TermContext, **options):
    torch.manual_seed(0)
    terms, _ = build_terms(LossConfig(terms={name: options}), ctx)
    return terms[name].double()


def taps(stem, stages) -> TapOutputs:
    b = stem.shape[0]
    return TapOutputs(stem=stem, stages=list(stages), penultimate=torch.zeros(b, 8, dtype=stem.dtype),
                      logits=torch.zeros(b, 3, dtype=stem.dtype))


def batch_of(student: TapOutputs, teacher: TapOutputs) -> TransferBatch:
    b = student.stem.shape[0]
    return TransferBatch(student, teacher, torch.arange(b), torch.full((b,), -1), None)


def rand(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def block_mean(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Average-pool [B, C, H, W] to ``size`` when H, W are multiples of it (by explicit blocks)."""
    b, c, h, w = x.shape
    fh, fw = h // size[0], w // size[1]
    out = np.zeros((b, c, *size))
    for i in range(size[0]):
        for j in range(size[1]):
            out[:, :, i, j] = x[:, :, i * fh:(i + 1) * fh, j * fw:(j + 1) * fw].mean(axis=(2, 3))
    return out


# -- AB ----------------------------------------------------------------------------------------------------------

def test_ab_matches_the_alternative_loss_by_hand():
    ctx = context([(3, 4, 4), (5, 2, 2)], [(4, 4, 4), (6, 2, 2)])
    term = one_term("ab", ctx, margin=0.7).eval()  # eval: BatchNorm with its initial running stats (x / √(1+ε))
    gen = torch.Generator().manual_seed(1)
    s_maps = [rand(2, 3, 4, 4, gen=gen), rand(2, 5, 2, 2, gen=gen)]
    t_maps = [rand(2, 4, 4, 4, gen=gen), rand(2, 6, 2, 2, gen=gen)]
    losses = term(batch_of(taps(rand(2, 4, 8, 8, gen=gen), s_maps), taps(rand(2, 4, 8, 8, gen=gen), t_maps)))

    mu, n = 0.7, 2
    total = 0.0
    for k, (s, t, conn) in enumerate(zip(s_maps, t_maps, term.connectors, strict=True)):
        w = conn[0].weight.detach().numpy()[:, :, 0, 0]  # [C_t, C_s]
        eps = conn[1].eps
        s, t = s.numpy(), t.numpy()
        per_sample = []
        for b in range(s.shape[0]):
            acc = 0.0
            for c in range(t.shape[1]):
                for y in range(t.shape[2]):
                    for x in range(t.shape[3]):
                        r = sum(w[c, i] * s[b, i, y, x] for i in range(s.shape[1])) / np.sqrt(1 + eps)
                        acc += max(0.0, mu - r) ** 2 if t[b, c, y, x] > 0 else max(0.0, mu + r) ** 2
            per_sample.append(acc)
        expected = 3e-3 * 2.0 ** (k - n + 1) * np.mean(per_sample)
        assert losses[f"ab/stage{k + 1}"].item() == pytest.approx(expected, rel=1e-10)
        total += expected
    assert sum(losses.values()).item() == pytest.approx(total, rel=1e-10)


def test_ab_stage_choice_weights_the_deepest_chosen_stage_one():
    ctx = context([(3, 4, 4), (5, 2, 2), (5, 2, 2)], [(4, 4, 4), (6, 2, 2), (6, 2, 2)])
    term = one_term("ab", ctx, stages=[1, 3])
    assert term.stages == [0, 2] and term.layer_weights == [0.5, 1.0] and len(term.connectors) == 2


# -- FT ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p,reduction", [(1, "mean"), (1, "sum"), (2, "mean")])
def test_ft_matches_the_normalised_factor_distance_by_hand(p, reduction):
    # student's last map is 2x larger than the teacher's: the student factor is average-pooled to 2x2
    ctx = context([(3, 4, 4), (5, 4, 4)], [(4, 4, 4), (6, 2, 2)])
    term = one_term("ft", ctx, p=p, reduction=reduction).eval()
    gen = torch.Generator().manual_seed(2)
    s_last, t_last = rand(3, 5, 4, 4, gen=gen), rand(3, 6, 2, 2, gen=gen)
    student = taps(rand(3, 4, 8, 8, gen=gen), [rand(3, 3, 4, 4, gen=gen), s_last])
    teacher = taps(rand(3, 4, 8, 8, gen=gen), [rand(3, 4, 4, 4, gen=gen), t_last])
    loss = term(batch_of(student, teacher))["ft"]

    with torch.no_grad():  # the networks are plain conv stacks; the formula is what is checked here
        f_t = term.paraphraser.encoder(t_last).numpy()
        f_s = block_mean(term.translator(s_last).numpy(), (2, 2))
    assert f_t.shape == (3, 3, 2, 2)  # int(0.5 * 6) factor channels
    per_sample = []
    for b in range(3):
        a, c = f_t[b].ravel(), f_s[b].ravel()
        a, c = a / np.sqrt((a**2).sum()), c / np.sqrt((c**2).sum())
        dist = sum(abs(x - y) ** p for x, y in zip(a, c, strict=True))
        per_sample.append(dist / len(a) if reduction == "mean" else dist)
    assert loss.item() == pytest.approx(np.mean(per_sample), rel=1e-10)


# -- FSP ---------------------------------------------------------------------------------------------------------

def fsp_by_hand(bottom: np.ndarray, top: np.ndarray) -> np.ndarray:
    if bottom.shape[2] > top.shape[2]:
        bottom = block_mean(bottom, top.shape[2:])
    b, m, h, w = bottom.shape
    n = top.shape[1]
    g = np.zeros((b, m, n))
    for k in range(b):
        for i in range(m):
            for j in range(n):
                g[k, i, j] = sum(bottom[k, i, s, t] * top[k, j, s, t] for s in range(h) for t in range(w)) / (h * w)
    return g


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fsp_matches_the_flow_matrices_by_hand(reduction):
    ctx = context([(3, 8, 8), (5, 4, 4)], [(3, 8, 8), (5, 4, 4)])
    term = one_term("fsp", ctx, reduction=reduction)
    gen = torch.Generator().manual_seed(3)
    s = [rand(2, 4, 8, 8, gen=gen), rand(2, 3, 8, 8, gen=gen), rand(2, 5, 4, 4, gen=gen)]
    t = [rand(2, 4, 8, 8, gen=gen), rand(2, 3, 8, 8, gen=gen), rand(2, 5, 4, 4, gen=gen)]
    losses = term(batch_of(taps(s[0], s[1:]), taps(t[0], t[1:])))

    for k in range(2):  # stage k+1: (stem or previous stage) -> stage output
        g_s = fsp_by_hand(s[k].numpy(), s[k + 1].numpy())
        g_t = fsp_by_hand(t[k].numpy(), t[k + 1].numpy())
        sq = (g_t - g_s) ** 2
        expected = sq.mean() if reduction == "mean" else sq.sum(axis=(1, 2)).mean()
        assert losses[f"fsp/stage{k + 1}"].item() == pytest.approx(expected, rel=1e-10)


# -- gradients: the student side only ----------------------------------------------------------------------------

def _student_and_teacher(name: str, gen):
    if name == "ft":
        ctx = context([(3, 4, 4), (5, 2, 2)], [(4, 4, 4), (6, 2, 2)])
    elif name == "ab":
        ctx = context([(3, 4, 4), (5, 2, 2)], [(4, 4, 4), (6, 2, 2)])
    else:
        ctx = context([(3, 4, 4), (5, 2, 2)], [(3, 4, 4), (5, 2, 2)], s_stem=(4, 4, 4), t_stem=(4, 4, 4))
    shapes_s = [ctx.student_shapes["stem"], *ctx.student_shapes["stages"]]
    shapes_t = [ctx.teacher_shapes["stem"], *ctx.teacher_shapes["stages"]]
    s = [rand(2, *shape, gen=gen).requires_grad_() for shape in shapes_s]
    t = [rand(2, *shape, gen=gen).requires_grad_() for shape in shapes_t]
    return ctx, s, t


@pytest.mark.parametrize("name", METHODS)
def test_gradients_reach_the_student_and_never_the_teacher(name):
    gen = torch.Generator().manual_seed(4)
    ctx, s, t = _student_and_teacher(name, gen)
    term = one_term(name, ctx).eval()

    def loss(*student):
        return sum(term(batch_of(taps(student[0], student[1:]), taps(t[0], t[1:]))).values())

    assert torch.autograd.gradcheck(loss, tuple(s), eps=1e-6, atol=1e-7)
    loss(*s).backward()
    assert all(x.grad is None for x in t)
    assert s[-1].grad is not None and float(s[-1].grad.abs().sum()) > 0  # every method reads the last stage
    if name == "ft":  # the fixed paraphraser gets nothing in the main loop; the translator learns
        assert all(p.grad is None and not p.requires_grad for p in term.paraphraser.parameters())
        assert all(p.grad is not None for p in term.translator.parameters())
    if name == "ab":
        assert all(p.grad is not None for p in term.connectors.parameters())


@pytest.mark.parametrize("name", ["ab", "fsp"])
def test_main_loop_false_contributes_zero_on_the_graph(name):
    gen = torch.Generator().manual_seed(5)
    ctx, s, t = _student_and_teacher(name, gen)
    term = one_term(name, ctx, main_loop=False)
    losses = term(batch_of(taps(s[0], s[1:]), taps(t[0], t[1:])))
    assert list(losses) == [name] and losses[name].item() == 0.0 and losses[name].requires_grad


# -- registry, needs, errors -------------------------------------------------------------------------------------

def test_the_methods_are_builtin_after_the_cktf_terms_and_declare_their_needs():
    assert BUILTIN_TERMS[:4] == ("ce", "mckt", "pckt", "kd") and set(METHODS) <= set(BUILTIN_TERMS[4:])
    specs = {s.name: s for s in resolve_terms(LossConfig(terms={"ab": {}, "ft": {}, "fsp": {}, "pckt": {}}))}
    assert [s for s in specs] == ["pckt", "ab", "ft", "fsp"]
    assert specs["ab"].needs.same_stage_count and specs["fsp"].needs.same_stage_count
    assert not specs["ft"].needs.same_stage_count
    for name in METHODS:
        needs = specs[name].needs
        assert needs.init_phase and not needs.labels and not needs.negatives and not needs.memory_banks
    assert {s.name: s.options.weight for s in specs.values()} == {"pckt": 0.2, "ab": 1.0, "ft": 200.0, "fsp": 50.0}
    no_init = resolve_terms(LossConfig(terms={"ab": {"init_epochs": 0}}))[0]
    assert not no_init.needs.init_phase


@pytest.mark.parametrize("name,options,needles", [
    ("ab", {"margn": 1.0}, ["'loss.terms.ab.margn'", "did you mean 'loss.terms.ab.margin'"]),
    ("ab", {"stages": [0]}, ["loss.terms.ab.stages", "≥ 1"]),
    ("ab", {"stages": [2, 2]}, ["loss.terms.ab.stages", "distinct"]),
    ("ft", {"p": 3}, ["loss.terms.ft.p", "in [1, 2]"]),
    ("ft", {"reduction": "max"}, ["loss.terms.ft.reduction", "one of 'mean'"]),
    ("fsp", {"init_epochs": -1}, ["loss.terms.fsp.init_epochs", "≥ 0"]),
    ("fsp", {"stagse": [1]}, ["did you mean 'loss.terms.fsp.stages'"]),
])
def test_bad_options_are_one_line_naming_the_key(name, options, needles):
    with pytest.raises(CKTFError) as excinfo:
        resolve_terms(LossConfig(terms={name: options}))
    assert_one_line(excinfo, *needles)


@pytest.mark.parametrize("name,options,ctx,needles", [
    ("ab", {"stages": [3]}, context([(3, 4, 4), (5, 2, 2)], [(4, 4, 4), (6, 2, 2)]),
     ["loss.terms.ab.stages", "stage 3 does not exist", "2 stages"]),
    ("ab", {}, context([(3, 4, 4), (5, 2, 2)], [(4, 4, 4), (6, 4, 4)]),
     ["loss.terms.ab.stages", "stage 2", "(5, 2, 2)", "(6, 4, 4)", "spatial size"]),
    ("ft", {"stage": 4}, context([(3, 4, 4), (5, 2, 2)], [(4, 4, 4), (6, 2, 2), (6, 2, 2)]),
     ["loss.terms.ft.stage", "stage 4 does not exist"]),
    ("ft", {"rate": 0.1}, context([(3, 4, 4), (5, 2, 2)], [(4, 4, 4), (6, 2, 2)]),
     ["loss.terms.ft.rate", "no factor channel"]),
    ("fsp", {"stages": [9]}, context([(3, 4, 4)], [(3, 4, 4)]), ["loss.terms.fsp.stages", "stage 9 does not exist"]),
    ("fsp", {}, context([(3, 4, 4), (5, 2, 2)], [(3, 4, 4), (6, 2, 2)]),
     ["loss.terms.fsp.stages", "stage 2 maps 3 → 5", "3 → 6", "equal widths"]),
])
def test_stages_that_do_not_exist_or_do_not_fit_are_one_line(name, options, ctx, needles):
    with pytest.raises(CKTFError) as excinfo:
        build_terms(LossConfig(terms={name: options}), ctx)
    assert_one_line(excinfo, *needles)


def test_fsp_on_chosen_stages_skips_the_incompatible_one():
    ctx = context([(3, 4, 4), (5, 2, 2)], [(3, 4, 4), (6, 2, 2)])
    assert one_term("fsp", ctx, stages=[1]).stages == [0]


# -- init phases on tiny networks --------------------------------------------------------------------------------

def tiny_task(name: str, **options):
    torch.manual_seed(0)
    student = FeatureTaps(build_model("resnet8", 1, 3), tap_spec_for("resnet8"))
    teacher = FeatureTaps(build_model("resnet8", 1, 3), tap_spec_for("resnet8"))
    shape = (1, 12, 12)
    ctx = TermContext(student.channels(shape), teacher.channels(shape), num_items=8,
                      student_shapes=student.shapes(shape), teacher_shapes=teacher.shapes(shape))
    terms, weights = build_terms(LossConfig(terms={name: {"init_epochs": 2, **options}}), ctx)
    task = TransferTask(student, teacher, terms, weights, None)
    data = TensorDataset(torch.rand(8, 1, 12, 12), torch.full((8,), -1), torch.arange(8))
    loader = DataLoader(data, batch_size=4)
    return task, loader


@pytest.mark.parametrize("name", METHODS)
def test_the_init_phase_trains_what_the_paper_pretrains(name):
    task, loader = tiny_task(name)
    term = task.terms[name]
    student0 = {k: v.clone() for k, v in task.student.state_dict().items()}
    teacher0 = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    own0 = {k: v.clone() for k, v in term.state_dict().items() if k != "init_loss"}
    trainable = {id(p) for p in task.trainable_parameters()}
    assert task.init_phases(loader, torch.device("cpu"), loader) == [name]

    assert all(torch.equal(v, task.teacher.state_dict()[k]) for k, v in teacher0.items())
    student_moved = any(not torch.equal(v, task.student.state_dict()[k]) for k, v in student0.items())
    assert student_moved == (name in ("ab", "fsp"))  # FT pre-trains only its paraphraser
    assert bool((term.init_loss > 0).all()) and term.init_loss.shape == (2,)
    if name == "ab":
        assert any(not torch.equal(v, term.state_dict()[k]) for k, v in own0.items() if "connectors" in k)
    if name == "ft":
        assert any(not torch.equal(v, term.state_dict()[k]) for k, v in own0.items() if "paraphraser" in k)
        assert all(torch.equal(v, term.state_dict()[k]) for k, v in own0.items() if "translator" in k)
        assert not any(p.requires_grad or id(p) in trainable for p in term.paraphraser.parameters())
        assert all(id(p) in trainable for p in term.translator.parameters())
        assert term.init_loss[1] < term.init_loss[0]  # the reconstruction improves


# -- end to end: cktf transfer from the fashion_lowres configs ---------------------------------------------------


def test_the_committed_configs_have_the_lowres_proxy_data_and_the_new_loss_form():
    for name in METHODS:
        for stem, terms in ((name, [name]), (f"cktf_{name}", ["mckt", "pckt", name])):
            cfg = yaml.safe_load((LOWRES / f"{stem}.yaml").read_text())
            assert cfg["data"]["options"] == {"source_classes": list(range(10)), "target_classes": list(range(10)),
                                              "split_images": True, "target_shift": "lowres"}
            assert cfg["data"]["train_split"] == "target_unlabeled" and cfg["student"] == {"name": "resnet8"}
            assert cfg["teacher"]["checkpoint"] == "runs/fashion_lowres_teacher/best.safetensors"
            assert cfg["loss"]["method"] == stem and list(cfg["loss"]["terms"]) == terms
            if stem.startswith("cktf_"):  # θ = 1 on the method's own loss, which keeps its usual weight β
                assert cfg["loss"]["terms"][name]["weight"] == TERMS[name].Options().weight
            resolve_terms(LossConfig(terms=cfg["loss"]["terms"]))


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("combined", [False, True], ids=["alone", "cktf"])
def test_transfer_runs_end_to_end_from_the_lowres_config(lowres_fixture, name, combined):
    stem = f"cktf_{name}" if combined else name
    config = LOWRES / f"{stem}.yaml"
    code, out = lowres_transfer(lowres_fixture, config, stem, f"--loss.terms.{name}.{INIT[name]}", "1")
    assert code == 0, out
    assert f"method {stem}" in out
    ckpt = load_checkpoint(lowres_fixture / "runs" / stem / "last.safetensors")
    state, history = ckpt.state["task"], ckpt.state["history"][0]
    assert float(state[f"terms.{name}.init_loss"][0]) > 0  # the init phase ran (one epoch)
    assert any(k.startswith(f"train/{name}") for k in history), history
    assert not any(k.startswith("teacher.") for k in state)
    own = {"ab": "connectors.0.0.weight", "ft": "paraphraser.encoder.0.weight", "fsp": "init_loss"}[name]
    assert f"terms.{name}.{own}" in state
    if combined:
        assert any(k.startswith("train/mckt/") for k in history) and "train/pckt_epoch" in history
        assert ckpt.metadata["terms"].endswith(f'"{name}": {TERMS[name].Options().weight}}}')


@pytest.mark.parametrize("name", METHODS)
def test_transfer_with_cross_entropy_on_a_labeled_split(lowres_fixture, name):
    config = LOWRES / f"{name}.yaml"
    code, out = lowres_transfer(lowres_fixture, config, f"{name}_ce", f"--loss.terms.{name}.{INIT[name]}", "1",
                                "--data.options.labels_per_class", "5", "--data.train_split", "target_train",
                                "--loss.terms.ce.weight", "1")
    assert code == 0, out
    history = load_checkpoint(lowres_fixture / "runs" / f"{name}_ce" / "last.safetensors").state["history"][0]
    assert "train/ce_epoch" in history or "train/ce" in history, history


def test_bad_term_options_on_the_command_line_stop_before_the_run(lowres_fixture):
    config = LOWRES / "cktf_ab.yaml"
    code, out = lowres_transfer(lowres_fixture, config, "bad_ab", "--loss.terms.ab.stages", "[7]")
    one_line_error(code, out, "loss.terms.ab.stages", "stage 7 does not exist")
    code, out = lowres_transfer(lowres_fixture, config, "bad_ab", "--loss.terms.ab.init_epoch", "1")
    one_line_error(code, out, "did you mean 'loss.terms.ab.init_epochs'")
    assert not (lowres_fixture / "runs/bad_ab").exists()
