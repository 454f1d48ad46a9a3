"""``Digits``: scikit-learn's bundled 8x8 handwritten digits, so the quick start needs no download.

1797 grayscale images, 10 classes, pixel values 0..16 (scaled to [0, 1]), in the fixed stratified
70/10/20 train/val/test split of ``data.embedded``.
"""

from __future__ import annotations

import numpy as np

from configs.errors import UserError
from data.embedded import SPLIT_SEED, TEST_FRACTION, VAL_FRACTION, embedded_splits, stratified_split
from data.registry import register_dataset
from data.splits import DatasetSplits

__all__ = ["SPLIT_SEED", "TEST_FRACTION", "VAL_FRACTION", "build_digits", "load_digit_arrays", "stratified_split"]

MAX_PIXEL = 16.0


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
    return embedded_splits("Digits", images, labels, max_pixel=MAX_PIXEL, normalize=normalize,
                           image_dim=image_dim, num_classes=num_classes)
