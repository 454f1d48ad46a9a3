"""DataLoaders for a run: the training stream, BiP's upper-level stream, validation and test.

Order and augmentation of every training batch are a function of (seed, epoch, stream) only
(``data.sampling``), so ``Loaders.set_epoch(e)`` reproduces epoch e exactly, also after --resume
and with any number of workers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset

from configs.errors import UserError
from data.encoded import EncodedImages, collate_encoded
from data.gpu_decode import DeviceLoader
from data.sampling import (
    STREAM_HOLDOUT,
    STREAM_TRAIN,
    STREAM_UPPER,
    STREAM_WORKERS,
    EpochSampler,
    RankBatches,
    derive_seed,
    shard,
)
from data.splits import DatasetSplits

# A DeviceLoader (--decode gpu) yields batches already on the device; both have sampler and dataset.
Batches = DataLoader | DeviceLoader


@dataclass
class Loaders:
    train: Batches  # shuffled training stream
    upper: Batches  # BiP upper level: independent shuffle of train, or the held-out fraction
    val: Batches | None
    test: Batches
    train_indices: list[int] = field(default_factory=list)  # the training split (after --data-fraction)
    seed: int = 0
    num_workers: int = 0
    pin_memory: bool = False
    rank: int = 0   # a distributed run's rank and number of ranks: train and upper yield this
    world: int = 1  # rank's slice of each global batch of --batch-size (data.sampling.RankBatches)

    def set_epoch(self, epoch: int) -> None:
        """Pin the next pass of ``train`` and ``upper`` to ``epoch`` (call before iterating)."""
        for loader in (self.train, self.upper):
            cast(RankBatches, loader.batch_sampler).sampler.set_epoch(epoch)  # build_loaders' batch sampler

    def stream(self, stream: int, *, epoch: int, batch_size: int,
               skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An endless stream of training batches (training augmentation) of its own: a function of
        (seed, stream, epoch) only, so a resumed run draws the same samples, and independent of the
        training order. Each pass over the training split is a fresh shuffle. For the OBS step's
        gradients, which must not shift the training streams. ``skip``: start after that many samples
        of the stream without loading them (a distributed rank's block of the Fisher rows)."""
        indices = self.train_indices or list(range(len(cast(Sized, self.train.dataset))))
        for k in itertools.count():
            sampler = EpochSampler(indices, seed=self.seed, stream=stream)
            sampler.set_epoch(epoch * 1_000_003 + k)
            if skip >= len(indices):  # the whole pass lies before the start
                skip -= len(indices)
                continue
            keys = list(sampler)[skip:]
            skip = 0
            yield from _loader(self.train.dataset, batch_size=batch_size, sampler=keys, seed=self.seed,
                               stream=stream, num_workers=self.num_workers, pin_memory=self.pin_memory)

    def shard(self, loader: Batches) -> tuple[Batches, int]:
        """This rank's contiguous part of an evaluation loader (``val``/``test``) and its size: the
        whole loader in a run of one process."""
        n = len(cast(Sized, loader.dataset))
        if self.world == 1:
            return loader, n
        start, stop = shard(n, self.rank, self.world)
        part = _loader(loader.dataset, batch_size=cast(int, loader.batch_size), sampler=range(start, stop),
                       seed=self.seed, stream=-3, num_workers=self.num_workers, pin_memory=self.pin_memory)
        return part, stop - start


def holdout_split(n: int, *, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held_out) indices of 0..n-1: a seeded random ``val_fraction`` of them held out."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_held = int(round(val_fraction * n))
    if val_fraction > 0 and not 0 < n_held < n:
        raise UserError(f"--val-fraction {val_fraction} of {n} training images leaves an empty split: "
                        "use a fraction that holds out at least one image and keeps at least one")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, STREAM_HOLDOUT)))
    held = sorted(order[:n_held].tolist())
    kept = sorted(order[n_held:].tolist())
    return kept, held


def check_batch_size(batch_size: int, *, train: int, upper: int | None, data_fraction: float,
                     val_fraction: float) -> None:
    """Refuse a training batch larger than a stream it is drawn from (``upper``: BiP's held-out part).

    The loaders keep the last short batch, so such a batch size would silently train on one short
    batch per epoch instead of the batch size asked for. The smaller stream is named: lowering
    the batch size to it satisfies both.
    """
    subset = f" in the --data-fraction {data_fraction} subset" if data_fraction < 1.0 else ""
    held = f" left by --val-fraction {val_fraction}" if upper is not None else ""
    streams = [(train, f"training images{subset}{held}", "")]
    if upper is not None:
        streams.append((upper, f"images{subset} that --val-fraction {val_fraction} holds out for the upper level",
                        " or a larger --val-fraction"))
    size, what, alternative = min(streams)
    if batch_size > size:
        raise UserError(f"--batch-size {batch_size} is larger than the {size} {what}: use --batch-size at most "
                        f"{size}{alternative}")


