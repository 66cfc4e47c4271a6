"""Forward passes on CUDA without a GPU: every shipped transfer config's networks, terms, bank updates and
negative draws, the probe's feature extraction and the Python API, on fake CUDA tensors (tests/fake_cuda.py),
where a tensor left on the CPU next to a CUDA one raises as on a GPU.

Only forward passes run: fake tensors hold no values, so backward cannot run this way (the NCE loss's
custom autograd functions read bank rows on the host), nor can anything that chooses by value (host reads
get a placeholder: the first teacher block, no missing labels, a known ``Z``), nor the terms' training
phases before the main loop (FitNet's hint stage, AB/FT/FSP pre-training); the banks' fill by the heads
(``bank_init embed``) does run. The CUDA machine check (benchmarks/gpu_check.sh) covers training for real.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
import torchvision
from torch.utils.data import TensorDataset

from tests.fake_cuda import CUDA, FakeCuda, on_cuda, to_cuda
from transfer.api import CKTFLoss
from transfer.config import TransferConfig
from transfer.config.loader import load_config, read_config_tree
from transfer.data import default_image_size
from transfer.engine.performance import prepare_network, use_channels_last
from transfer.losses import objective
from transfer.losses.nce import NCEObjective
from transfer.losses.terms import TransferBatch, build_terms
from transfer.models import build_model, tap_spec_for
from transfer.models.registry import get_entry, reference_pool
from transfer.sampling import build_sampler
from transfer.tasks.transfer import TransferTask

REPO = Path(__file__).resolve().parents[1]
NUM_ITEMS = 64  # memory-bank rows: a small pool; the configs' K is scaled down to fit it
BATCH = 4
GRAYSCALE = ("fashion_mnist", "fashion_split", "fashion_lowres")
IMPORTED_TEACHER = "torchvision.resnet50"  # configs/image_folder: the teacher its comments import


@cache
def _teacher_models() -> dict[str, str]:
    """Run directory name (``log.name``) -> model name, of every shipped teacher config."""
    models = {}
    for path in sorted((REPO / "configs").glob("*/*.yaml")):
        tree = read_config_tree(path)
        if "model" in tree and "log" in tree:
            models[tree["log"]["name"]] = tree["model"]["name"]
    return models


def _transfer_configs() -> list[Path]:
    paths = []
    for path in sorted((REPO / "configs").glob("*/*.yaml")):
        if not path.name.startswith("_") and {"loss", "student"} <= set(read_config_tree(path)):
            paths.append(path)
    return paths


CONFIGS = _transfer_configs()
# Configs whose forwards run here: together they have every feature (:func:`_features`) of every shipped
# transfer config; test_cover_has_every_setting_of_the_shipped_configs says what to add when one is missing.
COVER = [
    "cifar100/cktf_cc_resnet32x4_resnet8x4.yaml",
    "cifar100/cktf_fitnet_resnet32x4_resnet8x4.yaml",
    "cifar100/cktf_ft_resnet32x4_resnet8x4.yaml",
    "cifar100/cktf_wrn_40_2_wrn_40_1.yaml",
    "fashion_labeled/at.yaml",
    "fashion_labeled/cc.yaml",
    "fashion_labeled/cktf_ab.yaml",
    "fashion_labeled/cktf_fitnet.yaml",
    "fashion_labeled/cktf_fsp.yaml",
    "fashion_labeled/cktf_ft.yaml",
    "fashion_labeled/cktf_nst.yaml",
    "fashion_labeled/cktf_pkt.yaml",
    "fashion_labeled/cktf_rkd.yaml",
    "fashion_labeled/cktf_sp.yaml",
    "fashion_labeled/cktf_vid.yaml",
    "fashion_lowres/ab.yaml",
    "fashion_lowres/cktf_fitnet.yaml",
    "fashion_lowres/cktf_fsp.yaml",
    "fashion_lowres/cktf_ft.yaml",
    "image_folder/kd.yaml",
    "tinyimagenet/cktf_ab_vgg19_vgg8.yaml",
    "tinyimagenet/cktf_resnet34_resnet10.yaml",
]


@cache
def _setting(path: Path) -> tuple[TransferConfig, str, tuple[int, int, int]]:
    """The config, its teacher's model name and the input shape (C, H, W) its data has."""
    cfg = load_config(path, TransferConfig)
    teachers = _teacher_models()
    checkpoint = cfg.teacher.checkpoint
    teacher = IMPORTED_TEACHER if checkpoint is None else teachers[Path(checkpoint).parent.name]
    size = min(cfg.data.image_size or default_image_size(cfg.data.name), 64)  # sizes do not move tensors
    channels = 1 if cfg.data.name.startswith("fashion") else 3
    return cfg, teacher, (channels, size, size)


