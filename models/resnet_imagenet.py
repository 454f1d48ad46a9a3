"""ImageNet ResNet-18/34/50, built by torchvision so that the names are torchvision's
(``conv1 bn1 layer1..4.N.{...,downsample.0/1} fc``), which BiP's ``models/resnet.py`` also uses.
torchvision initialises as BiP does (kaiming normal, fan_out, for convs; BN 1/0).
"""

from collections.abc import Callable

from torch import nn
from torchvision import models as tvm

from models.registry import register_model


def _build(factory: Callable[..., nn.Module], *, num_classes: int, in_channels: int) -> nn.Module:
    model = factory(weights=None, num_classes=num_classes)
    if in_channels != 3:
        # Same 7x7/2 stem and the same init as torchvision's, only the input width differs.
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def _register(name: str, factory: Callable[..., nn.Module]) -> None:
    @register_model(name)
    def build(*, num_classes: int, in_channels: int = 3, image_size: int = 224) -> nn.Module:
        return _build(factory, num_classes=num_classes, in_channels=in_channels)

    build.__name__ = build.__qualname__ = name


_register("ResNet18", tvm.resnet18)
_register("ResNet34", tvm.resnet34)
_register("ResNet50", tvm.resnet50)
