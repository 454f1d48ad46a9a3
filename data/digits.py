"""``Digits``: scikit-learn's bundled 8x8 handwritten digits, so the quick start needs no download.

1797 grayscale images, 10 classes, pixel values 0..16 (scaled to [0, 1]). The split is a fixed
stratified 70/10/20 train/val/test drawn with our own seeded permutation (not sklearn's splitter,
whose algorithm may change between versions), so it is identical on every machine. No augmentation:
8x8 digits have no room for crops, and a flip changes the digit.
"""

from __future__ import annotations

import numpy as np
import torch

from configs.errors import UserError
from data.registry import DatasetSplits, register_dataset, resolve_num_classes
from data.tensor_dataset import InMemoryImages
from data.tensor_ops import Compose, Normalize, Resize, ToFloat, Transform

SPLIT_SEED = 0
VAL_FRACTION = 0.1
TEST_FRACTION = 0.2
NATIVE_SIZE = 8
MAX_PIXEL = 16.0


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


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images N x 8 x 8 uint8 in 0..16, labels N int64) from the installed scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("dataset Digits needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    return digits.images.astype(np.uint8), digits.target.astype(np.int64)


@register_dataset("Digits")
def build_digits(*, data_dir: str, normalize: bool, image_dim: int | None, num_classes: int | None,
                 skip_bad_records: bool) -> DatasetSplits:
    del data_dir, skip_bad_records  # bundled with scikit-learn; nothing to read or skip
    images, labels = load_digit_arrays()
    train_idx, val_idx, test_idx = stratified_split(labels, seed=SPLIT_SEED, val_fraction=VAL_FRACTION,
                                                    test_fraction=TEST_FRACTION)
    size = image_dim or NATIVE_SIZE
    steps: list[Transform] = [ToFloat(scale=MAX_PIXEL), Resize(size=size)]
    if normalize:
        train_pixels = images[train_idx].astype(np.float64) / MAX_PIXEL
        steps.append(Normalize(mean=(float(train_pixels.mean()),), std=(float(train_pixels.std()),)))
    transform = Compose(steps)
    tensor = torch.from_numpy(images).unsqueeze(1)  # N x 1 x 8 x 8
    targets = torch.from_numpy(labels)

    def subset(idx: np.ndarray) -> InMemoryImages:
        idx_t = torch.from_numpy(idx)
        return InMemoryImages(tensor[idx_t].contiguous(), targets[idx_t], transform=transform)

    return DatasetSplits(train=subset(train_idx), val=subset(val_idx), test=subset(test_idx),
                         num_classes=resolve_num_classes("Digits", found=10, requested=num_classes),
                         in_channels=1, image_size=size)