def _features(path: Path) -> set[str]:
    """What decides where a config's forward puts its tensors: each term with its options (not its weight), the
    NCE options that add modules or buffers, the sampler, the networks."""
    cfg, teacher, _ = _setting(path)
    objective.resolve_objective(cfg.loss)
    nce, s = cfg.loss.nce, cfg.sampler
    out = {f"term {name} {sorted((k, v) for k, v in options.items() if k != 'weight')}"
           for name, options in cfg.loss.terms.items()}
    out.add(f"nce {[nce.projection, nce.stage_norm, nce.stage_pool, nce.bank_dtype, nce.bank_init]}")
    out.add(f"sampler {s.kind} shared={s.shared}" if cfg.loss.terms.keys() & {"mckt", "pckt"} else "no sampler")
    out.add(f"networks {get_entry(cfg.student.name).family} <- {get_entry(teacher).family}")
    out.add(f"channels_last={cfg.train.channels_last}")
    return out


@cache
def _cost(path: Path) -> int:
    """Parameters of the config's two networks: the cover prefers small ones (tracing and dispatch time)."""
    cfg, teacher, shape = _setting(path)
    with torch.device("meta"):
        return sum(p.numel() for name in (cfg.student.name, teacher)
                   for p in build_model(name, in_channels=shape[0], num_classes=10).parameters())


def _cover(paths: list[Path]) -> list[str]:
    """A few configs that together have every feature of ``paths`` (greedy), as ``folder/name`` strings."""
    left = {p: _features(p) for p in paths}
    missing, chosen = set().union(*left.values()), []
    while missing:
        best = max(left, key=lambda p: (len(left[p] & missing), -_cost(p)))
        chosen.append(f"{best.parent.name}/{best.name}")
        missing -= left.pop(best)
    return sorted(chosen)


def _neighbours(num_items: int, k: int) -> torch.Tensor:
    """A table of ``k`` distinct other items per row (the faiss table's shape; its values do not matter here)."""
    return (torch.arange(num_items)[:, None] + torch.arange(1, k + 1)) % num_items


def _task(path: Path) -> tuple[TransferTask, tuple[int, int, int], TransferConfig]:
    """The config's transfer task on the CPU, built as ``cktf transfer`` builds it (fresh teacher weights)."""
    cfg, teacher_name, shape = _setting(path)
    needs = objective.resolve_objective(cfg.loss)
    torch.manual_seed(0)
    teacher = build_model(teacher_name, in_channels=shape[0], num_classes=10)
    student = build_model(cfg.student.name, in_channels=shape[0], num_classes=10)
    s_spec = tap_spec_for(cfg.student.name, student) if not cfg.student.taps else None
    student_taps, teacher_taps = objective.tap_pair(student, s_spec, teacher, tap_spec_for(teacher_name, teacher),
                                                    needs)
    ctx = objective.term_context(student_taps, teacher_taps, shape, NUM_ITEMS, lambda: torch.rand(8, *shape),
                                 seed=0, pools=(reference_pool(cfg.student.name), reference_pool(teacher_name)))
    terms, weights = build_terms(cfg.loss, ctx)
    sampler = None
    if "negatives" in needs:
        s = cfg.sampler
        exclude, pool = min(s.k, 8), min(s.hard_pool, 8)
        sampler = build_sampler(s.kind, NUM_ITEMS, 16, _neighbours(NUM_ITEMS, exclude + pool), exclude=exclude,
                                hard_fraction=s.hard_fraction, hard_pool=pool, shared=bool(s.shared))
    return TransferTask(student_taps, teacher_taps, terms, weights, sampler), shape, cfg


