"""The Python API: the example of the docs' Python API page runs as written, and CKTFLoss is the CLI's objective."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from transfer.api import CKTFLoss
from transfer.config import NCEConfig
from transfer.errors import CKTFError

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "own-data" / "python-api.md"
HEADING = "## From Python: the losses in your own training loop"


def docs_example() -> str:
    """The first ```python block under :data:`HEADING` on the Python API page (:data:`PAGE`)."""
    text = PAGE.read_text()
    assert HEADING in text, f"{PAGE} lost its section {HEADING!r}"
    section = text.split(HEADING, 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "no python block under the heading"
    return found.group(1)


def test_the_documented_example_trains_the_student():
    code = docs_example()
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 20
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(code, str(PAGE), "exec"), namespace)
    student, teacher, objective = namespace["student"], namespace["teacher"], namespace["objective"]
    assert torch.isfinite(namespace["loss"])
    assert {"pckt", "mckt/stem", "mckt/stage4"} <= set(objective.last_terms)
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    fresh = torchvision.models.resnet18(num_classes=10).state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in student.state_dict().items() if k.endswith("weight"))


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=4), torchvision.models.resnet18(num_classes=4)


def test_only_the_student_and_heads_learn_and_the_teacher_stays_frozen():
    student, teacher = _pair()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    images = torch.rand(8, 3, 32, 32)
    objective = CKTFLoss(student, teacher, num_items=8, sample_input=images, num_negatives=4,
                         terms={"pckt": 1.0})
    objective.train()
    assert not teacher.training and student.training
    ids = {id(p) for p in objective.trainable_parameters()}
    assert all(id(p) in ids for p in student.parameters())
    assert not any(id(p) in ids for p in teacher.parameters())
    loss = objective(images, torch.arange(8))
    loss.backward()
    assert set(objective.last_terms) == {"pckt"}
    assert student.fc.weight.grad is None  # CRD alone never reaches the classifier
    assert student.layer4[1].conv2.weight.grad.abs().sum() > 0
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_terms_choose_the_method_as_in_a_config():
    student, teacher = _pair()
    images = torch.rand(6, 3, 32, 32)
    kd = CKTFLoss(student, teacher, num_items=6, sample_input=images, terms={"kd": 1.0})
    assert kd.task.sampler is None
    kd(images, torch.arange(6))
    assert set(kd.last_terms) == {"kd"}
    with pytest.raises(Exception, match="num_negatives"):
        CKTFLoss(student, teacher, num_items=6, sample_input=images, num_negatives=6)


@pytest.mark.slow(reason="three real interpreters: which modules an import loads is what it checks")
def test_import_transfer_and_import_teacher_help_do_not_import_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, transfer; transfer.__version__; "
                           "print('torch' in sys.modules)"], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip() == "False", done.stderr
    probe = ("import sys\nfrom transfer.cli import cli\ntry:\n    cli.main(['import-teacher', '--help'], "
             "prog_name='cktf')\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert "--weights" in done.stdout and done.stdout.strip().endswith("False"), done.stderr
    done = subprocess.run([sys.executable, "-c", "import transfer; print(transfer.CKTFLoss.__name__)"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip() == "CKTFLoss", done.stderr


def test_term_options_and_nce_reach_the_terms_with_cktf_defaults_elsewhere():
    student, teacher = _pair()
    images = torch.rand(6, 3, 32, 32)
    default = CKTFLoss(student, teacher, num_items=6, sample_input=images, num_negatives=4)
    assert default.weights == {"mckt": 0.8, "pckt": 0.2}
    assert default.loss_config.nce == NCEConfig()  # CKTF's: d 128, tau 0.1, momentum 0.5, linear heads
    student, teacher = _pair()
    objective = CKTFLoss(student, teacher, num_items=6, sample_input=images, num_negatives=4,
                         terms={"mckt": {"weight": 0.5, "layer_mapping": "first"}, "kd": {"temperature": 2.0}},
                         nce={"temperature": 0.07, "embed_dim": 32})
    assert objective.weights == {"mckt": 0.5, "kd": 1.0}
    terms = objective.task.terms
    assert terms["kd"].options.temperature == 2.0 and terms["mckt"].options.layer_mapping == "first"
    assert objective.loss_config.nce.temperature == 0.07 and objective.loss_config.nce.momentum == 0.5
    nce = terms["mckt"].pairs["stem"].objective
    assert (nce.dim, nce.temperature) == (32, 0.07)
    objective(images, torch.arange(6))
    assert {"mckt/stem", "kd"} <= set(objective.last_terms) and "pckt" not in objective.last_terms


def test_bad_terms_and_old_keywords_are_one_line():
    student, teacher = _pair()
    images = torch.rand(6, 3, 32, 32)
    with pytest.raises(CKTFError, match="did you mean 'loss.terms.kd.temperature'"):
        CKTFLoss(student, teacher, num_items=6, sample_input=images, terms={"kd": {"temprature": 2.0}})
    with pytest.raises(CKTFError, match="unknown loss term 'loss.terms.kdd'"):
        CKTFLoss(student, teacher, num_items=6, sample_input=images, terms={"kdd": 1.0})
    with pytest.raises(CKTFError, match="did you mean 'nce.temperature'"):
        CKTFLoss(student, teacher, num_items=6, sample_input=images, nce={"temprature": 0.07})
    with pytest.raises(TypeError, match=r"mckt=\.\.\.\) is the old form: it is now terms=\{'mckt': <weight>\}"):
        CKTFLoss(student, teacher, num_items=6, sample_input=images, mckt=0.8)
    with pytest.raises(TypeError, match=r"now nce=\{'temperature': \.\.\.\}"):
        CKTFLoss(student, teacher, num_items=6, sample_input=images, temperature=0.07)
    with pytest.raises(TypeError, match=r"now terms=\{'kd': \{'temperature': \.\.\.\}\}"):
        CKTFLoss(student, teacher, num_items=6, sample_input=images, kd_temperature=2.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        CKTFLoss(student, teacher, num_items=6, sample_input=images, bogus=1)
