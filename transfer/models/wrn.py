"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016) as used by CRD and CKTF.

Depth is ``6n + 4``: a 3x3 stem conv, three stages of ``n`` pre-activation blocks with
widths 16k/32k/64k, and a linear head. Because blocks are pre-activation, the stem is a
bare conv (a BN+ReLU there would be applied twice) and block outputs are un-normalised
sums. The final BN+ReLU lives at the end of ``layer3`` (as ``layer3.bn``/``layer3.relu``)
so that the last stage output and the penultimate vector are post-activation, like in
the other families. No dropout: the CRD teachers/students are trained without it.

Parameter counts (in_channels=3, num_classes=100):

=========  ======  ==========
model      blocks  parameters
=========  ======  ==========
wrn_16_2   2/2/2    0.7033 M
wrn_40_1   6/6/6    0.5698 M
wrn_40_2   6/6/6    2.2552 M
=========  ======  ==========
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from transfer.models.resnet_cifar import init_weights


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice plus a shortcut (1x1 conv on the activated input if the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        changes_shape = stride != 1 or c_in != c_out
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if changes_shape else None

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return out + (self.shortcut(act) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN with the uniform ``stem``/``layer1..3``/``avgpool``/``flatten``/``fc`` layout."""

    def __init__(self, depth: int, widen: int, in_channels: int = 3, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        c_in = 16
        for index, width in enumerate((16 * widen, 32 * widen, 64 * widen), start=1):
            stride = 1 if index == 1 else 2
            blocks: OrderedDict[str, nn.Module] = OrderedDict(
                (str(i), PreActBlock(c_in if i == 0 else width, width, stride if i == 0 else 1))
                for i in range(n)
            )
            if index == 3:
                blocks["bn"] = nn.BatchNorm2d(width)
                blocks["relu"] = nn.ReLU(inplace=True)
            self.add_module(f"layer{index}", nn.Sequential(blocks))
            c_in = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.flatten(self.avgpool(x)))
