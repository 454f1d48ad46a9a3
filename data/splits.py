"""What a dataset builder returns: its splits and the shape of its samples."""
from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset


@dataclass(frozen=True)
class DatasetSplits:
    train: Dataset  # training augmentation; items (float tensor C x H x W, int label)
    val: Dataset | None  # held-out split with evaluation transforms; None when the dataset has none
    test: Dataset  # evaluation transforms
    # A split read from one file or folder names it in a ``source`` attribute, for error messages.
    num_classes: int
    in_channels: int
    image_size: int
