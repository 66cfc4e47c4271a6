"""Model zoo and feature taps.

``build_model(name)`` builds any registered network (CIFAR ResNets, WRNs, VGG-BN and
64x64 ResNets); ``FeatureTaps(model, tap_spec_for(name))`` returns the stem, stage,
penultimate and logit outputs of one forward pass, which is what the transfer losses
consume.
"""

from transfer.models.registry import build_model, list_models, tap_spec_for
from transfer.models.taps import FeatureTaps, TapOutputs, TapSpec

__all__ = ["FeatureTaps", "TapOutputs", "TapSpec", "build_model", "list_models", "tap_spec_for"]