def _batch(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, targets and dataset indices of one batch on (fake) CUDA; call inside :class:`FakeCuda`."""
    return (torch.rand(BATCH, *shape, device=CUDA), torch.zeros(BATCH, dtype=torch.long, device=CUDA),
            torch.arange(BATCH, device=CUDA))


def test_cover_has_every_setting_of_the_shipped_configs():
    names = {f"{p.parent.name}/{p.name}" for p in CONFIGS}
    assert {"cifar100/cktf_at_resnet32x4_resnet8x4.yaml", "tinyimagenet_to_stl10/cktf_vgg19_vgg8.yaml",
            "fashion_lowres/cktf.yaml", "image_folder/cktf.yaml"} <= names and set(COVER) <= names
    covered = set().union(*(_features(REPO / "configs" / name) for name in COVER))
    for path in CONFIGS:
        missing = _features(path) - covered
        assert not missing, f"no config in COVER has {sorted(missing)} of {path}; COVER could be {_cover(CONFIGS)}"


@pytest.mark.parametrize("name", COVER)
def test_transfer_step_runs_on_cuda(name):
    """Teacher and student forward, every term, the bank updates and the negative draw of the config on
    CUDA: every loss and logged scalar (diagnostics too: the engine stacks them with the losses under torchrun)
    stays there."""
    task, shape, cfg = _task(REPO / "configs" / name)
    if cfg.train.channels_last:  # prepare_network's second move would swap fake parameters (tests/fake_cuda.py)
        task = use_channels_last(task)
    with FakeCuda():
        task = prepare_network(task, CUDA, channels_last=False)
        task.train()
        out = task.training_step(*_batch(shape))
        assert on_cuda(out.loss) and out.loss.dim() == 0
        assert out.terms and all(on_cuda(value) for value in out.terms.values()), \
            {key: str(value.device) for key, value in out.terms.items()}
        if task.sampler is not None:
            assert on_cuda(task.sampler(torch.arange(BATCH, device=CUDA)))
        images, targets, indices = _batch(shape)
        with torch.no_grad():
            batch = TransferBatch(task.student(images), task.teacher(images), indices, targets, None)
        for term in task.terms.values():  # loss.nce.bank_init embed's phase: the banks filled by the heads
            if hasattr(term, "fill_banks"):
                term.fill_banks(batch)
        buffers = [name for name, buffer in task.named_buffers() if not on_cuda(buffer)]
        assert not buffers, buffers


def test_per_batch_mapping_logs_its_choice_on_the_loss_device():
    """Finding: ``mapping/stage<i>`` were CPU scalars next to CUDA losses (a crash in the engine's
    all-gather under torchrun)."""
    path = REPO / "configs/cifar100/cktf_at_resnet32x4_resnet8x4.yaml"
    task, shape, _ = _task(path)
    with FakeCuda():
        task = to_cuda(task).train()
        out = task.training_step(*_batch(shape))
    mapping = {key: value for key, value in out.terms.items() if key.startswith("mapping/")}
    assert set(mapping) == {"mapping/stage1", "mapping/stage2", "mapping/stage3"}
    assert all(on_cuda(value) for value in mapping.values())


def test_nce_per_anchor_step_makes_no_host_sync_once_z_is_known():
    """Per-anchor negatives: after the first step (range checks, ``Z``) a training forward reads nothing back
    from the device (the backward reads the rewritten rows once; it cannot run on fake tensors)."""
    nce = NCEObjective(NUM_ITEMS, dim=8)
    with FakeCuda(placeholder=1) as mode:  # 1: Z is missing at first, and finite once estimated
        to_cuda(nce).train()
        g = torch.nn.functional.normalize(torch.randn(BATCH, 8, device=CUDA), dim=1).requires_grad_()
        indices = torch.arange(BATCH, device=CUDA)
        negatives = torch.randint(0, NUM_ITEMS, (BATCH, 16), device=CUDA)
        first = nce(g, g, indices, negatives)
        assert on_cuda(first.loss) and on_cuda(nce.z_student) and on_cuda(nce.bank_student.weight)
        assert mode.host_syncs > 0
        nce._z_known = True  # what a real first step leaves (the placeholder reads Z as missing forever)
        before = mode.host_syncs
        nce(g, g, indices, negatives)
        assert mode.host_syncs == before


def test_probe_feature_extraction_and_augmented_step_run_on_cuda():
    from linear_probe.features import network_features
    from linear_probe.probe import LinearProbe, ProbeTask
    from transfer.stages.common import extract_features

    torch.manual_seed(0)
    backbone = network_features(build_model("resnet8", in_channels=1, num_classes=10), "resnet8", {})
    dataset = TensorDataset(torch.rand(6, 1, 28, 28), torch.arange(6) % 3, torch.arange(6))
    probe = ProbeTask(backbone, LinearProbe(backbone(torch.rand(1, 1, 28, 28)).shape[1], 3))
    with FakeCuda():
        probe = to_cuda(probe)
        features, targets = extract_features(probe.backbone, dataset, batch_size=4, device=CUDA)
        assert features.device.type == "cpu" and features.shape[0] == 6  # gathered on the host, as documented
        out = probe.training_step(torch.rand(BATCH, 1, 28, 28, device=CUDA),
                                  torch.zeros(BATCH, dtype=torch.long, device=CUDA), torch.arange(BATCH, device=CUDA))
        assert on_cuda(out.loss)


@pytest.mark.parametrize("terms,shared", [({"mckt": 0.8, "pckt": 0.2}, True), ({"pckt": 1.0}, False)],
                         ids=["cktf", "crd-per-anchor"])
def test_api_follows_the_networks_to_cuda(terms, shared):
    """Finding: ``CKTFLoss`` built its heads and banks on the CPU, so CUDA networks failed on the first call.
    Here the networks are on CUDA, the sample batch and the loader's batches on the CPU (as in the example of
    docs/own-data/python-api.md)."""
    torch.manual_seed(0)
    student, teacher = torchvision.models.resnet18(num_classes=4), torchvision.models.resnet18(num_classes=4)
    with FakeCuda():
        to_cuda(student), to_cuda(teacher)
        images = torch.rand(BATCH, 3, 32, 32)
        objective_ = CKTFLoss(student, teacher, num_items=16, sample_input=images, num_negatives=4, terms=terms,
                              shared_negatives=shared)
        assert objective_.device.type == "cuda"
        assert all(on_cuda(t) for t in (*objective_.parameters(), *objective_.buffers()))
        loss = objective_(images, torch.arange(BATCH))
        assert on_cuda(loss) and all(on_cuda(value) for value in objective_.last_terms.values())
