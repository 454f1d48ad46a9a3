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
