"""Seeds for shuffling and augmentation that depend only on (seed, epoch, stream).

A training sampler yields keys ``(index, augmentation_seed)`` instead of bare indices, and the
datasets draw their random crops/flips from a generator seeded by that key. So an epoch's samples
*and* their augmentations are the same whatever the number of workers and whether the run was
resumed: ``--resume`` at epoch e replays exactly what the uninterrupted run did. A bare ``int``
index still works (then augmentation falls back to the global torch RNG, which the trainer seeds).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

SampleKey = int | tuple[int, int]

# Stream ids: distinct streams of one run get unrelated random numbers from the same seed.
STREAM_TRAIN = 0
STREAM_UPPER = 1
STREAM_HOLDOUT = 2
STREAM_WORKERS = 3


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixing ``parts`` (negative values allowed) with numpy's SeedSequence."""
    words = [int(p) % (1 << 64) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def split_key(key: SampleKey) -> tuple[int, torch.Generator | None]:
    """``(index, generator)`` for a sample key; ``None`` generator means: use the global RNG."""
    if isinstance(key, tuple):
        index, seed = key
        return int(index), torch.Generator().manual_seed(int(seed))
    return int(key), None


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffles ``indices`` with a generator seeded from (seed, epoch, stream).

    ``set_epoch(e)`` pins the next pass to epoch e; a pass without a preceding ``set_epoch`` uses
    the epoch after the previous pass, so forgetting ``set_epoch`` still gives fresh orders.
    """

    def __init__(self, indices: Sequence[int], *, seed: int, stream: int, shuffle: bool = True) -> None:
        self.indices = torch.as_tensor(list(indices), dtype=torch.int64)
        self.seed = seed
        self.stream = stream
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.stream))
        self.epoch += 1
        n = len(self.indices)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        aug_seeds = torch.randint(0, 1 << 62, (n,), generator=generator)
        yield from zip(self.indices[order].tolist(), aug_seeds.tolist())


def shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous block [start, stop) of 0..n-1 that ``rank`` of ``world`` takes (sizes differ by <= 1)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class RankBatches(Sampler[list[tuple[int, int]]]):
    """One rank's slices of the global batches of ``sampler`` (a batch sampler for a DataLoader).

    Every rank draws the same global order; global batch b is keys [b*B, (b+1)*B) (the last one
    shorter), split into ``world`` contiguous slices whose sizes differ by at most one, and rank r
    takes slice r. With world 1 these are exactly the batches of ``DataLoader(sampler, batch_size=B)``.
    """

    def __init__(self, sampler: EpochSampler, *, batch_size: int, rank: int, world: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.rank = rank
        self.world = world

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        keys = list(self.sampler)
        for b in range(0, len(keys), self.batch_size):
            batch = keys[b:b + self.batch_size]
            start, stop = shard(len(batch), self.rank, self.world)
            yield batch[start:stop]
