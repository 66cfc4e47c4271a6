"""VGG with BatchNorm in the CIFAR / Tiny-ImageNet form used by CRD and CKTF.

Five conv groups of 3x3 conv+BN+ReLU units, a 2x2 max-pool between groups, then global
average pooling and a single linear classifier (no 4096-wide MLP, which is what keeps
these nets small). To fit the uniform layout, group 1 is ``stem`` and groups 2-5 are
``layer1..layer4`` with the max-pool placed at the *start* of each of them (key
``pool``), so every tapped group output is its last unit at full resolution. A "block"
of VGG, for layer mapping, is one conv+BN+ReLU unit (keys ``0``, ``1``, ...).

Parameter counts (in_channels=3, num_classes=100):

=======  =====================  ==========
model    convs per group        parameters
=======  =====================  ==========
vgg8     1/1/1/1/1                3.9636 M
vgg11    1/1/2/2/2                9.2745 M
vgg13    2/2/2/2/2                9.4592 M
vgg16    2/2/3/3/3               14.7702 M
vgg19    2/2/4/4/4               20.0812 M
=======  =====================  ==========
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from transfer.models.resnet_cifar import init_weights

GROUP_WIDTHS = (64, 128, 256, 512, 512)
CONVS_PER_GROUP: dict[str, tuple[int, ...]] = {
    "vgg8": (1, 1, 1, 1, 1),
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}


class ConvBNReLU(nn.Sequential):
    """One VGG unit; conv has no bias because BN follows it."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(c_out),
                relu=nn.ReLU(inplace=True),
            )
        )


class VGG(nn.Module):
    """VGG-BN with ``stem`` + ``layer1..layer4``; accepts any input of at least 16x16."""

    def __init__(self, convs: tuple[int, ...], in_channels: int = 3, num_classes: int = 100) -> None:
        super().__init__()
        c_in = in_channels
        for index, (count, width) in enumerate(zip(convs, GROUP_WIDTHS, strict=True)):
            units: OrderedDict[str, nn.Module] = OrderedDict()
            if index > 0:
                units["pool"] = nn.MaxPool2d(2, 2)
            for i in range(count):
                units[str(i)] = ConvBNReLU(c_in, width)
                c_in = width
            self.add_module("stem" if index == 0 else f"layer{index}", nn.Sequential(units))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


def vgg(name: str, in_channels: int = 3, num_classes: int = 100) -> VGG:
    """Build one of the :data:`CONVS_PER_GROUP` configurations by name."""
    return VGG(CONVS_PER_GROUP[name], in_channels, num_classes)
