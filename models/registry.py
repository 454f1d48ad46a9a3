"""Architectures by name.

Every entry is a constructor taking the keyword arguments ``num_classes``, ``in_channels`` and
``image_size`` and returning a dense model built from plain ``nn.Conv2d`` / ``nn.Linear`` /
``nn.BatchNorm2d``; the masked twins are made elsewhere by replacing those layers, so nothing
here knows about masks or scores.
"""

from collections.abc import Callable

from torch import nn

from configs.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("architecture", flag="--arch")
register_model = MODELS.register
model_names = MODELS.names


def build_model(name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    builder = MODELS.get(name)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    return builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
