"""What the embedded datasets (Digits, MNIST5k) share: a fixed stratified split and in-memory splits.

The split uses our own seeded permutation (not sklearn's splitter, whose algorithm may change between
versions), so it is identical on every machine. No augmentation: small digit images have no room for
crops, and a flip changes a digit.
"""

from __future__ import annotations

import numpy as np
import torch

from data.registry import resolve_num_classes
from data.splits import DatasetSplits
from data.tensor_dataset import InMemoryImages
from data.tensor_ops import Compose, Normalize, Resize, ToFloat, Transform

SPLIT_SEED = 0
VAL_FRACTION = 0.1
TEST_FRACTION = 0.2


def stratified_split(labels: np.ndarray, *, seed: int, val_fraction: float,
                     test_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: shuffle its indices, take round(fraction * n_class) for test, then val."""
    rng = np.random.RandomState(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        n_test = int(round(test_fraction * len(members)))
        n_val = int(round(val_fraction * len(members)))
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test:n_test + n_val])
        parts[0].append(members[n_test + n_val:])
    return tuple(np.sort(np.concatenate(p)) for p in parts)  # type: ignore[return-value]


def embedded_splits(name: str, images: np.ndarray, labels: np.ndarray, *, max_pixel: float, normalize: bool,
                    image_dim: int | None, num_classes: int | None) -> DatasetSplits:
    """Fixed 70/10/20 splits of grayscale ``images`` (N x H x W uint8 in 0..max_pixel), scaled to [0, 1],
    resized to ``image_dim`` if given, and normalised by the training split's mean/std if asked."""
    train_idx, val_idx, test_idx = stratified_split(labels, seed=SPLIT_SEED, val_fraction=VAL_FRACTION,
                                                    test_fraction=TEST_FRACTION)
    size = image_dim or images.shape[-1]
    steps: list[Transform] = [ToFloat(scale=max_pixel), Resize(size=size)]
    if normalize:
        train_pixels = images[train_idx].astype(np.float64) / max_pixel
        steps.append(Normalize(mean=(float(train_pixels.mean()),), std=(float(train_pixels.std()),)))
    transform = Compose(steps)
    tensor = torch.from_numpy(images).unsqueeze(1)  # N x 1 x H x W
    targets = torch.from_numpy(labels)

    def subset(idx: np.ndarray) -> InMemoryImages:
        idx_t = torch.from_numpy(idx)
        return InMemoryImages(tensor[idx_t].contiguous(), targets[idx_t], transform=transform)

    found = int(labels.max()) + 1
    return DatasetSplits(train=subset(train_idx), val=subset(val_idx), test=subset(test_idx),
                         num_classes=resolve_num_classes(name, found=found, requested=num_classes),
                         in_channels=1, image_size=size)
