"""Helpers shared by test files: interrupting a run driven through train.main, and a dataset read with
the samplers' sample keys."""
from __future__ import annotations

from collections.abc import Callable

import torch

from data.sampling import split_key


def interrupt_at(monkeypatch, trainer_cls, epoch: int) -> Callable[[], None]:
    """Make ``trainer_cls`` raise KeyboardInterrupt (a Ctrl-C) when it starts ``epoch`` (0-based);
    returns the function that restores it, so that the run can then be resumed."""
    original = trainer_cls.train_epoch

    def train_epoch(self, current, loaders):
        if current == epoch:
            raise KeyboardInterrupt
        return original(self, current, loaders)

    monkeypatch.setattr(trainer_cls, "train_epoch", train_epoch)
    return lambda: monkeypatch.setattr(trainer_cls, "train_epoch", original)


class KeyedTensors(torch.utils.data.Dataset):
    """Tensors read with the sample keys the run's samplers give ((index, augmentation seed))."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, key):
        index, _ = split_key(key)
        return self.x[index], int(self.y[index])
