"""ImageNet ResNets (torchvision) adapted to 64x64 inputs such as Tiny-ImageNet and STL-10.

The 7x7/stride-2 stem and the max-pool would shrink a 64x64 image to 16x16 before the
first stage, so the first conv becomes 3x3/stride 1 (with ``in_channels`` inputs) and
``maxpool`` becomes ``nn.Identity()``; everything else is torchvision's ``ResNet``, so
torchvision weights' key names still apply. These keep torchvision's module names
(``conv1/bn1/relu/maxpool``, ``layer1..4``, ``avgpool``, ``fc``), not the uniform layout.

Parameter counts (in_channels=3, num_classes=100):

========  ==========  ================  ==========
model     block       blocks/stage      parameters
========  ==========  ================  ==========
resnet10  BasicBlock  1/1/1/1            4.9494 M
resnet18  BasicBlock  2/2/2/2           11.2201 M
resnet34  BasicBlock  3/4/6/3           21.3283 M
resnet50  Bottleneck  3/4/6/3           23.7053 M
========  ==========  ================  ==========
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from transfer.models.taps import TapSpec

LAYOUTS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet10": (BasicBlock, (1, 1, 1, 1)),
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


def small_resnet(name: str, in_channels: int = 3, num_classes: int = 100) -> ResNet:
    """Build a torchvision ResNet with a 3x3/stride-1 stem and no max-pool."""
    block, layers = LAYOUTS[name]
    model = ResNet(block, list(layers), num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def torchvision_resnet_spec(model: nn.Module) -> TapSpec:
    """Default taps for any torchvision ``ResNet`` (stock or adapted): stem output is ``maxpool``."""
    stages = ("layer1", "layer2", "layer3", "layer4")
    blocks = tuple(
        tuple(f"{stage}.{key}" for key in getattr(model, stage)._modules) for stage in stages
    )
    return TapSpec(stem="maxpool", stages=stages, blocks=blocks, penultimate="flatten", logits="fc")
