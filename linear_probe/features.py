"""Frozen backbones for probing and feature extraction.

The backbone is frozen *and kept in eval()*: BatchNorm statistics must not move while the probe trains (the
reference code probed with the student in train() mode, so its BN statistics drifted toward the probe set).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.utils.data import Dataset

from transfer.engine.frozen import Frozen
from transfer.models import FeatureTaps, TapSpec, tap_spec_for


class PenultimateFeatures(nn.Module):
    """The penultimate vector of a network (its classifier is dropped), frozen in eval mode."""

    def __init__(self, model: nn.Module, spec: TapSpec) -> None:
        super().__init__()
        self.taps = Frozen(FeatureTaps(model, spec))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.taps(images).penultimate.float()


class PixelFeatures(nn.Module):
    """Raw pixels as features: the logistic-regression-on-pixels control."""

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return rearrange(images, "b c h w -> b (c h w)").float()


def network_features(model: nn.Module, name: str, taps: dict) -> PenultimateFeatures:
    spec = TapSpec.from_dict(taps, option="taps") if taps else tap_spec_for(name, model)
    return PenultimateFeatures(model, spec)


class FeatureDataset(Dataset):
    """Cached features with their labels, returning ``(feature, target, index)`` like every dataset here."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        self.features = features
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.features[i], int(self.targets[i]), i
