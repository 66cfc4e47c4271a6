"""Loss terms as plugins: a method is one file (a registered term) and one YAML.

The acceptance test registers a toy term from inside this file, writes a YAML naming it and runs `cktf transfer`
with it — no other file of the project knows the term. The rest checks how a config names terms: unknown terms
and options, types and ranges, a term that needs labels on an unlabeled split, the old flat loss keys, and
`cktf methods`.
"""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from tests.cli_helpers import invoke, one_line_error
from tests.lowres_runs import LOWRES, lowres_transfer
from transfer.config import LossConfig, NCEConfig, TransferConfig, load_config, option, read_config_tree
from transfer.engine.checkpoint import load_checkpoint
from transfer.engine.frozen import Frozen
from transfer.engine.task import Task
from transfer.errors import CKTFError
from transfer.losses.terms import (
    TERMS,
    InitPhase,
    LossTerm,
    Needs,
    TermContext,
    TermOptions,
    TransferBatch,
    build_terms,
    register_term,
    resolve_terms,
    unregister_term,
)
from transfer.models import FeatureTaps, build_model, tap_spec_for

REPO = Path(__file__).resolve().parents[1]
CONFIGS = LOWRES


# -- the toy method: everything it is, in this one block ------------------------------------------------------

@dataclass
class L2Options(TermOptions):
    normalize: bool = option(True, help="L2-normalise both vectors before comparing them")
    scale: float = option(1.0, help="multiplies the distance", min=0.0)


class L2Term(LossTerm):
    """Mean squared distance between the regressed student and the teacher penultimate vectors."""

    Options = L2Options
    paper = "toy term of tests/test_term_plugins.py (a FitNet-style hint on the penultimate layer)"

    @classmethod
    def declare(cls, options: L2Options, nce: NCEConfig) -> Needs:
        return Needs(taps=("penultimate",), init_phase=True)

    def __init__(self, options: L2Options, ctx: TermContext) -> None:
        super().__init__(options, ctx)
        self.regressor = nn.Linear(ctx.student_channels["penultimate"], ctx.teacher_channels["penultimate"])
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def init_phase(self, phase: InitPhase) -> None:
        for batch in phase.eval_batches():
            self.seen += len(batch.indices)

    def forward(self, batch: TransferBatch) -> dict[str, torch.Tensor]:
        s, t = self.regressor(batch.student.penultimate.float()), batch.teacher.penultimate.float()
        if self.options.normalize:
            s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
        return {"l2": self.options.scale * F.mse_loss(s, t)}


@pytest.fixture
def l2_term():
    register_term("l2")(L2Term)
    yield L2Term
    unregister_term("l2")


# ---------------------------------------------------------------------------------------------------------------


