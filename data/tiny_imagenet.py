"""``TinyImageNet``: the ``tiny-imagenet-200`` folder as it unpacks, read in place, or an LMDB pair.

``--data-dir`` may be the folder itself or its parent; ``train.lmdb`` + ``val.lmdb`` in either are
used when both exist. Nothing under the user's folder is moved or written: val labels come from
``val/val_annotations.txt``. Its ``val`` split is the test set (the official test split has no
labels). 64x64 images: training uses a 4-pixel padded random crop plus flip, evaluation none.
"""

from __future__ import annotations

import os

from configs.errors import UserError
from data import device_ops
from data.device_ops import DevicePipeline
from data.file_dataset import FileImages
from data.gpu_decode import register_device_pipeline
from data.image_folder import TINY_VAL_ANNOTATIONS, scan_tiny_train, scan_tiny_val
from data.lmdb_reader import LmdbImages, find_lmdb_pair
from data.normalization import TINYIMAGENET_MEAN, TINYIMAGENET_STD
from data.pil_ops import CenterCrop, ResizeShorter, ToUint8Tensor
from data.registry import register_dataset, resolve_num_classes
from data.splits import DatasetSplits
from data.tensor_ops import Compose, Normalize, RandomCropPadded, RandomHorizontalFlip, Resize, ToFloat, Transform

FOLDER = "tiny-imagenet-200"
NATIVE_SIZE = 64
NUM_CLASSES = 200


def tiny_transforms(*, size: int, normalize: bool) -> tuple[Compose, Compose]:
    # Every official image is 64x64; ResizeShorter/CenterCrop only matter for odd ones (then a
    # batch still stacks) and cost nothing otherwise.
    head: list[Transform] = [ResizeShorter(size=NATIVE_SIZE), CenterCrop(size=NATIVE_SIZE), ToUint8Tensor()]
    tail: list[Transform] = [ToFloat(scale=255.0), Resize(size=size)]
    if normalize:
        tail.append(Normalize(mean=TINYIMAGENET_MEAN, std=TINYIMAGENET_STD))
    train = Compose([*head, RandomCropPadded(size=NATIVE_SIZE, padding=4), RandomHorizontalFlip(), *tail])
    return train, Compose([*head, *tail])


@register_device_pipeline("TinyImageNet")
def tiny_device_pipelines(*, size: int, normalize: bool) -> tuple[DevicePipeline, DevicePipeline]:
    """``tiny_transforms`` on the device (--decode gpu), step for step (the crop pads with zeros there too)."""
    head = (device_ops.ResizeShorter(size=NATIVE_SIZE), device_ops.CenterCrop(size=NATIVE_SIZE))
    norm = dict(mean=TINYIMAGENET_MEAN, std=TINYIMAGENET_STD) if normalize else {}
    # Resize works on [0, 255] values as on [0, 1]: the filter is linear.
    train = DevicePipeline(steps=(*head, RandomCropPadded(size=NATIVE_SIZE, padding=4), RandomHorizontalFlip(),
                                  Resize(size=size)), **norm)
    return train, DevicePipeline(steps=(*head, Resize(size=size)), **norm)


def find_tiny_root(data_dir: str) -> tuple[str, tuple[str, str] | None]:
    """(dataset folder, LMDB pair or None)."""
    for root in (os.path.join(data_dir, FOLDER), data_dir):
        pair = find_lmdb_pair(root) if os.path.isdir(root) else None
        if pair is not None:
            return root, pair
        if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
            return root, None
    raise UserError(f"TinyImageNet not found under {data_dir}: expected {os.path.join(data_dir, FOLDER)}/train/ "
                    f"and {os.path.join(data_dir, FOLDER, TINY_VAL_ANNOTATIONS)} (unzip tiny-imagenet-200.zip into "
                    f"{data_dir}) or train.lmdb and val.lmdb there (sh/prepare_lmdb.sh makes them)")


@register_dataset("TinyImageNet")
def build_tiny_imagenet(*, data_dir: str, normalize: bool, image_dim: int | None, num_classes: int | None,
                        skip_bad_records: bool) -> DatasetSplits:
    size = image_dim or NATIVE_SIZE
    train_tf, eval_tf = tiny_transforms(size=size, normalize=normalize)
    root, pair = find_tiny_root(data_dir)
    if pair is not None:
        classes = num_classes or NUM_CLASSES
        train = LmdbImages(pair[0], transform=train_tf, num_classes=classes, skip_bad_records=skip_bad_records)
        test = LmdbImages(pair[1], transform=eval_tf, num_classes=classes, skip_bad_records=skip_bad_records)
        return DatasetSplits(train=train, val=None, test=test, num_classes=classes, in_channels=3, image_size=size)
    train_list = scan_tiny_train(root, skip_bad_records=skip_bad_records)
    class_to_idx = {name: i for i, name in enumerate(train_list.classes)}
    val_list = scan_tiny_val(root, class_to_idx=class_to_idx, skip_bad_records=skip_bad_records)
    classes = resolve_num_classes("TinyImageNet", found=len(train_list.classes), requested=num_classes,
                                  where=os.path.join(root, "train"))
    return DatasetSplits(train=FileImages(train_list, transform=train_tf, skip_bad_records=skip_bad_records),
                         val=None, test=FileImages(val_list, transform=eval_tf, skip_bad_records=skip_bad_records),
                         num_classes=classes, in_channels=3, image_size=size)
