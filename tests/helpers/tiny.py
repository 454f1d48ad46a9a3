"""Tiny data for the in-process trainer tests."""
from __future__ import annotations

import torch

from data.sampling import split_key


class KeyedTensors(torch.utils.data.Dataset):
    """Tensors read with the sample keys the run's samplers give ((index, augmentation seed))."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, key):
        index, _ = split_key(key)
        return self.x[index], int(self.y[index])
