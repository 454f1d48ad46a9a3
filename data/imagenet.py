"""``ImageNet`` from ``DIR/train.lmdb`` + ``DIR/val.lmdb`` (BiP's files) or ``DIR/train/`` + ``DIR/val/``.

LMDB is picked when both files exist. Transforms are the standard ones: RandomResizedCrop + flip
for training, Resize(dim / 0.875) + CenterCrop(dim) for evaluation (256/224 at the default 224).
ImageNet's ``val`` split is the test set (as in HYDRA/BiP); there is no separate validation split.
"""

from __future__ import annotations

import os

from configs.errors import UserError
from data import device_ops, tensor_ops
from data.device_ops import DevicePipeline
from data.file_dataset import FileImages
from data.gpu_decode import register_device_pipeline
from data.image_folder import scan_image_folder
from data.lmdb_reader import LmdbImages, find_lmdb_pair
from data.normalization import IMAGENET_MEAN, IMAGENET_STD
from data.pil_ops import CenterCrop, RandomHorizontalFlip, RandomResizedCrop, ResizeShorter, ToUint8Tensor
from data.registry import register_dataset, resolve_num_classes
from data.splits import DatasetSplits
from data.tensor_ops import Compose, Normalize, ToFloat, Transform

DEFAULT_SIZE = 224
CROP_FRACTION = 0.875  # 224 / 256
NUM_CLASSES = 1000
PREPARE_VAL = ("the flat ILSVRC2012 val folder must be sorted into class folders first: "
               "sh/prepare_imagenet_val.sh --src VALDIR --mapping MAPPING --out DIR/val")


def imagenet_transforms(*, size: int, normalize: bool) -> tuple[Compose, Compose]:
    tail: list[Transform] = [ToUint8Tensor(), ToFloat(scale=255.0)]
    if normalize:
        tail.append(Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD))
    train = Compose([RandomResizedCrop(size=size), RandomHorizontalFlip(), *tail])
    evaluation = Compose([ResizeShorter(size=int(round(size / CROP_FRACTION))), CenterCrop(size=size), *tail])
    return train, evaluation


@register_device_pipeline("ImageNet")
def imagenet_device_pipelines(*, size: int, normalize: bool) -> tuple[DevicePipeline, DevicePipeline]:
    """``imagenet_transforms`` on the device (--decode gpu), step for step."""
    norm = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD) if normalize else {}
    train = DevicePipeline(steps=(device_ops.RandomResizedCrop(size=size), tensor_ops.RandomHorizontalFlip()), **norm)
    evaluation = DevicePipeline(steps=(device_ops.ResizeShorter(size=int(round(size / CROP_FRACTION))),
                                       device_ops.CenterCrop(size=size)), **norm)
    return train, evaluation


def _missing(data_dir: str) -> UserError:
    return UserError(f"ImageNet not found under {data_dir}: expected {os.path.join(data_dir, 'train')}/ and "
                     f"{os.path.join(data_dir, 'val')}/ (one folder per class) or "
                     f"{os.path.join(data_dir, 'train.lmdb')} and val.lmdb (sh/prepare_lmdb.sh makes them)")


@register_dataset("ImageNet")
def build_imagenet(*, data_dir: str, normalize: bool, image_dim: int | None, num_classes: int | None,
                   skip_bad_records: bool) -> DatasetSplits:
    size = image_dim or DEFAULT_SIZE
    train_tf, eval_tf = imagenet_transforms(size=size, normalize=normalize)
    pair = find_lmdb_pair(data_dir)
    if pair is not None:
        # Labels live inside the records: without scanning 1.3M of them the class count is the
        # standard one unless given; each record's label is checked against it when read.
        classes = num_classes or NUM_CLASSES
        train = LmdbImages(pair[0], transform=train_tf, num_classes=classes, skip_bad_records=skip_bad_records)
        test = LmdbImages(pair[1], transform=eval_tf, num_classes=classes, skip_bad_records=skip_bad_records)
        return DatasetSplits(train=train, val=None, test=test, num_classes=classes, in_channels=3, image_size=size)
    train_dir, val_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    if not os.path.isdir(train_dir) or not os.path.isdir(val_dir):
        raise _missing(data_dir)
    train_list = scan_image_folder(train_dir, skip_bad_records=skip_bad_records,
                                   fix=f"put one folder of images per class in {train_dir}")
    class_to_idx = {name: i for i, name in enumerate(train_list.classes)}
    val_list = scan_image_folder(val_dir, class_to_idx=class_to_idx, skip_bad_records=skip_bad_records,
                                 fix=PREPARE_VAL)
    classes = resolve_num_classes("ImageNet", found=len(train_list.classes), requested=num_classes,
                                  where=train_dir)
    return DatasetSplits(train=FileImages(train_list, transform=train_tf, skip_bad_records=skip_bad_records),
                         val=None, test=FileImages(val_list, transform=eval_tf, skip_bad_records=skip_bad_records),
                         num_classes=classes, in_channels=3, image_size=size)
