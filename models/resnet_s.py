"""ResNet-20/32/44/56 for CIFAR (He et al. 2016, sec. 4.2), as in BiP's ``resnets.py``
(after akamaster/pytorch_resnet_cifar10).

State-dict names are BiP's: ``conv1 bn1 layer1..3.N.{conv1,bn1,conv2,bn2}`` and classifier
``fc`` (akamaster's original calls it ``linear``; BiP renamed it, and their checkpoints are what
users bring). The "option A" shortcut has no parameters, so no shortcut keys exist. ResNet-20 has
0.27M parameters (269,722 with 10 classes).
"""

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import register_model


class ShortcutA(nn.Module):
    """Parameter-free projection: stride-2 subsampling and zero-padded channels.

    A module rather than their lambda so that the model pickles and prints cleanly.
    """

    def __init__(self, in_planes: int, planes: int):
        super().__init__()
        extra = planes - in_planes
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, *self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ShortcutA(in_planes, planes)
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetS(nn.Module):
    def __init__(self, n: int, *, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.fc = nn.Linear(64, num_classes)
        # BiP/akamaster: kaiming normal (fan_in) on every conv and linear weight.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


def _register(name: str, n: int) -> None:
    @register_model(name)
    def build(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return ResNetS(n, num_classes=num_classes, in_channels=in_channels)

    build.__name__ = build.__qualname__ = name


for _depth in (20, 32, 44, 56):
    _register(f"resnet{_depth}s", (_depth - 2) // 6)
