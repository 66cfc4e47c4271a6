"""The Python API: the README's example runs as written, and CKTFLoss is the CLI's objective."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from transfer.api import CKTFLoss

REPO = Path(__file__).resolve().parents[1]
HEADING = "### From Python: the losses in your own training loop"


def readme_example() -> str:
    """The first ```python block under :data:`HEADING` in README.md."""
    text = (REPO / "README.md").read_text()
    assert HEADING in text, f"README.md lost its section {HEADING!r}"
    section = text.split(HEADING, 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "no python block under the heading"
    return found.group(1)


def test_readme_example_trains_the_student():
    code = readme_example()
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 20
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), namespace)
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
    objective = CKTFLoss(student, teacher, num_items=8, sample_input=images, num_negatives=4, mckt=0.0, pckt=1.0)
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


def test_weights_choose_the_method_as_on_the_command_line():
    student, teacher = _pair()
    images = torch.rand(6, 3, 32, 32)
    kd = CKTFLoss(student, teacher, num_items=6, sample_input=images, mckt=0.0, pckt=0.0, kd=1.0)
    assert kd.task.sampler is None
    kd(images, torch.arange(6))
    assert set(kd.last_terms) == {"kd"}
    with pytest.raises(Exception, match="num_negatives"):
        CKTFLoss(student, teacher, num_items=6, sample_input=images, num_negatives=6)


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