def yaml_with_loss(tmp_path: Path, loss: dict, base: str = "crd.yaml") -> Path:
    cfg = yaml.safe_load((CONFIGS / base).read_text())
    cfg["loss"] = loss
    path = tmp_path / "method.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_term_registered_in_a_test_runs_a_transfer_from_its_yaml(lowres_fixture, tmp_path, l2_term):
    config = yaml_with_loss(tmp_path, {"method": "l2_hint", "terms": {"l2": {"weight": 0.5, "normalize": False,
                                                                            "scale": 2.0}}})
    code, out = lowres_transfer(lowres_fixture, config, "l2")
    assert code == 0, out
    assert "method l2_hint" in out
    run = lowres_fixture / "runs/l2"
    ckpt = load_checkpoint(run / "last.safetensors")
    state = ckpt.state["task"]
    assert {"terms.l2.regressor.weight", "terms.l2.regressor.bias"} <= set(state)
    assert int(state["terms.l2.seen"]) == 100  # the init phase saw every item of the pool (the 100 target images)
    assert not any("bank_" in k for k in state) and not any(k.startswith("teacher.") for k in state)
    assert "train/l2_epoch" in ckpt.state["history"][0], ckpt.state["history"][0]
    saved = yaml.safe_load((run / "config.yaml").read_text())["loss"]
    assert saved["terms"] == {"l2": {"weight": 0.5, "normalize": False, "scale": 2.0}}
    assert ckpt.metadata["method"] == "l2_hint" and ckpt.metadata["terms"] == '{"l2": 0.5}'

    # --resume continues from the checkpoint: the init phase is not run again
    code, out = lowres_transfer(lowres_fixture, config, "l2", "--train.epochs", "2", "--resume", "--allow-change",
                                "train.epochs")
    assert code == 0, out
    resumed = load_checkpoint(run / "last.safetensors").state
    assert len(resumed["history"]) == 2 and int(resumed["task"]["terms.l2.seen"]) == 100

    # an option given on the command line is validated against the toy term's own dataclass
    code, out = lowres_transfer(lowres_fixture, config, "l2_bad", "--loss.terms.l2.scal", "3")
    one_line_error(code, out, "loss.terms.l2.scal", "did you mean 'loss.terms.l2.scale'")
    code, out = invoke("methods")
    assert code == 0 and "l2: Mean squared distance" in out and "--loss.terms.l2.normalize" in out
    assert "toy term of tests/test_term_plugins.py" in out


def test_a_term_needing_labels_on_an_unlabeled_split_is_one_line(lowres_fixture):
    code, out = lowres_transfer(lowres_fixture, CONFIGS / "crd.yaml", "ce_unlabeled", "--loss.terms.ce.weight", "1")
    one_line_error(code, out, "loss.terms.ce needs labels", "target_unlabeled")
    assert not (lowres_fixture / "runs/ce_unlabeled").exists()


@pytest.mark.parametrize("extra,needles", [
    (["--loss.terms.nosuch.weight", "1"], ["unknown loss term 'loss.terms.nosuch'", "cktf methods"]),
    (["--loss.terms.pcktt.weight", "1"], ["did you mean 'loss.terms.pckt'"]),
    (["--loss.terms.kd.temprature", "4"], ["'loss.terms.kd.temprature'", "did you mean 'loss.terms.kd.temperature'"]),
    (["--loss.terms.kd.temperature", "hot"], ["loss.terms.kd.temperature", "expected a number"]),
    (["--loss.terms.kd.temperature", "0"], ["loss.terms.kd.temperature", "≥ 0.0001"]),
    (["--loss.terms.pckt.weight", "-1"], ["loss.terms.pckt.weight", "≥ 0.0"]),
    (["--loss.terms.mckt.layer_mapping", "middle"], ["loss.terms.mckt.layer_mapping", "one of 'last'"]),
    (["--loss.terms.pckt.weight", "0"], ["weight 0"]),
    (["--loss.terms.kd", "1"], ["loss.terms.kd", "mapping"]),
    (["--loss.nce.temprature", "0.1"], ["did you mean 'loss.nce.temperature'"]),
])
def test_bad_terms_and_options_are_one_line_before_the_run_starts(lowres_fixture, extra, needles):
    code, out = lowres_transfer(lowres_fixture, CONFIGS / "crd.yaml", "bad", *extra)
    one_line_error(code, out, *needles)
    assert not (lowres_fixture / "runs/bad").exists()


