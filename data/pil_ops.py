"""Seeded per-image transforms on PIL images (ImageNet-style pipelines).

torchvision's random transforms draw from the global torch RNG; these draw their parameters from
the ``generator`` they are given (same algorithm as torchvision), so that the sampler's per-sample
seed decides the augmentation (``data.sampling``). The PIL calls are the ones torchvision makes
(its PIL path is ``Image.crop`` / ``Image.resize`` with BILINEAR), so the pixels are the same;
they are written out here so that ``import data`` does not pay ~1 s for importing torchvision.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


def _randint(high: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(0, high, (1,), generator=generator))


def random_resized_crop_box(width: int, height: int, *, scale: tuple[float, float], ratio: tuple[float, float],
                            generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """(top, left, h, w) as ``transforms.RandomResizedCrop.get_params`` picks them."""
    area = height * width
    log_low, log_high = (float(v) for v in torch.log(torch.tensor(ratio)))  # float32, as torchvision
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_low, log_high, generator))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(height - h + 1, generator), _randint(width - w + 1, generator), h, w
    in_ratio = width / height  # fallback: the central crop with the nearest allowed aspect ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class RandomResizedCrop:
    def __init__(self, *, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.size = size
        self.scale = scale
        self.ratio = ratio

    def __call__(self, image: Image.Image, generator: torch.Generator | None) -> Image.Image:
        top, left, h, w = random_resized_crop_box(image.width, image.height, scale=self.scale, ratio=self.ratio,
                                                  generator=generator)
        return image.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.Resampling.BILINEAR)


class RandomHorizontalFlip:
    def __call__(self, image: Image.Image, generator: torch.Generator | None) -> Image.Image:
        if float(torch.rand((), generator=generator)) < 0.5:
            return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


class ResizeShorter:
    """``transforms.Resize(size)``: the shorter side becomes ``size``."""

    def __init__(self, *, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image, generator: torch.Generator | None) -> Image.Image:
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_long = int(self.size * long / short)
        size = (self.size, new_long) if w <= h else (new_long, self.size)
        return image if size == (w, h) else image.resize(size, Image.Resampling.BILINEAR)


class CenterCrop:
    def __init__(self, *, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image, generator: torch.Generator | None) -> Image.Image:
        # PIL fills the part of a box outside the image with zeros, as torchvision's padding does.
        w, h = image.size
        top = int(round((h - self.size) / 2.0))
        left = int(round((w - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))


class ToUint8Tensor:
    """PIL -> uint8 C x H x W tensor (follow with ``tensor_ops.ToFloat`` for ToTensor semantics)."""

    def __call__(self, image: Image.Image, generator: torch.Generator | None) -> torch.Tensor:
        array = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
