"""Architectures by name.

Every entry is a constructor taking the keyword arguments ``num_classes``, ``in_channels`` and
``image_size`` and returning a dense model built from plain ``nn.Conv2d`` / ``nn.Linear`` /
``nn.BatchNorm2d``; the masked twins are made elsewhere by replacing those layers, so nothing
here knows about masks or scores.
"""

import difflib
from typing import Callable

from torch import nn

from configs.errors import UserError

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator adding a constructor to ``MODELS`` under ``name``."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        # A silent overwrite would make the name mean whichever module was imported last.
        if name in MODELS:
            raise ValueError(f"architecture {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return add


def model_names() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    if name not in MODELS:
        # cutoff=0 so that there is always a suggestion, however far the typo.
        closest = difflib.get_close_matches(name, model_names(), n=1, cutoff=0.0)
        hint = f"; did you mean {closest[0]!r}?" if closest else ""
        raise UserError(f"unknown architecture {name!r}{hint} (see --help for the list)")
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)