@pytest.mark.parametrize("old,new,example", [
    ({"pckt": 1.0}, "loss.terms.pckt.weight", "configs/fashion_split/crd.yaml"),
    ({"mckt": 0.8}, "loss.terms.mckt.weight", "configs/fashion_split/cktf.yaml"),
    ({"kd_temperature": 4.0}, "loss.terms.kd.temperature", "configs/fashion_split/kd.yaml"),
    ({"temperature": 0.07}, "loss.nce.temperature", "configs/fashion_split/crd.yaml"),
    ({"layer_mapping": "last"}, "loss.terms.mckt.layer_mapping", "configs/fashion_split/cktf.yaml"),
])
def test_an_old_style_config_shows_the_new_form_in_one_line(tmp_path, old, new, example):
    key = next(iter(old))
    config = yaml_with_loss(tmp_path, {"method": "crd", **old})
    code, out = invoke("transfer", "--config", str(config))
    one_line_error(code, out, f"loss.{key} is now {new}", example, str(config))
    code, out = invoke("transfer", "--config", str(CONFIGS / "crd.yaml"), f"--loss.{key}", str(old[key]))
    one_line_error(code, out, f"loss.{key} is now {new}", "on the command line")


def test_an_old_style_config_is_refused_without_importing_torch(tmp_path):
    config = yaml_with_loss(tmp_path, {"method": "crd", "pckt": 1.0})
    probe = ("import sys\nfrom transfer.cli import cli\n"
             "try:\n    cli.main(sys.argv[1:], prog_name='cktf')\nexcept SystemExit:\n    pass\n"
             "print('torch imported' if 'torch' in sys.modules else 'no torch')\n")
    done = subprocess.run([sys.executable, "-c", probe, "transfer", "--config", str(config)], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.stdout.strip().endswith("no torch"), (done.stdout, done.stderr)
    assert "loss.pckt is now loss.terms.pckt.weight" in done.stderr


def test_cktf_methods_lists_every_term_with_options_and_paper():
    code, out = invoke("methods")
    assert code == 0, out
    for name, cls in TERMS.items():
        assert f"\n{name}: " in out and cls.paper in out
    for row in ("--loss.terms.kd.temperature", "a number", "[default: 4.0]", "--loss.terms.mckt.layer_mapping",
                "one of 'last', 'first', 'random', 'largest', 'smallest'", "[default: 0.8]", "arXiv 1910.10699",
                "arXiv 1503.02531", "same_stage_count", "negatives", "labels"):
        assert row in out, row
    code, out = invoke("transfer", "--help")
    assert code == 0 and "cktf methods" in out and "--loss.terms" in out and "--loss.nce.temperature" in out


def test_term_options_from_the_command_line_take_numbers_in_exponent_form(tmp_path):
    cfg = load_config(CONFIGS / "cktf_kd.yaml", TransferConfig,
                      ["--loss.terms.kd.temperature", "1e-3", "--loss.terms.mckt.weight", "0"])
    specs = {spec.name: spec for spec in resolve_terms(cfg.loss)}
    assert specs["kd"].options.temperature == pytest.approx(1e-3)
    assert not specs["mckt"].active and specs["pckt"].active  # weight 0: validated, not built


def tapped_pair():
    student = FeatureTaps(build_model("resnet8", 1, 5), tap_spec_for("resnet8"))
    teacher = FeatureTaps(build_model("resnet8", 1, 5), tap_spec_for("resnet8"))
    shape = (1, 28, 28)
    return TermContext(student.channels(shape), teacher.channels(shape), num_items=20)


def test_terms_are_built_in_registration_order_whatever_the_yaml_order():
    ctx = tapped_pair()
    built = []
    for terms in ({"mckt": {}, "pckt": {}, "kd": {}}, {"kd": {}, "pckt": {}, "mckt": {}}):
        torch.manual_seed(0)
        modules, weights = build_terms(LossConfig(terms=terms), ctx)
        built.append((list(modules), weights, modules.state_dict()))
    assert built[0][0] == built[1][0] == ["mckt", "pckt", "kd"]
    assert built[0][1] == built[1][1] == {"mckt": 0.8, "pckt": 0.2, "kd": 1.0}  # each term's own default weight
    for key, value in built[0][2].items():
        torch.testing.assert_close(value, built[1][2][key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_declared_needs_follow_the_options():
    needs = {spec.name: spec.needs for spec in resolve_terms(LossConfig(
        nce=NCEConfig(bank_init="embed"),
        terms={"mckt": {"layer_mapping": "random"}, "pckt": {}, "kd": {}, "ce": {}}))}
    assert needs["mckt"].teacher_blocks and needs["mckt"].same_stage_count and needs["mckt"].init_phase
    assert needs["pckt"].negatives and needs["pckt"].memory_banks and not needs["pckt"].teacher_blocks
    assert not needs["kd"].negatives and needs["ce"].labels and needs["kd"].taps == ("logits",)
    assert not resolve_terms(LossConfig(terms={"mckt": {}}))[0].needs.teacher_blocks  # last: no blocks


def test_registering_a_term_checks_its_class():
    with pytest.raises(ValueError, match="already registered"):
        register_term("kd")(L2Term)
    with pytest.raises(TypeError, match="paper"):
        register_term("nopaper")(type("NoPaper", (LossTerm,), {"Options": L2Options}))
    with pytest.raises(TypeError, match="Options"):
        register_term("nooptions")(type("NoOptions", (LossTerm,), {"Options": dict, "paper": "x"}))
    assert "nopaper" not in TERMS and "nooptions" not in TERMS
    with pytest.raises(CKTFError, match="unknown loss term"):
        resolve_terms(LossConfig(terms={"nopaper": {}}))


class _Holder(Task):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        self.frozen = Frozen(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))


def test_frozen_networks_stay_in_eval_get_no_gradients_and_stay_out_of_checkpoints():
    task = _Holder()
    task.train()
    assert task.net.training and not task.frozen.training and not any(m.training for m in task.frozen.modules())
    assert all(not p.requires_grad for p in task.frozen.parameters())
    assert {id(p) for p in task.trainable_parameters()} == {id(p) for p in task.net.parameters()}
    state = task.checkpoint_state()
    assert state and all(k.startswith("net.") for k in state)
    other = _Holder()
    other.load_checkpoint_state(state)  # the frozen part is not expected back
    with pytest.raises(RuntimeError, match="missing"):
        other.load_checkpoint_state({k: v for k, v in state.items() if k != "net.0.weight"})


def _transfer_configs() -> list[Path]:
    """Every runnable transfer config (``_*.yaml`` are only ``base:`` parts of others)."""
    return sorted(p for p in (REPO / "configs").rglob("*.yaml") if not p.name.startswith("_")
                  and "loss" in read_config_tree(p))


@pytest.mark.parametrize("path", _transfer_configs(), ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_transfer_config_is_in_the_term_form(path):
    cfg = load_config(path, TransferConfig)  # an old flat key would be a CKTFError here
    specs = resolve_terms(cfg.loss)
    assert any(spec.active for spec in specs) and all(spec.active for spec in specs), "weight-0 terms are left out"


def test_fashion_lowres_reference_configs_are_the_published_objective():
    """crd_reference/cktf_reference: linear heads, τ 0.07, pckt 1.0 / mckt 0.04, batch norm + reference pooling of
    the stages, per-batch mapping (the sampler's per-anchor negatives and plain momentum are outside the loss)."""
    lowres = REPO / "configs/fashion_lowres"
    cktf = load_config(lowres / "cktf_reference.yaml", TransferConfig)
    crd = load_config(lowres / "crd_reference.yaml", TransferConfig)
    assert cktf.loss.terms == {"mckt": {"weight": 0.04, "layer_mapping": "last", "mapping_schedule": "per_batch"},
                               "pckt": {"weight": 1.0}}
    assert cktf.loss.nce == NCEConfig(temperature=0.07, projection="linear", stage_norm="batch", stage_pool="reference")
    assert crd.loss.terms == {"pckt": {"weight": 1.0}}
    assert crd.loss.nce == NCEConfig(temperature=0.07, projection="linear")
    assert not cktf.sampler.shared and not crd.sampler.shared and not cktf.train.nesterov and not crd.train.nesterov
