"""Bytes mode of the JPEG datasets (``--decode gpu``): items are the encoded image, not pixels.

``EncodedImages`` wraps an ``LmdbImages`` or ``FileImages`` split. Its items are
``(image, label, index, aug_seed)``: ``image`` is the JPEG's bytes as a 1-D uint8 tensor, decoded
later on the device (``data.gpu_decode``); any other format (PNG, BMP, ...) is decoded here, in the
DataLoader worker, by the CPU path's decoder, and comes as a 3 x H x W uint8 tensor. ``index`` is
the record actually read (a skipped bad record is replaced by the next readable one, as on the CPU
path) and ``aug_seed`` the sampler's augmentation seed (``None`` for a bare index: the global RNG).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from data.decode import decode_rgb
from data.device_ops import DevicePipeline
from data.file_dataset import FileImages
from data.lmdb_reader import LmdbImages
from data.pil_ops import ToUint8Tensor
from data.sampling import SampleKey

JPEG_MAGIC = b"\xff\xd8\xff"  # SOI marker + the first marker's prefix: what decode_jpeg reads

EncodedItem = tuple[torch.Tensor, int, int, "int | None"]


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_MAGIC


class EncodedImages(Dataset):
    def __init__(self, base: LmdbImages | FileImages, *, pipeline: DevicePipeline,
                 device: torch.device) -> None:
        self.base = base
        self.pipeline = pipeline
        self.device = device

    def __len__(self) -> int:
        return len(self.base)

    @property
    def source(self) -> str:
        return self.base.source

    @property
    def skipped_records(self) -> int:
        return self.base.skipped_records

    def record_name(self, index: int) -> str:
        return self.base.record_name(index)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """Record ``index`` as a JPEG byte tensor or, for other formats, decoded pixels (BadRecordError)."""
        data, label = self.base.raw(index)
        if is_jpeg(data):
            return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()), label
        return ToUint8Tensor()(decode_rgb(data, source=self.record_name(index)), None), label

    def _load_tagged(self, index: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.load(index)
        return image, label, index

    def __getitem__(self, key: SampleKey) -> EncodedItem:
        if isinstance(key, tuple):
            index, seed = int(key[0]), int(key[1])
        else:
            index, seed = int(key), None
        image, label, used = self.base.bad.fetch(index, len(self), self._load_tagged)
        return image, label, used, seed


class EncodedBatch(NamedTuple):
    images: list[torch.Tensor]  # per sample: 1-D JPEG bytes or 3 x H x W uint8 pixels
    labels: torch.Tensor  # int64
    indices: list[int]
    seeds: list[int | None]


def collate_encoded(items: list[EncodedItem]) -> EncodedBatch:
    """Keep the images a list: encoded lengths and decoded sizes differ, nothing stacks before decoding."""
    return EncodedBatch(images=[item[0] for item in items], labels=torch.tensor([item[1] for item in items]),
                        indices=[item[2] for item in items], seeds=[item[3] for item in items])
