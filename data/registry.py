"""Datasets by name: a registry filled by ``@register_dataset`` and the one entry point ``build_dataset``.

Each builder is called with the same keyword arguments (``data_dir, normalize, image_dim,
num_classes, skip_bad_records``) and returns ``DatasetSplits``; a new dataset is a new entry.
``--decode`` is applied here, to every JPEG dataset alike (``data.gpu_decode``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sized
from typing import cast

import torch

from configs.errors import UserError
from configs.registry import Registry
from data.gpu_decode import decode_on_device, encoded_splits
from data.splits import DatasetSplits

DatasetBuilder = Callable[..., DatasetSplits]
DATASETS: Registry[DatasetBuilder] = Registry("dataset", flag="--dataset")
register_dataset = DATASETS.register
dataset_names = DATASETS.names


def build_dataset(name: str, *, data_dir: str, normalize: bool = False, image_dim: int | None = None,
                  num_classes: int | None = None, skip_bad_records: bool = False, decode: str = "cpu",
                  device: torch.device | str = "cpu") -> DatasetSplits:
    """Build the splits of dataset ``name`` from files under ``data_dir`` (never downloads).

    ``decode`` (``--decode``) and ``device``: where JPEG images are decoded; with ``gpu`` (or ``auto``
    on a CUDA device) the splits yield encoded bytes and their loaders decode on ``device``."""
    builder = DATASETS.get(name)
    on_device = decode_on_device(decode, dataset=DATASETS.resolve(name), device=torch.device(device))
    if image_dim is not None and image_dim <= 0:
        raise UserError(f"--image-dim must be a positive number of pixels, got {image_dim}")
    if num_classes is not None and num_classes <= 0:
        raise UserError(f"--num-classes must be positive, got {num_classes}")
    data_dir = os.path.expanduser(str(data_dir or "."))
    splits = builder(data_dir=data_dir, normalize=normalize, image_dim=image_dim, num_classes=num_classes,
                     skip_bad_records=skip_bad_records)
    # An empty split would train or evaluate on nothing and report NaN metrics with exit status 0.
    for split, dataset in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        if dataset is not None and len(cast(Sized, dataset)) == 0:  # map-style datasets, all sized
            source = getattr(dataset, "source", data_dir)
            raise UserError(f"the {split} split of {DATASETS.resolve(name)} is empty: {source} holds no images; point "
                            "--data-dir at a complete copy of the dataset (LMDB: re-create it with sh/prepare_lmdb.sh)")
    if on_device:
        return encoded_splits(splits, dataset=DATASETS.resolve(name), normalize=normalize, device=device)
    return splits


def resolve_num_classes(dataset: str, *, found: int, requested: int | None, where: str = "") -> int:
    """The model's number of outputs: the dataset's own unless the user asked for more.

    Fewer outputs than the data has labels would make the loss index out of range mid-run, so it
    is refused up front; more outputs (a model sized for a superset) are allowed.
    """
    if requested is None:
        return found
    if requested < found:
        source = f" ({found} class folders in {where})" if where else ""
        raise UserError(f"{dataset} has labels 0..{found - 1}{source} but --num-classes is {requested}: "
                        f"pass --num-classes {found} (or leave it out)")
    return requested
