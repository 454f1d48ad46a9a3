"""Architectures by name.

Every entry is a constructor taking the keyword arguments ``num_classes``, ``in_channels`` and
``image_size`` and returning a dense model built from plain ``nn.Conv2d`` / ``nn.Linear`` /
``nn.BatchNorm2d``; the masked twins are made elsewhere by replacing those layers, so nothing
here knows about masks or scores. ``tv.<name>`` builds any torchvision classification model
(``models.torchvision_zoo``).
"""

from collections.abc import Callable

from torch import nn

from configs.errors import UserError
from configs.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("architecture", flag="--arch")
register_model = MODELS.register
model_names = MODELS.names


def build_model(name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """The registered architecture ``name``, or torchvision's model for ``tv.<name>`` (models.torchvision_zoo)."""
    from models import torchvision_zoo as tv  # not at import time: it lists torchvision's models

    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    if name.startswith(tv.PREFIX):
        return tv.build_torchvision(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    try:
        builder = MODELS.get(name)
    except UserError as exc:
        if name in tv.torchvision_names():  # torchvision's name without the namespace
            raise UserError(f"unknown architecture {name!r} for --arch; torchvision's is --arch tv.{name}") from None
        raise exc from None
    return builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
