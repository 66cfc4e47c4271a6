"""Loader workers never change a result: 0, 1 and 4 workers train bit-identical networks with either
augmentation, and a run stopped by SIGINT or SIGKILL and resumed with 4 workers ends as an uninterrupted one.

Every item's augmentation is seeded from the epoch's seed and its index (transfer.data.order), not from the
worker that loads it; persistent workers carry nothing from one epoch into the next."""

import signal
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tests.cli_helpers import invoke
from tests.data_fixtures import write_image_folder
from tests.signal_driver import signal_at
from tests.test_interrupts import cktf
from transfer.data.order import EpochSampler, SeededItems
from transfer.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
BATCHES = 3  # per epoch: 24 images, batch 8


class NoisyItems(Dataset):
    """Item ``i`` is ``i`` plus noise from torch's global generator, as a per-image augmentation draws it."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> torch.Tensor:
        return i + torch.rand(3)


def test_an_item_is_a_function_of_the_pass_seed_and_its_index_and_leaves_the_global_rng_alone():
    items = SeededItems(NoisyItems())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = items[4, 11]
    assert torch.equal(torch.get_rng_state(), before)
    items[2, 11]  # whatever was read before
    assert torch.equal(items[4, 11], first)
    assert not torch.equal(items[4, 12], first) and not torch.equal(items[3, 11] + 1, first)


class SharedPermutation(Sampler):
    """The sampler of earlier versions: a permutation per pass from the generator the DataLoader also drew its
    workers' base seed from."""

    def __init__(self, num_items: int, generator: torch.Generator) -> None:
        self.num_items, self.generator = num_items, generator

    def __iter__(self):
        yield from torch.randperm(self.num_items, generator=self.generator).tolist()

    def __len__(self) -> int:
        return self.num_items


def test_orders_are_those_of_earlier_versions_in_the_main_process():
    """The sampler's pass seed is the draw such a DataLoader made before each pass, so the orders of 0-worker
    runs, and the numbers measured with them, stand (several passes without a reseed: the init phases)."""
    shared = torch.Generator().manual_seed(5)
    loader = DataLoader(range(10), sampler=SharedPermutation(10, shared), generator=shared)
    sampler = EpochSampler(10, torch.Generator())
    sampler.reseed(5)
    for _ in range(3):
        assert [index for index, _ in sampler] == [int(i) for i in loader]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """24 labeled images of 20×24 px, and a teacher (resnet8, 0 epochs) for the transfer runs."""
    root = tmp_path_factory.mktemp("workers")
    write_image_folder(root / "images", classes=("cat", "dog"), n_per_class=12, splits=("train",))
    (root / "teacher.yaml").write_text(
        "data: {name: image_folder, train_split: train, val_fraction: 0.0, image_size: 16}\n"
        "model: {name: resnet8}\n"
        "train: {epochs: 2, batch_size: 8, lr: 0.05, schedule: constant, seed: 3, threads: 1}\n"
        "log: {name: teacher, tensorboard: false}\n")
    code, out = invoke(*stage_args(root, "train-teacher", root / "runs", 0, "batched"), "--train.epochs", "0")
    assert code == 0, out
    return root


def stage_args(root: Path, stage: str, runs: Path, workers: int, augment: str) -> list[str]:
    common = ["--data.root", str(root / "images"), "--log.root", str(runs), "--data.num_workers", str(workers),
              "--data.augment", augment]
    if stage == "train-teacher":
        return ["train-teacher", "--config", str(root / "teacher.yaml"), *common]
    return ["transfer", "--config", str(REPO / "configs/image_folder/cktf.yaml"), *common, "--log.name", "run",
            "--teacher", str(root / "runs/teacher/last.safetensors"), "--student.name", "resnet8",
            "--data.image_size", "16", "--loss.nce.bank_init", "random", "--sampler.num_negatives", "8",
            "--train.epochs", "2", "--train.batch_size", "8", "--train.threads", "1", "--log.tensorboard", "false"]


def final_state(run: Path) -> tuple[dict, list]:
    state = load_checkpoint(run / "last.safetensors").state
    history = [{k: v for k, v in row.items() if not k.endswith("per_s")} for row in state["history"]]
    return state["task"], history


def assert_same_run(got: tuple[dict, list], want: tuple[dict, list]) -> None:
    assert got[1] == want[1]
    assert got[0].keys() == want[0].keys()
    differ = [key for key in want[0] if not torch.equal(got[0][key], want[0][key])]
    assert not differ, f"{len(differ)} of {len(want[0])} tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def straight(folder, tmp_path_factory):
    """Uninterrupted runs by (stage, augment, workers), each run once."""
    runs: dict[tuple[str, str, int], tuple[dict, list]] = {}

    def run(stage: str, augment: str, workers: int) -> tuple[dict, list]:
        key = (stage, augment, workers)
        if key not in runs:
            where = tmp_path_factory.mktemp("straight")
            args = stage_args(folder, stage, where, workers, augment)
            if stage == "train-teacher":
                args += ["--log.name", "run"]
            code, out = invoke(*args)
            assert code == 0, out
            runs[key] = final_state(where / "run")
        return runs[key]

    return run


@pytest.mark.parametrize("stage", ["train-teacher", "transfer"])
@pytest.mark.parametrize("augment", ["batched", "per_image"])
def test_worker_count_never_changes_a_run(straight, stage, augment):
    main = straight(stage, augment, 0)
    for workers in (1, 4):
        assert_same_run(straight(stage, augment, workers), main)


def test_sigint_then_resume_with_workers_equals_uninterrupted(folder, straight, tmp_path):
    """Ctrl-C inside epoch 1 (per-image augmentation), then the printed --resume, in this process."""
    args = [*stage_args(folder, "transfer", tmp_path, 4, "per_image"), "--train.checkpoint_every", "0"]
    with signal_at(2, signal.SIGINT):
        code, out = invoke(*args)
    assert code == 130 and "stopped by SIGINT at epoch 1, batch 2" in out, out
    code, out = invoke(*args, "--resume")
    assert code == 0 and f"resuming {tmp_path / 'run'} after batch 2 of epoch 1" in out, out
    assert_same_run(final_state(tmp_path / "run"), straight("transfer", "per_image", 4))


@pytest.mark.slow(reason="a cktf process with 4 DataLoader workers killed in epoch 2, resumed, compared with the "
                         "uninterrupted run")
def test_sigkill_then_resume_with_workers_equals_uninterrupted(folder, straight, tmp_path, cktf_fast):
    """SIGKILL inside epoch 2 (batched augmentation), then --resume from the last step's checkpoint."""
    args = [*stage_args(folder, "transfer", tmp_path, 4, "batched"), "--train.checkpoint_every", "1"]
    killed = cktf(cktf_fast, "SIGKILL", BATCHES + 3, args)  # + 1: the end of epoch 1 is a call too
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    code, out = invoke(*args, "--resume")
    assert code == 0 and f"resuming {tmp_path / 'run'} after batch 1 of epoch 2" in out, out
    assert_same_run(final_state(tmp_path / "run"), straight("transfer", "batched", 4))
