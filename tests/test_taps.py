"""Feature taps: shapes per family, equality with the plain forward, shared parameters and modes."""

from __future__ import annotations

import copy
import itertools
import pickle
from functools import cache

import pytest
import torch
import torchvision
from torch import nn

from transfer.errors import CKTFError
from transfer.models import FeatureTaps, TapOutputs, TapSpec, build_model, list_models, tap_spec_for

VGG_CONVS = {"vgg8": [1, 1, 1, 1, 1], "vgg11": [1, 1, 2, 2, 2], "vgg13": [2, 2, 2, 2, 2],
             "vgg16": [2, 2, 3, 3, 3], "vgg19": [2, 2, 4, 4, 4]}
SMALL_LAYERS = {"resnet10": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3],
                "resnet50": [3, 4, 6, 3]}


def family_definition(name: str) -> dict:
    """Expected taps from the architecture definitions (not from the code under test)."""
    if name.startswith("wrn"):
        depth, k = map(int, name.split("_")[1:])
        return {"stem": 16, "stages": [16 * k, 32 * k, 64 * k], "blocks": [(depth - 4) // 6] * 3,
                "penultimate": 64 * k, "size": 32, "spatial": [32, 32, 16, 8]}
    if name in VGG_CONVS:
        return {"stem": 64, "stages": [128, 256, 512, 512], "blocks": VGG_CONVS[name][1:],
                "penultimate": 512, "size": 64, "spatial": [64, 32, 16, 8, 4]}
    if name in SMALL_LAYERS:
        stages = [256, 512, 1024, 2048] if name == "resnet50" else [64, 128, 256, 512]
        return {"stem": 64, "stages": stages, "blocks": SMALL_LAYERS[name], "penultimate": stages[-1],
                "size": 64, "spatial": [64, 64, 32, 16, 8]}
    wide = name.endswith("x4")
    depth = int(name.removeprefix("resnet").removesuffix("x4"))
    stages = [64, 128, 256] if wide else [16, 32, 64]
    return {"stem": 32 if wide else 16, "stages": stages, "blocks": [(depth - 2) // 6] * 3,
            "penultimate": stages[-1], "size": 32, "spatial": [32, 32, 16, 8]}


@cache
def eval_model(name: str, in_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, in_channels=in_channels, num_classes=10).eval()


def spatial(t: torch.Tensor) -> int:
    assert t.shape[-1] == t.shape[-2]
    return t.shape[-1]


@pytest.mark.parametrize("name", list_models())
def test_taps_match_family_definition(name: str) -> None:
    expected = family_definition(name)
    model = eval_model(name)
    taps = FeatureTaps(model, tap_spec_for(name, model), with_blocks=True)
    size = expected["size"]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = taps(x)
        plain = model(x)

    assert isinstance(out, TapOutputs)
    assert out.stem.shape[:2] == (2, expected["stem"])
    assert [t.shape[1] for t in out.stages] == expected["stages"]
    sizes = [spatial(out.stem), *(spatial(t) for t in out.stages)]
    assert sizes == expected["spatial"]
    assert all(a > b for a, b in itertools.pairwise(sizes[1:])), "stages must shrink"
    assert [len(b) for b in out.blocks] == expected["blocks"]
    for stage, blocks in zip(out.stages, out.blocks, strict=True):
        assert all(b.shape == stage.shape for b in blocks)
        if not name.startswith("wrn"):  # WRN stages end with BN+ReLU after the last block
            assert torch.equal(blocks[-1], stage)
    assert out.penultimate.shape == (2, expected["penultimate"])
    assert out.penultimate.min() >= 0, "penultimate vector must be post-activation"
    torch.testing.assert_close(out.penultimate, out.stages[-1].mean(dim=(2, 3)))
    assert out.logits.shape == (2, 10)
    torch.testing.assert_close(out.logits, plain, rtol=0, atol=0)

    channels = taps.channels((3, 16, 16))  # widths do not depend on the input size
    blocks = [[c] * n for c, n in zip(expected["stages"], expected["blocks"], strict=True)]
    assert channels == {"stem": expected["stem"], "stages": expected["stages"], "blocks": blocks,
                        "penultimate": expected["penultimate"], "logits": 10}


@pytest.mark.parametrize(("name", "sizes"), [
    ("resnet8", [28, 28, 14, 7]),
    ("wrn_16_2", [28, 28, 14, 7]),
    ("vgg8", [28, 14, 7, 3, 1]),
    ("resnet10", [28, 28, 14, 7, 4]),
])
def test_grayscale_28px(name: str, sizes: list[int]) -> None:
    model = eval_model(name, in_channels=1)
    with torch.no_grad():
        out = FeatureTaps(model, tap_spec_for(name))(torch.randn(2, 1, 28, 28))
    assert [spatial(out.stem), *(spatial(t) for t in out.stages)] == sizes
    assert out.stem.shape[1] == family_definition(name)["stem"]
    assert out.logits.shape == (2, 10) and out.blocks is None


def test_wrn_blocks_exclude_final_norm_and_stage_is_post_activation() -> None:
    spec = tap_spec_for("wrn_16_2")
    assert spec.blocks[2] == ("layer3.0", "layer3.1")
    model = eval_model("wrn_16_2")
    with torch.no_grad():
        out = FeatureTaps(model, spec, with_blocks=True)(torch.randn(2, 3, 32, 32))
    assert out.stages[0].min() < 0  # pre-activation residual sum
    torch.testing.assert_close(out.stages[2], model.layer3.relu(model.layer3.bn(out.blocks[2][-1])))


def test_train_mode_forward_and_gradients_reach_model() -> None:
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10)
    reference = copy.deepcopy(model)
    taps = FeatureTaps(model, tap_spec_for("resnet8"))
    assert taps.training and {id(p) for p in taps.parameters()} == {id(p) for p in model.parameters()}
    x = torch.randn(4, 3, 32, 32)
    out = taps(x)
    torch.testing.assert_close(out.logits, reference(x))
    # BN batch statistics went into the model's own running buffers.
    torch.testing.assert_close(model.stem[0][1].running_mean, reference.stem[0][1].running_mean)

    out.stages[1].square().mean().backward()
    assert model.stem[0][0].weight.grad is not None and model.stem[0][0].weight.grad.abs().sum() > 0
    assert model.layer2[0].conv1.weight.grad is not None
    assert model.layer3[0].conv1.weight.grad is None and model.fc.weight.grad is None


def test_state_dict_is_the_models() -> None:
    model = build_model("resnet8")
    taps = FeatureTaps(model, tap_spec_for("resnet8"))
    assert list(taps.state_dict()) == [f"model.{k}" for k in model.state_dict()]


def test_eval_and_train_switch_model_batchnorm() -> None:
    model = build_model("vgg8")
    taps = FeatureTaps(model, tap_spec_for("vgg8"))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    taps.eval()
    assert not model.training and not any(bn.training for bn in bns)
    before = bns[0].running_mean.clone()
    with torch.no_grad():
        taps(torch.randn(2, 3, 32, 32))
    assert torch.equal(bns[0].running_mean, before)
    taps.train()
    assert model.training and all(bn.training for bn in bns)


def test_wrapping_and_channels_keep_per_module_modes() -> None:
    model = build_model("resnet8")
    frozen = model.stem[0][1]
    frozen.eval()  # e.g. a frozen BN inside a training network
    taps = FeatureTaps(model, tap_spec_for("resnet8"))
    assert taps.training and model.training and not frozen.training
    assert taps.channels((3, 20, 20))["stages"] == [16, 32, 64]
    assert model.training and not frozen.training and model.layer1[0].bn1.training
    assert all(p.grad is None for p in model.parameters())

    eval_taps = FeatureTaps(build_model("resnet8").eval(), tap_spec_for("resnet8"))
    assert not eval_taps.training


def test_copies_and_pickles_rebind_to_their_own_model() -> None:
    taps = FeatureTaps(build_model("resnet8", num_classes=10), tap_spec_for("resnet8")).eval()
    x = torch.randn(2, 3, 32, 32)
    for clone in (copy.deepcopy(taps), pickle.loads(pickle.dumps(taps))):
        with torch.no_grad():
            clone.model.fc.bias.add_(1.0)
            torch.testing.assert_close(clone(x).logits, clone.model(x))
            torch.testing.assert_close(clone(x).logits, taps(x).logits + 1.0)
        clone.train()
        assert all(m.training for m in clone.model.modules())


class Scaled(nn.Module):
    """Traced through (not a torch.nn leaf), so its buffer is read by a get_attr node."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("scale", torch.ones(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.scale


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Scaled()
        # One block ending in a non-inplace ReLU: stage and block share their last node.
        self.layer1 = nn.Sequential(nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU()))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.avgpool(self.layer1(self.stem(x)))))


def test_dtype_conversion_rebinds_traced_buffers() -> None:
    model = Tiny()
    spec = TapSpec.from_dict({"stem": "stem", "stages": ["layer1"], "penultimate": "flatten", "logits": "fc"})
    taps = FeatureTaps(model, spec).double()
    model.stem.scale.fill_(2.0)  # the buffer object created by .double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out = taps(x)
    assert out.stem.dtype == torch.float64
    torch.testing.assert_close(out.logits, model(x))
    assert taps.channels((3, 16, 16)) == {"stem": 4, "stages": [6], "blocks": [], "penultimate": 6,
                                          "logits": 2}


def test_stage_and_its_last_block_read_the_same_node() -> None:
    # Given both prefixes, torchvision alone would hand "layer1.0" the conv output (pre-ReLU).
    spec = TapSpec(stem="stem", stages=("layer1",), blocks=(("layer1.0",),), penultimate="flatten",
                   logits="fc")
    out = FeatureTaps(Tiny(), spec, with_blocks=True)(torch.randn(2, 3, 16, 16))
    assert torch.equal(out.blocks[0][0], out.stages[0]) and out.blocks[0][0].min() >= 0

TORCHVISION_RESNET18 = {
    "stem": "maxpool",
    "stages": ["layer1", "layer2", "layer3", "layer4"],
    "blocks": [["layer1.0", "layer1.1"], ["layer2.0", "layer2.1"], ["layer3.0", "layer3.1"],
               ["layer4.0", "layer4.1"]],
    "penultimate": "flatten",
    "logits": "fc",
}


def test_stock_torchvision_model_via_config_spec() -> None:
    model = torchvision.models.resnet18(num_classes=5).eval()
    spec = TapSpec.from_dict(TORCHVISION_RESNET18)
    assert TapSpec.from_dict(spec.to_dict()) == spec
    taps = FeatureTaps(model, spec, with_blocks=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = taps(x)
        torch.testing.assert_close(out.logits, model(x), rtol=0, atol=0)
    assert out.stem.shape == (2, 64, 16, 16)
    assert [tuple(t.shape[1:]) for t in out.stages] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    assert torch.equal(out.blocks[3][1], out.stages[3])
    assert out.penultimate.shape == (2, 512)


def test_exact_node_names_work_too() -> None:
    model = eval_model("resnet20")
    spec = TapSpec(stem="stem.1", stages=("layer1.2.relu_1",), blocks=(), penultimate="avgpool",
                   logits="fc")
    with torch.no_grad():
        out = FeatureTaps(model, spec)(torch.randn(2, 3, 32, 32))
    assert out.stages[0].shape == (2, 16, 32, 32) and out.penultimate.shape == (2, 64, 1, 1)


@pytest.mark.parametrize(("field", "bad", "suggestion"), [
    ("stages", ["layer1", "layer2", "layer5"], "layer2"),
    ("penultimate", "flaten", "flatten"),
    ("logits", "fc1", "fc"),
    ("stem", "layer1.9", "layer1.0"),
])
def test_unknown_node_suggests_close_matches(field: str, bad: object, suggestion: str) -> None:
    raw = {"stem": "stem", "stages": ["layer1", "layer2", "layer3"], "penultimate": "flatten", "logits": "fc"}
    raw[field] = bad
    with pytest.raises(CKTFError) as err:
        FeatureTaps(build_model("resnet8"), TapSpec.from_dict(raw))
    message = str(err.value)
    assert "\n" not in message
    assert f"option taps.{field}" in message and suggestion in message.split("close matches:")[1]


def test_unknown_node_without_close_match_lists_top_level_nodes() -> None:
    spec = TapSpec(stem="zzz", stages=("layer1",), blocks=(), penultimate="flatten", logits="fc")
    with pytest.raises(CKTFError, match=r"'zzz'.*top-level nodes: x, stem, layer1"):
        FeatureTaps(build_model("resnet8"), spec)


@pytest.mark.parametrize(("raw", "match"), [
    ({"stem": "a", "stages": ["b"], "penultimate": "c", "logits": "d", "neck": "e"}, "unknown key 'neck'"),
    ({"stem": "a", "stages": ["b"], "logits": "d"}, "missing penultimate"),
    ({"stem": "a", "stages": [], "penultimate": "c", "logits": "d"}, "at least one"),
    ({"stem": "a", "stages": "b", "penultimate": "c", "logits": "d"}, r"taps.stages must be a list"),
    ({"stem": 3, "stages": ["b"], "penultimate": "c", "logits": "d"}, r"taps.stem must be"),
    ({"stem": "a", "stages": ["b", "c"], "blocks": [["b.0"]], "penultimate": "c", "logits": "d"},
     "one list per stage"),
    (["stem"], "must be a mapping"),
])
def test_from_dict_rejects_malformed_config(raw: object, match: str) -> None:
    with pytest.raises(CKTFError, match=match):
        TapSpec.from_dict(raw)  # type: ignore[arg-type]


def test_with_blocks_needs_blocks() -> None:
    spec = TapSpec(stem="stem", stages=("layer1",), blocks=(), penultimate="flatten", logits="fc")
    with pytest.raises(CKTFError, match=r"taps\.blocks"):
        FeatureTaps(build_model("resnet8"), spec, with_blocks=True)
