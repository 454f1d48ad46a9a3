"""Per-image transforms on CHW tensors that take an explicit random generator.

Every random step draws from the ``generator`` it is given (``None``: the global torch RNG), so the
sampler's per-sample seed fully decides the augmentation (see ``data.sampling``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

TensorTransform = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]
# A step of ``Compose``: a tensor step above, or a PIL step (``data.pil_ops``) of a file dataset.
Transform = Callable[[Any, "torch.Generator | None"], Any]


def _randint(high: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(0, high, (1,), generator=generator))


class RandomCropPadded:
    """``transforms.RandomCrop(size, padding)`` with zero padding, on a uint8 or float tensor."""

    def __init__(self, *, size: int, padding: int) -> None:
        self.size = size
        self.padding = padding

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        p = self.padding
        padded = F.pad(image, (p, p, p, p))
        top = _randint(padded.shape[-2] - self.size + 1, generator)
        left = _randint(padded.shape[-1] - self.size + 1, generator)
        return padded[..., top:top + self.size, left:left + self.size]


class RandomHorizontalFlip:
    def __call__(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if float(torch.rand((), generator=generator)) < 0.5:
            return image.flip(-1)
        return image


class ToFloat:
    """uint8 -> float in [0, 1] (``ToTensor`` semantics); ``scale`` is the value mapped to 1."""

    def __init__(self, *, scale: float = 255.0) -> None:
        self.scale = scale

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return image.to(torch.float32).div_(self.scale)


class Resize:
    """Bilinear (antialiased) resize of a float CHW tensor to ``size`` x ``size``."""

    def __init__(self, *, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if image.shape[-1] == self.size and image.shape[-2] == self.size:
            return image
        return F.interpolate(image[None], size=(self.size, self.size), mode="bilinear",
                             antialias=True, align_corners=False)[0]


class Normalize:
    def __init__(self, *, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return (image - self.mean) / self.std


class Compose:
    """Steps in order; the first ones may take a PIL image (``data.pil_ops``), the last gives a tensor."""

    def __init__(self, steps: Sequence[Transform]) -> None:
        self.steps = list(steps)

    def __call__(self, image: Any, generator: torch.Generator | None) -> torch.Tensor:
        for step in self.steps:
            image = step(image, generator)
        return image
