"""``--decode gpu``: JPEG batches decoded and augmented on the device instead of in CPU workers.

On two CPU cores PIL decodes 500-800 ImageNet JPEGs/s, far below what one GPU trains on. Here the
workers only read bytes (``data.encoded``); ``DeviceTransform`` decodes a batch with one
``torchvision.io.decode_jpeg(list, device=...)`` call, applies each sample's steps on the device
(``data.device_ops``: the CPU path's crop boxes and flips for the same sample keys) and stacks a
normalized float batch there. ``DeviceLoader`` wraps the DataLoader of bytes, so consumers keep
iterating ``(x, y)`` and their ``.to(device)`` is a no-op.

The device is a parameter, not hard-wired CUDA: the CPU tests run the very same code.
torchvision is imported on first use only (importing it costs ~1 s that CPU runs need not pay).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from configs.choices import DECODE_MODES
from configs.errors import UserError
from configs.registry import Registry
from data.decode import decode_rgb
from data.device_ops import DevicePipeline
from data.encoded import EncodedBatch, EncodedImages
from data.file_dataset import FileImages
from data.lmdb_reader import LmdbImages
from data.pil_ops import ToUint8Tensor
from data.splits import DatasetSplits

# Dataset name -> (size, normalize) -> (training pipeline, evaluation pipeline). A dataset that
# registers here is a JPEG dataset, eligible for --decode gpu; its module keeps the pipelines next
# to its CPU transforms, step for step.
PipelineBuilder = Callable[..., tuple[DevicePipeline, DevicePipeline]]
DEVICE_PIPELINES: Registry[PipelineBuilder] = Registry("device pipeline", flag="--dataset")
register_device_pipeline = DEVICE_PIPELINES.register


def decode_on_device(decode: str, *, dataset: str, device: torch.device) -> bool:
    """Whether a run decodes on its device: ``--decode`` resolved against its dataset and device."""
    if decode not in DECODE_MODES:
        raise UserError(f"unknown --decode {decode!r}: use one of {', '.join(DECODE_MODES)}")
    jpeg_dataset = dataset in DEVICE_PIPELINES
    if decode == "auto":
        return jpeg_dataset and device.type == "cuda"
    if decode == "cpu":
        return False
    if not jpeg_dataset:
        raise UserError(f"--decode gpu decodes JPEG datasets only ({', '.join(DEVICE_PIPELINES.names())}), "
                        f"not {dataset}: pass --decode cpu or auto")
    if device.type != "cuda":
        raise UserError(f"--decode gpu needs a CUDA device but this run's device is {device}: pass --decode cpu "
                        "or auto (or --device cuda on a machine with a GPU)")
    return True


def encoded_splits(splits: DatasetSplits, *, dataset: str, normalize: bool,
                   device: torch.device | str) -> DatasetSplits:
    """``splits`` of a JPEG dataset in bytes mode, their batches to be decoded on ``device``."""
    train_pipeline, eval_pipeline = DEVICE_PIPELINES.get(dataset)(size=splits.image_size, normalize=normalize)
    device = torch.device(device)

    def wrap(split: object, pipeline: DevicePipeline) -> EncodedImages:
        assert isinstance(split, (LmdbImages, FileImages)), f"{dataset} registered a device pipeline but " \
            f"its split is a {type(split).__name__}"
        return EncodedImages(split, pipeline=pipeline, device=device)

    return dataclasses.replace(splits, train=wrap(splits.train, train_pipeline),
                               val=None if splits.val is None else wrap(splits.val, eval_pipeline),
                               test=wrap(splits.test, eval_pipeline))


class DeviceTransform:
    """An ``EncodedBatch`` of ``dataset`` -> ``(x, y)`` on the dataset's device."""

    def __init__(self, dataset: EncodedImages) -> None:
        self.dataset = dataset
        self.device = dataset.device
        pipeline = dataset.pipeline
        self.steps = pipeline.steps
        self.mean = None if pipeline.mean is None else torch.tensor(pipeline.mean, device=self.device).view(1, -1, 1, 1)
        self.std = None if pipeline.std is None else torch.tensor(pipeline.std, device=self.device).view(1, -1, 1, 1)

    def __call__(self, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.decode(batch)
        out = []
        for image, seed in zip(images, batch.seeds, strict=True):
            # The generator the CPU path would build from this sample's key (data.sampling.split_key).
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            x = image.to(torch.float32)
            for step in self.steps:
                x = step(x, generator)
            out.append(x)
        x = torch.stack(out).div_(255.0)
        if self.mean is not None and self.std is not None:
            x = x.sub_(self.mean).div_(self.std)
        return x, labels.to(self.device)

    def decode(self, batch: EncodedBatch) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(3 x H x W uint8 images on the device, labels): the JPEGs in one batched call, the rest
        (decoded by the workers) moved. When the batched call fails, each JPEG is decoded alone,
        a bad one replaced as on the CPU path (``decode_or_replace``), its label with it."""
        from torchvision.io import ImageReadMode, decode_jpeg

        images = list(batch.images)
        labels = batch.labels
        jpegs = [i for i, image in enumerate(images) if image.dim() == 1]
        try:
            decoded = decode_jpeg([images[i] for i in jpegs], device=self.device,
                                  mode=ImageReadMode.RGB) if jpegs else []
        except torch.OutOfMemoryError:  # not a bad record: a fall-back would hide it as a slow-down
            raise
        except RuntimeError:  # one bad record fails the whole call: find it (them) one by one
            labels = labels.clone()
            decoded = []
            for i in jpegs:
                image, labels[i] = self.decode_or_replace(images[i], index=batch.indices[i],
                                                          label=int(batch.labels[i]))
                decoded.append(image)
        for i, image in zip(jpegs, decoded, strict=True):
            images[i] = image
        return [image.to(self.device) for image in images], labels

    def decode_or_replace(self, data: torch.Tensor, *, index: int, label: int) -> tuple[torch.Tensor, int]:
        """Record ``index`` decoded; a bad one raises or, with --skip-bad-records, is counted and
        replaced by the next readable record (keeping this sample's augmentation), as on the CPU path."""
        def load(i: int) -> tuple[torch.Tensor, int]:
            encoded, record_label = (data, label) if i == index else self.dataset.load(i)
            return self.decode_one(encoded, i), record_label

        return self.dataset.base.bad.fetch(index, len(self.dataset), load)

    def decode_one(self, data: torch.Tensor, index: int) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        if data.dim() == 3:  # decoded by the worker (not a JPEG)
            return data.to(self.device)
        try:
            return decode_jpeg(data, device=self.device, mode=ImageReadMode.RGB)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            pass
        # A JPEG variant the device decoder refuses (e.g. CMYK on some decoders) is not a bad record
        # unless the CPU path's decoder fails too: that one raises the CPU path's BadRecordError.
        source = self.dataset.record_name(index)
        pixels = ToUint8Tensor()(decode_rgb(data.numpy().tobytes(), source=source), None)
        return pixels.to(self.device)


class DeviceLoader:
    """A DataLoader of ``EncodedBatch``es that yields ``(x, y)`` on the device.

    ``sampler``, ``batch_sampler`` and ``dataset`` pass through (``Loaders.set_epoch``, ``Loaders.stream`` read them).
    """

    def __init__(self, loader: DataLoader) -> None:
        assert isinstance(loader.dataset, EncodedImages)
        self.loader = loader
        self.transform = DeviceTransform(loader.dataset)

    @property
    def dataset(self) -> EncodedImages:
        return self.transform.dataset

    @property
    def sampler(self) -> object:
        return self.loader.sampler

    @property
    def batch_sampler(self) -> object:
        return self.loader.batch_sampler

    @property
    def batch_size(self) -> int | None:
        return self.loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            yield self.transform(batch)

