"""A dataset of image files listed in an ``ImageList``, decoded with PIL on access."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from data.bad_records import BadRecordError, BadRecordPolicy
from data.decode import decode_rgb
from data.image_folder import ImageList
from data.sampling import SampleKey, split_key

ImageTransform = Callable[[Any, "torch.Generator | None"], torch.Tensor]


class FileImages(Dataset):
    def __init__(self, images: ImageList, *, transform: ImageTransform, skip_bad_records: bool = False) -> None:
        self.images = images
        self.transform = transform
        self.bad = BadRecordPolicy(skip=skip_bad_records, source=images.root)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.images.classes

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.images.labels)

    @property
    def source(self) -> str:
        return self.images.root

    @property
    def skipped_records(self) -> int:
        return self.bad.skipped

    def __len__(self) -> int:
        return len(self.images)

    def raw(self, index: int) -> tuple[bytes, int]:
        """The file's bytes and label, undecoded."""
        path = self.images.path(index)
        try:
            with open(path, "rb") as handle:
                return handle.read(), int(self.images.labels[index])
        except OSError as exc:
            raise BadRecordError(f"cannot read {path} ({exc.strerror}); restore it, or pass --skip-bad-records "
                                 "to skip it") from None

    def record_name(self, index: int) -> str:
        """How messages name record ``index``."""
        return self.images.path(index)

    def _load(self, index: int) -> tuple[Any, int]:
        data, label = self.raw(index)
        return decode_rgb(data, source=self.record_name(index)), label

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int]:
        index, generator = split_key(key)
        image, label = self.bad.fetch(index, len(self), self._load)
        return self.transform(image, generator), label
