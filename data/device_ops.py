"""The PIL steps of ``data.pil_ops`` on float CHW tensors, for images decoded on the device.

Each step draws its random numbers exactly as its PIL twin does (same helper, same generator, same
order), so a sample key gives the same crop box and flip on both paths. Pixels differ slightly:
PIL resamples in uint8 and rounds after each resize, these steps resample in float32 with
``interpolate(bilinear, antialias=True)`` (the same triangle filter, other rounding).
Tensors hold values in [0, 255] until the batch is scaled (``data.gpu_decode``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data.pil_ops import random_resized_crop_box


def resize(image: torch.Tensor, *, height: int, width: int) -> torch.Tensor:
    """Bilinear, antialiased resize of a float CHW tensor (PIL's BILINEAR filter on downscaling)."""
    if image.shape[-2:] == (height, width):
        return image
    return F.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True,
                         align_corners=False)[0]


class RandomResizedCrop:
    """``pil_ops.RandomResizedCrop``: the box of ``random_resized_crop_box``, resized to ``size``."""

    def __init__(self, *, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.size = size
        self.scale = scale
        self.ratio = ratio

    def box(self, image: torch.Tensor, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        height, width = image.shape[-2:]
        return random_resized_crop_box(width, height, scale=self.scale, ratio=self.ratio, generator=generator)

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        top, left, h, w = self.box(image, generator)
        return resize(image[..., top:top + h, left:left + w], height=self.size, width=self.size)


class ResizeShorter:
    """``pil_ops.ResizeShorter``: the shorter side becomes ``size`` (same rounding of the longer)."""

    def __init__(self, *, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        h, w = image.shape[-2:]
        new_long = int(self.size * max(w, h) / min(w, h))
        height, width = (new_long, self.size) if w <= h else (self.size, new_long)
        return resize(image, height=height, width=width)


class CenterCrop:
    """``pil_ops.CenterCrop``: same offsets; a box reaching outside the image is zero-filled, as PIL's."""

    def __init__(self, *, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        h, w = image.shape[-2:]
        top = int(round((h - self.size) / 2.0))
        left = int(round((w - self.size) / 2.0))
        # Negative padding crops, positive padding adds zeros: one call covers both cases.
        return F.pad(image, (-left, left + self.size - w, -top, top + self.size - h))


DeviceStep = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


@dataclass(frozen=True)
class DevicePipeline:
    """What a split does to one decoded image (``steps``, in the CPU transform's order), then to the
    batch: scale to [0, 1] and, with ``mean``/``std``, normalize."""

    steps: tuple[DeviceStep, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
