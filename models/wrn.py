"""Wide ResNets (Zagoruyko & Komodakis 2016) with HYDRA/BiP ``wrn_cifar`` names.

Keys: ``conv1``, ``block{1,2,3}.layer.N.{bn1,conv1,bn2,conv2[,convShortcut]}``, final ``bn1``,
``fc``. Their model also builds a ``sub_block1`` that ``forward`` never uses; it is left out here
(the checkpoint loader drops it), so it can neither train nor take part in a global top-k.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import register_model


class BasicBlock(nn.Module):
    """Pre-activation block. When the shape changes, the shortcut sees the pre-activated input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        # Theirs tests only the channel count, so a stride-2 block with equal widths would add an
        # unsubsampled input; that never happens for the depths registered here (block2/3 widen).
        self.convShortcut: nn.Module | None = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        out = self.conv2(out)
        # convShortcut is None exactly when equal_in_out
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, *, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        # Theirs: N(0, sqrt(2 / (k*k*out))) for convs (kaiming normal, fan_out), BN 1/0, fc bias 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        # Adaptive rather than their fixed 8x8 pool: identical at 32x32, and other sizes work.
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _register(name: str, depth: int, widen: int) -> None:
    @register_model(name)
    def build(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return WideResNet(depth, widen, num_classes=num_classes, in_channels=in_channels)

    build.__name__ = build.__qualname__ = name


for _depth, _widen in ((28, 10), (28, 4), (28, 1), (34, 10), (40, 2)):
    _register(f"wrn_{_depth}_{_widen}", _depth, _widen)
