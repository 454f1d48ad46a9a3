"""VGG-11/13/16 with and without BN, the CIFAR variant of HYDRA/BiP ``vgg_cifar``.

State-dict names match theirs: convolutions (no bias) and BNs at their indices in ``features``,
a 2x2 adaptive average pool, and ``classifier.{0,2,4}`` = Linear(4c, 256), Linear(256, 256),
Linear(256, classes). Initialisation is their default ``kaiming_normal``.
"""

from collections.abc import Sequence
from typing import Any  # cfg: channel counts and "M" (max-pool)

import torch
from torch import nn

from models.registry import register_model

_CFGS = {
    "11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
}


def make_features(cfg: Sequence[Any], *, batch_norm: bool, in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            # ceil_mode changes nothing for even sizes (CIFAR, ImageNet) but lets 8x8 inputs through
            # VGG-16's four pools instead of shrinking the map to nothing.
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            continue
        layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1, bias=False))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, features: nn.Sequential, last_channels: int, *, num_classes: int):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(last_channels * 2 * 2, 256),
            nn.ReLU(True),
            nn.Linear(256, 256),
            nn.ReLU(True),
            nn.Linear(256, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _register(name: str, cfg: Sequence[Any], batch_norm: bool) -> None:
    @register_model(name)
    def build(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        features = make_features(cfg, batch_norm=batch_norm, in_channels=in_channels)
        last = [v for v in cfg if v != "M"][-1]
        return VGG(features, last, num_classes=num_classes)

    build.__name__ = build.__qualname__ = name


for _depth, _cfg in _CFGS.items():
    _register(f"vgg{_depth}", _cfg, False)
    _register(f"vgg{_depth}_bn", _cfg, True)
