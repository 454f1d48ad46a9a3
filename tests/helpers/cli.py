"""Runs driven through train.main: a Ctrl-C at a chosen epoch."""
from __future__ import annotations

from collections.abc import Callable


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