def _loader(dataset: Dataset, *, batch_size: int, sampler: Iterable | None, seed: int, stream: int,
            num_workers: int, pin_memory: bool, rank: int = 0, world: int = 1) -> Batches:
    """A loader of ``dataset``; a training stream (an EpochSampler) goes through RankBatches, so that
    it yields this rank's slice of every global batch (all of it with world 1)."""
    batches = None
    if isinstance(sampler, EpochSampler):
        batches, sampler = RankBatches(sampler, batch_size=batch_size, rank=rank, world=world), None
    encoded = isinstance(dataset, EncodedImages)  # bytes mode: the device decodes (data.gpu_decode)
    loader = DataLoader(
        dataset, batch_size=1 if batches is not None else batch_size, sampler=sampler, batch_sampler=batches,
        shuffle=False, num_workers=num_workers, persistent_workers=num_workers > 0,
        # The JPEG decoder reads encoded bytes from any host memory: pinning them would only cost.
        pin_memory=pin_memory and not encoded, collate_fn=collate_encoded if encoded else None,
        # Worker seeds come from this generator; augmentation itself is seeded per sample.
        generator=torch.Generator().manual_seed(derive_seed(seed, STREAM_WORKERS, stream)),
    )
    return DeviceLoader(loader) if encoded else loader


def build_loaders(splits: DatasetSplits, *, batch_size: int, test_batch_size: int, seed: int = 0,
                  num_workers: int = 0, pin_memory: bool = False, val_fraction: float = 0.0,
                  data_fraction: float = 1.0, rank: int = 0, world: int = 1) -> Loaders:
    """rank, world: a distributed run's; --batch-size stays the global batch (see Loaders.rank)."""
    if batch_size <= 0 or test_batch_size <= 0:
        raise UserError(f"batch sizes must be positive, got --batch-size {batch_size} "
                        f"--test-batch-size {test_batch_size}")
    if num_workers < 0:
        raise UserError(f"--num-workers must be >= 0, got {num_workers}")
    n = len(cast(Sized, splits.train))
    if val_fraction > 0:
        train_idx, upper_idx = holdout_split(n, val_fraction=val_fraction, seed=seed)
    else:
        holdout_split(n, val_fraction=val_fraction, seed=seed)  # validates the range
        train_idx = upper_idx = list(range(n))
    if not 0.0 < data_fraction <= 1.0:
        raise UserError(f"--data-fraction must be in (0, 1], got {data_fraction}")
    if data_fraction < 1.0:  # HYDRA's --data-fraction: the same seeded subset on every machine
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, STREAM_HOLDOUT, 1)))
        subset = set(order[: max(1, int(data_fraction * n))].tolist())
        train_idx = [i for i in train_idx if i in subset]
        upper_idx = [i for i in upper_idx if i in subset] if val_fraction > 0 else train_idx
        if not train_idx or not upper_idx:
            raise UserError(f"--data-fraction {data_fraction} with --val-fraction {val_fraction} leaves an empty "
                            f"split of the {n} training images: raise --data-fraction")
    check_batch_size(batch_size, train=len(train_idx), upper=len(upper_idx) if val_fraction > 0 else None,
                     data_fraction=data_fraction, val_fraction=val_fraction)
    if world > 1:
        check_rank_batches(batch_size, world=world, streams={"training images": len(train_idx),
                                                             "upper-level images": len(upper_idx)})
    common: dict[str, Any] = dict(seed=seed, num_workers=num_workers, pin_memory=pin_memory)
    train = _loader(splits.train, batch_size=batch_size, stream=STREAM_TRAIN, rank=rank, world=world,
                    sampler=EpochSampler(train_idx, seed=seed, stream=STREAM_TRAIN), **common)
    upper = _loader(splits.train, batch_size=batch_size, stream=STREAM_UPPER, rank=rank, world=world,
                    sampler=EpochSampler(upper_idx, seed=seed, stream=STREAM_UPPER), **common)
    val = None if splits.val is None else _loader(splits.val, batch_size=test_batch_size, sampler=None,
                                                  stream=-1, **common)
    test = _loader(splits.test, batch_size=test_batch_size, sampler=None, stream=-2, **common)
    return Loaders(train=train, upper=upper, val=val, test=test, train_indices=list(train_idx), seed=seed,
                   num_workers=num_workers, pin_memory=pin_memory, rank=rank, world=world)


def check_rank_batches(batch_size: int, *, world: int, streams: dict[str, int]) -> None:
    """Every rank needs at least one sample of every global batch (an empty slice has no mean loss
    and BatchNorm cannot normalise it): --batch-size and each stream's last batch must be >= world."""
    if batch_size < world:
        raise UserError(f"--batch-size {batch_size} (the global batch) is smaller than the {world} processes: "
                        f"use --batch-size at least {world}")
    for what, n in streams.items():
        last = n % batch_size
        if 0 < last < world:
            raise UserError(f"the last batch of the {n} {what} has {last} sample(s), fewer than the {world} "
                            f"processes: pick a --batch-size whose remainder of {n} is 0 or at least {world} "
                            f"(e.g. {next(b for b in range(batch_size, 0, -1) if n % b == 0 or n % b >= world)})")
