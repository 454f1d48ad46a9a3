"""``CIFAR10`` / ``CIFAR100`` from the torchvision on-disk layout (the "python version" archives).

Never downloads. The batches are pickles, read with ``data.safe_pickle`` (numpy arrays and plain
containers only). Images stay in memory as one uint8 tensor; training augmentation is a random
32x32 crop of the 4-pixel zero-padded image plus a horizontal flip, done with tensor ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from configs.errors import UserError
from data.normalization import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from data.registry import register_dataset, resolve_num_classes
from data.safe_pickle import NUMPY_GLOBALS, safe_load_file
from data.splits import DatasetSplits
from data.tensor_dataset import InMemoryImages
from data.tensor_ops import Compose, Normalize, RandomCropPadded, RandomHorizontalFlip, Resize, ToFloat, Transform

NATIVE_SIZE = 32
PIXELS = 3 * NATIVE_SIZE * NATIVE_SIZE


@dataclass(frozen=True)
class CifarLayout:
    name: str
    folder: str  # what the archive extracts to
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10 = CifarLayout(name="CIFAR10", folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
                      train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
                      label_key="labels", num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD)
# HYDRA builds CIFAR100's test set from CIFAR10 files; here every split comes from this layout.
CIFAR100 = CifarLayout(name="CIFAR100", folder="cifar-100-python", archive="cifar-100-python.tar.gz",
                       train_files=("train",), test_files=("test",), label_key="fine_labels",
                       num_classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD)


def find_cifar_root(layout: CifarLayout, data_dir: str) -> str:
    """The folder holding the batch files: DIR/<folder> or DIR itself; else a UserError saying what to put where."""
    candidates = [os.path.join(data_dir, layout.folder), data_dir]
    for root in candidates:
        if all(os.path.isfile(os.path.join(root, f)) for f in layout.train_files + layout.test_files):
            return root
    root = candidates[0] if os.path.basename(os.path.normpath(data_dir)) != layout.folder else data_dir
    missing = next(os.path.join(root, f) for f in layout.train_files + layout.test_files
                   if not os.path.isfile(os.path.join(root, f)))
    archive = os.path.join(data_dir, layout.archive)
    how = (f"extract {archive} there (tar xzf {archive} -C {data_dir})" if os.path.isfile(archive)
           else f"the torchvision layout: extract {layout.archive} into {data_dir}")
    raise UserError(f"{layout.name} not found: expected {missing} ({how}; this program never downloads)")


def check_labels(labels: list | np.ndarray, *, path: str, layout: CifarLayout) -> np.ndarray:
    """The labels as int64, each an integer in 0..num_classes-1; else a UserError naming the first bad one.

    Checked before any conversion: np.asarray would turn "3" or 2.7 into a label silently, and
    a huge int into an OverflowError.
    """
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise UserError(f"{path} has '{layout.label_key}' of dtype {labels.dtype} and shape {labels.shape}, "
                            f"not a list of class numbers: not a {layout.name} batch; re-extract {layout.archive}")
        values = labels.tolist()
    else:
        values = labels
    for i, label in enumerate(values):
        if isinstance(label, int) and not isinstance(label, bool):
            if 0 <= label < layout.num_classes:
                continue
            # str() of an int of thousands of digits raises ValueError
            shown = str(label) if label.bit_length() < 64 else f"<{label.bit_length()}-bit int>"
            hint = " (CIFAR10 and CIFAR100 files mixed up?)"
        else:
            shown = repr(label)[:40] if isinstance(label, (float, str, bytes)) else f"<{type(label).__name__}>"
            hint = ""
        raise UserError(f"{path} has label {shown} at position {i}, not a class number in "
                        f"0..{layout.num_classes - 1}: not a {layout.name} batch{hint}; re-extract {layout.archive}")
    return np.asarray(values, dtype=np.int64)


def read_batch(path: str, *, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """(images n x 3 x 32 x 32 uint8, labels n int64) from one python batch file."""
    entry = safe_load_file(path, allowed=NUMPY_GLOBALS, encoding="latin1")
    if not isinstance(entry, dict):
        raise UserError(f"{path} is not a {layout.name} python batch (no dict inside); re-extract {layout.archive}")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data, labels = entry.get("data"), entry.get(layout.label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        raise UserError(f"{path} has no {PIXELS}-byte uint8 'data' rows: not a {layout.name} batch; "
                        f"re-extract {layout.archive}")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        raise UserError(f"{path} has no '{layout.label_key}' list matching its {len(data)} images: "
                        f"not a {layout.name} batch; re-extract {layout.archive}")
    labels = check_labels(labels, path=path, layout=layout)
    return data.reshape(-1, 3, NATIVE_SIZE, NATIVE_SIZE), labels


def read_split(root: str, files: tuple[str, ...], *, layout: CifarLayout) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [read_batch(os.path.join(root, f), layout=layout) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def build_cifar(layout: CifarLayout, *, data_dir: str, normalize: bool, image_dim: int | None,
                num_classes: int | None) -> DatasetSplits:
    root = find_cifar_root(layout, data_dir)
    size = image_dim or NATIVE_SIZE
    tail: list[Transform] = [ToFloat(scale=255.0), Resize(size=size)]
    if normalize:
        tail.append(Normalize(mean=layout.mean, std=layout.std))
    train_tf = Compose([RandomCropPadded(size=NATIVE_SIZE, padding=4), RandomHorizontalFlip(), *tail])
    eval_tf = Compose(tail)
    train_x, train_y = read_split(root, layout.train_files, layout=layout)
    test_x, test_y = read_split(root, layout.test_files, layout=layout)
    return DatasetSplits(train=InMemoryImages(train_x, train_y, transform=train_tf), val=None,
                         test=InMemoryImages(test_x, test_y, transform=eval_tf),
                         num_classes=resolve_num_classes(layout.name, found=layout.num_classes,
                                                         requested=num_classes),
                         in_channels=3, image_size=size)


@register_dataset("CIFAR10")
def build_cifar10(*, data_dir: str, normalize: bool, image_dim: int | None, num_classes: int | None,
                  skip_bad_records: bool) -> DatasetSplits:
    del skip_bad_records  # records are rows of one array: a bad file is unusable as a whole
    return build_cifar(CIFAR10, data_dir=data_dir, normalize=normalize, image_dim=image_dim,
                       num_classes=num_classes)


@register_dataset("CIFAR100")
def build_cifar100(*, data_dir: str, normalize: bool, image_dim: int | None, num_classes: int | None,
                   skip_bad_records: bool) -> DatasetSplits:
    del skip_bad_records
    return build_cifar(CIFAR100, data_dir=data_dir, normalize=normalize, image_dim=image_dim,
                       num_classes=num_classes)
