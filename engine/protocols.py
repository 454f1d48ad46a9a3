"""What the engine calls the rest of a run through. Trainers (``trainers/``) implement ``Trainer``;
the engine never imports them, so a trainer is anything with these methods."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from engine.distributed import Dist
from layers import MaskSet

if TYPE_CHECKING:  # annotations only
    from data.loaders import Loaders


class Trainer(Protocol):
    """The epoch loop's view of a trainer (``engine.loop.fit``) and the checkpoint's (``engine.source``)."""

    def set_epoch(self, epoch: int) -> dict[str, float]:
        """Set the learning rates of ``epoch``; returns them by optimizer key."""
        ...

    def train_epoch(self, epoch: int, loaders: Loaders) -> dict[str, float]:
        """Train one epoch; returns its mean loss, top1 and top5 over every process's samples."""
        ...

    def pop_notes(self) -> list[str]:
        """Lines for the run log since the last call (e.g. pruning events)."""
        ...

    def final_masks(self, epoch: int) -> bool:
        """Whether the model after ``epoch`` has the run's final masks (only those compete for model_best)."""
        ...

    def state_dict(self) -> dict[str, dict]:
        """The optimizer (and scaler) state of a checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Restore ``state_dict()``'s state; ValueError/KeyError when it does not fit."""
        ...


@dataclass(frozen=True)
class FitContext:
    """What a hook of the epoch loop (``engine.protocols.FitHook``) works on. Before the first epoch the
    run folder does not exist yet: ``run_dir`` and ``checkpoint`` are None and ``log`` collects notices."""

    model: nn.Module
    maskset: MaskSet | None
    loaders: Loaders
    device: torch.device
    group: Dist
    log: Callable[[str], None]
    run_dir: str | None = None
    checkpoint: Callable[[], dict[str, Any]] | None = None  # the run's checkpoint of the model as it is now


class FitHook(Protocol):
    """Work the epoch loop does around the epochs (``--obs-update``: ``engine.obs_update.ObsUpdate``)."""

    def before_fit(self, run: FitContext) -> None:
        """Before the first epoch of a fresh run (not of a resumed one), before the run folder exists."""
        ...

    def after_fit(self, run: FitContext, *, test_top1: float) -> None:
        """After the last epoch and its test evaluation (``test_top1``), in every run."""
        ...

    def summary_fields(self) -> dict[str, Any]:
        """The hook's entries of summary.json."""
        ...
