"""CIFAR-style ResNets (He et al. 2016, Sec. 4.2) as used by CRD and CKTF.

Depth is ``6n + 2``: a 3x3 stem, three stages of ``n`` BasicBlocks and a linear head.
The plain variants use widths 16/16/32/64 (stem/stages); the ``x4`` variants from CRD
use 32/64/128/256, so their first stage already changes width. Shortcuts are identity
when the shape is kept and 1x1 conv + BN otherwise ("option B"), which is what the
published parameter counts assume.

Layout (shared with WRN and VGG): ``stem`` -> ``layer1..layer3`` -> ``avgpool`` ->
``flatten`` -> ``fc``, so the default tap spec can be derived from module names.

Parameter counts (in_channels=3, num_classes=100):

============  ======  ==================
model         blocks  parameters
============  ======  ==================
resnet8       1/1/1       0.0839 M
resnet14      2/2/2       0.1811 M
resnet20      3/3/3       0.2783 M
resnet32      5/5/5       0.4728 M
resnet44      7/7/7       0.6672 M
resnet56      9/9/9       0.8616 M
resnet110     18/18/18    1.7366 M
resnet8x4     1/1/1       1.2335 M
resnet32x4    5/5/5       7.4339 M
============  ======  ==================
"""

from __future__ import annotations

from torch import Tensor, nn

PLAIN_WIDTHS = (16, 16, 32, 64)
X4_WIDTHS = (32, 64, 128, 256)


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias, BN follows) + BN; the building unit of stems and shortcuts."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection; the output is post-ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        changes_shape = stride != 1 or c_in != c_out
        self.shortcut = conv_bn(c_in, c_out, 1, stride) if changes_shape else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) with three stages; accepts any input of at least 16x16."""

    def __init__(
        self,
        blocks_per_stage: int,
        widths: tuple[int, int, int, int] = PLAIN_WIDTHS,
        in_channels: int = 3,
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        stem_width, *stage_widths = widths
        self.stem = nn.Sequential(conv_bn(in_channels, stem_width, 3), nn.ReLU(inplace=True))
        c_in = stem_width
        for index, width in enumerate(stage_widths, start=1):
            stride = 1 if index == 1 else 2
            blocks = [BasicBlock(c_in if i == 0 else width, width, stride if i == 0 else 1)
                      for i in range(blocks_per_stage)]
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            c_in = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def init_weights(model: nn.Module) -> None:
    """He init for convs, unit-scale BN: the standard recipe these nets were trained with."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def cifar_resnet(depth: int, wide: bool = False, in_channels: int = 3, num_classes: int = 100) -> CifarResNet:
    """Build ResNet-``depth`` (``depth = 6n + 2``); ``wide`` selects the x4 widths."""
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
    widths = X4_WIDTHS if wide else PLAIN_WIDTHS
    return CifarResNet((depth - 2) // 6, widths, in_channels, num_classes)
