"""Listing images on disk: class-per-folder trees (ImageFolder) and the tiny-imagenet-200 layout.

Class order and sample order follow torchvision's ``ImageFolder`` (sorted class folders, then
``sorted(os.walk(...))`` with sorted file names), so labels match checkpoints trained with it.
Two deliberate differences: hidden entries (``.DS_Store``, ``.ipynb_checkpoints``) are ignored,
and an empty class folder or a stray non-image file is an error instead of being silently dropped
(both shift or hide labels without anyone noticing).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

from configs.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageList:
    """Image files and labels. Paths are kept as one numpy byte-string array relative to ``root``:
    a list of 1.3M Python strings would be copied page by page into every forked worker as
    reference counts change, a numpy array is not."""

    root: str
    relpaths: np.ndarray  # dtype 'S', os.fsencode'd paths relative to root
    labels: np.ndarray  # int64
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(bytes(self.relpaths[index])))

    def samples(self) -> list[tuple[str, int]]:
        """(path, label) pairs, as torchvision's ``ImageFolder.samples``."""
        return [(self.path(i), int(self.labels[i])) for i in range(len(self))]


def _class_names(class_to_idx: dict[str, int]) -> tuple[str, ...]:
    return tuple(sorted(class_to_idx, key=class_to_idx.__getitem__))


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def find_classes(root: str, *, fix: str) -> list[str]:
    """Sorted class folder names under ``root``; ``fix`` says how to get them there."""
    if not os.path.isdir(root):
        raise UserError(f"{root} does not exist or is not a folder: {fix}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not _hidden(e.name))
    if not classes:
        loose = [e.name for e in os.scandir(root) if e.is_file() and is_image_file(e.name)]
        if loose:
            raise UserError(f"{root} holds images directly ({loose[0]}, ...) but needs one folder per class: {fix}")
        raise UserError(f"{root} has no class folders: {fix}")
    return classes


def _not_an_image(path: str, *, skip: bool) -> None:
    message = (f"{path} is not an image file (expected one of {' '.join(IMAGE_EXTENSIONS)}): "
               "move it out of the dataset folder, or pass --skip-bad-records to ignore it")
    if not skip:
        raise UserError(message)
    print(f"warning: ignoring {path}: not an image file", file=sys.stderr)


def scan_class_folders(root: str, *, class_to_idx: dict[str, int], classes: list[str] | None = None,
                       subfolder: str = "", skip_bad_records: bool = False) -> ImageList:
    """Images under ``root/<class>/<subfolder>`` for each class in ``classes`` (default: all)."""
    relpaths: list[bytes] = []
    labels: list[int] = []
    for name in classes if classes is not None else sorted(class_to_idx):
        class_dir = os.path.join(root, name, subfolder) if subfolder else os.path.join(root, name)
        found = 0
        for walk_root, _, files in sorted(os.walk(class_dir, followlinks=True)):
            inside = os.path.relpath(walk_root, class_dir)
            if inside != "." and any(_hidden(part) for part in inside.split(os.sep)):
                continue
            for file_name in sorted(files):
                if _hidden(file_name):
                    continue
                path = os.path.join(walk_root, file_name)
                if not is_image_file(file_name):
                    _not_an_image(path, skip=skip_bad_records)
                    continue
                relpaths.append(os.fsencode(os.path.relpath(path, root)))
                labels.append(class_to_idx[name])
                found += 1
        if found == 0:
            where = "does not exist" if not os.path.isdir(class_dir) else "has no images"
            raise UserError(f"class folder {class_dir} {where}: add its images or remove the class folder "
                            "(a missing class shifts the label of every later class)")
    return ImageList(root=root, relpaths=np.array(relpaths, dtype=np.bytes_),
                     labels=np.array(labels, dtype=np.int64), classes=_class_names(class_to_idx))


def scan_image_folder(root: str, *, fix: str, class_to_idx: dict[str, int] | None = None,
                      skip_bad_records: bool = False) -> ImageList:
    """A class-per-folder tree. With ``class_to_idx`` (the train split's), labels come from it and
    the tree may hold a subset of those classes, but no class the mapping lacks."""
    present = find_classes(root, fix=fix)
    if class_to_idx is None:
        class_to_idx = {name: i for i, name in enumerate(present)}
    unknown = [name for name in present if name not in class_to_idx]
    if unknown:
        raise UserError(f"{os.path.join(root, unknown[0])} is a class the training split does not have "
                        f"({len(unknown)} such folders): train and val must use the same class folder names")
    return scan_class_folders(root, class_to_idx=class_to_idx, classes=present, skip_bad_records=skip_bad_records)


# ---------------------------------------------------------------- tiny-imagenet-200

TINY_VAL_ANNOTATIONS = os.path.join("val", "val_annotations.txt")


def scan_tiny_train(root: str, *, skip_bad_records: bool = False) -> ImageList:
    """``root/train/<wnid>/images/*.JPEG``; labels by sorted wnid, as ImageFolder on ``root/train``."""
    train = os.path.join(root, "train")
    classes = find_classes(train, fix="extract tiny-imagenet-200.zip unchanged")
    class_to_idx = {name: i for i, name in enumerate(classes)}
    return scan_class_folders(train, class_to_idx=class_to_idx, subfolder="images",
                              skip_bad_records=skip_bad_records)


def scan_tiny_val(root: str, *, class_to_idx: dict[str, int], skip_bad_records: bool = False) -> ImageList:
    """The val split read in place: ``val/images/*`` labelled by ``val/val_annotations.txt``.

    Sorted by file name. Users who already moved val images into ``val/<wnid>/`` folders (a common
    preparation script) are served too: without the annotation file, ``val`` is read as ImageFolder.
    """
    val = os.path.join(root, "val")
    annotations = os.path.join(root, TINY_VAL_ANNOTATIONS)
    if not os.path.isfile(annotations):
        return scan_image_folder(val, class_to_idx=class_to_idx, skip_bad_records=skip_bad_records,
                                 fix=f"expected {annotations} (extract tiny-imagenet-200.zip unchanged)")
    entries: list[tuple[str, int]] = []
    with open(annotations, encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2 or fields[1] not in class_to_idx:
                raise UserError(f"{annotations} line {line_number} does not name an image and a training class "
                                f"({line.strip()[:60]!r}): restore the file from tiny-imagenet-200.zip")
            entries.append((fields[0], class_to_idx[fields[1]]))
    relpaths, labels = [], []
    for name, label in sorted(entries):
        path = os.path.join(val, "images", name)
        if not os.path.isfile(path):
            raise UserError(f"{path} is listed in {annotations} but missing: restore it from tiny-imagenet-200.zip")
        if not is_image_file(name):
            _not_an_image(path, skip=skip_bad_records)
            continue
        relpaths.append(os.fsencode(os.path.join("images", name)))
        labels.append(label)
    if not relpaths:
        raise UserError(f"{annotations} lists no images: restore it from tiny-imagenet-200.zip")
    return ImageList(root=val, relpaths=np.array(relpaths, dtype=np.bytes_),
                     labels=np.array(labels, dtype=np.int64), classes=_class_names(class_to_idx))
