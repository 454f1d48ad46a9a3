"""Optimizers by name, their settings and schedule, and which parameters each one owns."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from engine.lr_schedules import WEIGHT_MILESTONES, lr_at


@dataclass(frozen=True)
class OptimSettings:
    """One optimizer and its schedule."""
    optimizer: str
    lr: float
    momentum: float
    wd: float
    schedule: str
    epochs: int
    warmup_epochs: int = 0
    warmup_lr: float = 0.0
    milestones: tuple[float, ...] = WEIGHT_MILESTONES

    def lr_at(self, epoch: int) -> float:
        return lr_at(self.schedule, epoch=epoch, base_lr=self.lr, epochs=self.epochs,
                     warmup_epochs=self.warmup_epochs, warmup_lr=self.warmup_lr, milestones=self.milestones)


# Not fused=True: fused kernels do not bump a parameter's version counter, which MaskSet reads to
# know that the scores changed.
OPTIMIZERS: dict[str, Callable[[list, OptimSettings], torch.optim.Optimizer]] = {
    "sgd": lambda p, s: torch.optim.SGD(p, lr=s.lr, momentum=s.momentum, weight_decay=s.wd),
    "adam": lambda p, s: torch.optim.Adam(p, lr=s.lr, weight_decay=s.wd),
    "rmsprop": lambda p, s: torch.optim.RMSprop(p, lr=s.lr, momentum=s.momentum, weight_decay=s.wd),
}


def make_optimizer(params: list[nn.Parameter], settings: OptimSettings) -> torch.optim.Optimizer:
    return OPTIMIZERS[settings.optimizer](params, settings)


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """(scores, batch-norm affine parameters, all other parameters), each in module order."""
    scores, bn, other = [], [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "popup_scores":
                scores.append(p)
            elif isinstance(module, nn.modules.batchnorm._NormBase):
                bn.append(p)
            else:
                other.append(p)
    return scores, bn, other


def own_only(model: nn.Module, trainable: Iterable[nn.Parameter]) -> None:
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
