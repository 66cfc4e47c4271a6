"""Plugging a stock torchvision model in by name: built without weights, tapped by node names from config."""

import pytest
import torch

from transfer.errors import CKTFError
from transfer.models import FeatureTaps, TapSpec, build_model, tap_spec_for


def test_torchvision_resnet_gets_default_taps():
    model = build_model("torchvision.resnet18", in_channels=3, num_classes=7)
    out = FeatureTaps(model, tap_spec_for("torchvision.resnet18", model)).eval()(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 7) and out.penultimate.shape == (2, 512) and len(out.stages) == 4
    assert [s.shape[1] for s in out.stages] == [64, 128, 256, 512]


def test_other_torchvision_models_need_named_nodes():
    model = build_model("torchvision.mobilenet_v3_small", num_classes=5)
    with pytest.raises(CKTFError, match="taps"):
        tap_spec_for("torchvision.mobilenet_v3_small", model)
    spec = TapSpec.from_dict({"stem": "features.0", "stages": ["features.3", "features.8", "features.12"],
                              "penultimate": "flatten", "logits": "classifier.3"})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = FeatureTaps(model, spec).eval()(x)
        assert torch.allclose(out.logits, model.eval()(x), atol=1e-6)
    assert out.logits.shape == (2, 5) and out.penultimate.shape == (2, 576) and len(out.stages) == 3


def test_torchvision_errors_are_one_line():
    with pytest.raises(CKTFError, match="3-channel") as info:
        build_model("torchvision.resnet18", in_channels=1, num_classes=5)
    assert "\n" not in str(info.value)
    with pytest.raises(CKTFError, match="resnet1000"):
        build_model("torchvision.resnet1000")
