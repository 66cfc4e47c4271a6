"""A teacher trained as configs/fashion_lowres/teacher.yaml trains it, on a tiny Fashion-MNIST fixture, and quick
`cktf transfer` runs from that folder's committed configs: what the companion-method and term plug-in tests share."""

from pathlib import Path

from tests.cli_helpers import invoke
from tests.data_fixtures import write_fashion_idx

LOWRES = Path(__file__).resolve().parents[1] / "configs/fashion_lowres"


def train_lowres_teacher(root: Path) -> Path:
    """Write the fixture under ``root`` and train a one-epoch resnet8 teacher on it (``root/runs/teacher``)."""
    write_fashion_idx(root / "fashion", n_train=200, n_test=40)
    code, out = invoke("train-teacher", "--config", str(LOWRES / "teacher.yaml"), "--data.root", str(root / "fashion"),
                       "--log.root", str(root / "runs"), "--log.name", "teacher", "--model.name", "resnet8",
                       "--train.epochs", "1", "--train.batch_size", "32", "--log.tensorboard", "false")
    assert code == 0, out
    return root


def lowres_transfer(root: Path, config: Path, name: str, *extra: str) -> tuple[int, str]:
    """``cktf transfer --config CONFIG`` from the teacher above, one epoch of batch 16, 32 negatives, run ``name``."""
    return invoke("transfer", "--config", str(config), "--teacher", str(root / "runs/teacher/best.safetensors"),
                  "--data.root", str(root / "fashion"), "--log.root", str(root / "runs"), "--log.name", name,
                  "--train.batch_size", "16", "--train.epochs", "1", "--sampler.num_negatives", "32",
                  "--log.tensorboard", "false", *extra)
