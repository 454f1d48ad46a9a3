"""Learning-rate schedules by name, set once per epoch (epochs count from 0).

As HYDRA/BiP define them, with two of their bugs fixed: the cosine uses ``epoch`` (not
``epoch - 1``) over the epochs left after warmup, so it starts at ``lr`` right after warmup and
its last epoch is the smallest; and the step schedule honours the warmup instead of overwriting it.

    warmup:    lr(e) = warmup_lr                                   for e < W
    constant:  lr(e) = lr
    cosine:    lr(e) = lr * (1 + cos(pi * (e - W) / (E - W))) / 2
    step:      lr(e) = lr * 0.1 ** (number of milestones m with (e - W) >= m * (E - W))

Milestones: (0.5, 0.75) for weights (HYDRA), (0.75, 0.9) for BiP's mask schedule.
"""
from __future__ import annotations

import math
from collections.abc import Callable

WEIGHT_MILESTONES = (0.5, 0.75)
MASK_MILESTONES = (0.75, 0.9)


def _constant(t: float, milestones: tuple[float, ...]) -> float:
    return 1.0


def _cosine(t: float, milestones: tuple[float, ...]) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * t))


def _step(t: float, milestones: tuple[float, ...]) -> float:
    return 0.1 ** sum(t >= m for m in milestones)


# name -> multiplier of the base lr as a function of the fraction t in [0, 1) of post-warmup epochs
SCHEDULES: dict[str, Callable[[float, tuple[float, ...]], float]] = {
    "constant": _constant,
    "cosine": _cosine,
    "step": _step,
}


def lr_at(kind: str, *, epoch: int, base_lr: float, epochs: int, warmup_epochs: int = 0,
          warmup_lr: float = 0.0, milestones: tuple[float, ...] = WEIGHT_MILESTONES) -> float:
    """Learning rate for ``epoch`` (0-based) under the named schedule."""
    if epoch < warmup_epochs:
        return warmup_lr
    span = max(1, epochs - warmup_epochs)
    return base_lr * SCHEDULES[kind]((epoch - warmup_epochs) / span, milestones)
