"""Tiny models, data and optimizer settings for the in-process trainer, solver and mask tests.

Every builder seeds what it draws (``torch.manual_seed(seed)`` before the layers are made, a
generator of its own for data), so that a call with the same arguments builds the same tensors, and
takes keyword arguments for what the callers vary (channels, widths, classes, bias, BatchNorm)."""
from __future__ import annotations

import torch
from torch import nn

from data.loaders import build_loaders
from data.registry import DatasetSplits
from data.sampling import split_key
from engine.optim import OptimSettings
from layers import to_masked


def tiny_net(granularity: str | None = None, *, seed: int = 0, in_channels: int = 1, width: int = 4,
             image_size: int = 4, num_classes: int = 6, convs: int = 2, bias: bool = False,
             batch_norm: bool = True, exclude: list[str] | None = None) -> nn.Sequential:
    """conv in_channels->width (3x3, padding 1), BatchNorm (``batch_norm``), ReLU, then with
    ``convs=2`` conv width->width (3x3, stride 2, padding 1) and ReLU, then Flatten and a linear
    classifier to ``num_classes``; ``bias``: the convolutions' biases. Layer names are their indices
    ("0" the first conv, ...). ``granularity`` None: the dense model; otherwise masked layers of that
    granularity (``exclude``: layers left dense)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1, bias=bias)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(width))
    layers.append(nn.ReLU())
    side = image_size
    if convs == 2:
        layers += [nn.Conv2d(width, width, 3, stride=2, padding=1, bias=bias), nn.ReLU()]
        side = (image_size + 1) // 2
    elif convs != 1:
        raise ValueError(f"convs must be 1 or 2, got {convs}")
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * side * side, num_classes))
    if granularity is not None:
        to_masked(model, granularity=granularity, exclude=exclude)
    return model


def tiny_batch(seed: int, *, n: int = 8, num_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random 1x4x4 images and labels in 0..num_classes-1, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, num_classes, (n,), generator=g)


class KeyedTensors(torch.utils.data.Dataset):
    """Tensors read with the sample keys the run's samplers give ((index, augmentation seed))."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, key):
        index, _ = split_key(key)
        return self.x[index], int(self.y[index])


def tiny_loaders(n: int, *, batch_size: int):
    """Real ``Loaders`` over ``n`` random 1x4x4 images of 6 classes (seed 1), the same set for
    training and test, in batches of ``batch_size``."""
    g = torch.Generator().manual_seed(1)
    data = KeyedTensors(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 6, (n,), generator=g))
    splits = DatasetSplits(train=data, val=None, test=data, num_classes=6, in_channels=1, image_size=4)
    return build_loaders(splits, batch_size=batch_size, test_batch_size=batch_size, seed=0)


def sgd(lr: float, *, momentum: float = 0.0, wd: float = 0.0, epochs: int = 10, schedule: str = "constant",
        optimizer: str = "sgd") -> OptimSettings:
    """Optimizer settings (plain SGD at a constant rate unless told otherwise)."""
    return OptimSettings(optimizer=optimizer, lr=lr, momentum=momentum, wd=wd, schedule=schedule, epochs=epochs)
