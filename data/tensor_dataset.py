"""A dataset of images held in memory as one uint8 tensor (CIFAR, Digits)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from data.sampling import SampleKey, split_key
from data.tensor_ops import TensorTransform


class InMemoryImages(Dataset):
    """Items ``(transform(images[i]), int(labels[i]))``; images N x C x H x W uint8.

    Keeping uint8 (not float) costs a quarter of the memory, and crops/flips on uint8 are cheaper.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, transform: TensorTransform) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be an N x C x H x W uint8 tensor")
        if len(images) != len(labels):
            raise ValueError("images and labels differ in length")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int]:
        index, generator = split_key(key)
        return self.transform(self.images[index], generator), int(self.labels[index])
