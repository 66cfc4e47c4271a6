"""Config of ``cktf probe``: which backbone, which labeled splits, how the linear classifier is trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transfer.config import DataConfig, TrainConfig
from transfer.config.loader import option
from transfer.errors import CKTFError


@dataclass
class ProbeSectionConfig:
    """What is probed and how."""

    mode: Literal["cached", "augment"] = option(
        "cached", help="cached: features extracted once (no augmentation), then the linear layer trains on the "
        "cached tensor (fast, the CPU default); augment: features per batch with training augmentation (paper)")
    backbone: Literal["checkpoint", "random", "pixels"] = option(
        "checkpoint", help="checkpoint: the --student checkpoint's network; random: a randomly initialised "
        "probe.model (control); pixels: raw pixels (logistic-regression control)")
    model: str | None = option(None, help="model name for backbone=random")
    label: str | None = option(None, help="method label in reports (default: the checkpoint's method, "
                               "'teacher', 'random_init' or 'pixels')")
    out: str | None = option(None, help="output directory (default: <run dir>/probe for a checkpoint in its own "
                              "cktf run directory, else probe_<file name> beside the checkpoint)")
    standardize: bool = option(
        True, help="standardise the features with the probe-train mean/std before the linear layer (one lr "
        "fits every backbone); false: raw features, as the published CKTF code's fine-tuning")
    knn_k: int = option(20, help="neighbours of the kNN probe (0 disables it)", min=0)
    knn_temperature: float = option(0.07, help="temperature of the kNN probe's vote weights", min=1e-4)

    def validate(self) -> None:
        if self.backbone == "random" and not self.model:
            raise CKTFError("probe.backbone random needs probe.model (e.g. --probe.model resnet8)")
        if self.backbone != "checkpoint" and not self.out:
            raise CKTFError(f"probe.backbone {self.backbone} needs probe.out (the directory to write to)")


@dataclass
class ProbeLogConfig:
    """Logging of the probe (the directory comes from probe.out or the checkpoint)."""

    tensorboard: bool = option(True, help="write TensorBoard scalars probe/test_acc, probe/train_loss, probe/knn_acc")
    progress: bool = option(True, help="show a progress bar on a terminal")
    log_every: int = option(50, help="training steps between logged scalars", min=1)
    progress_every: float = option(30.0, help="seconds between progress lines when the output is not a "
                                   "terminal (0: none)", min=0.0)


@dataclass
class ProbeConfig:
    """``cktf probe``: a linear classifier on the frozen network's penultimate features."""

    data: DataConfig
    probe: ProbeSectionConfig
    train: TrainConfig
    log: ProbeLogConfig
