"""From a run's configuration to its trainer: the optimizer settings and the keyword arguments every
trainer takes, in one place (train.py calls ``build_trainer``; tests and benchmarks build trainers
with their own keywords)."""
from __future__ import annotations

import sys
from dataclasses import replace

import torch
from torch import nn

from configs.errors import UserError
from configs.options import RobustOptions, SpeedOptions, section_of
from configs.schema import Config
from engine.distributed import Dist
from engine.lr_schedules import MASK_MILESTONES
from engine.optim import OptimSettings
from engine.run_log import RunLog
from layers import MaskSet
from pruning.schedule import DensitySchedule, EpochDensity
from trainers.base import BaseTrainer


def optim_settings(cfg: Config) -> tuple[OptimSettings, OptimSettings]:
    """(weight optimizer, score optimizer): the scores' lr and schedule are --mask-lr's (BiP's upper level)."""
    weights = OptimSettings(optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, wd=cfg.wd,
                            schedule=cfg.lr_schedule, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                            warmup_lr=cfg.warmup_lr)
    return weights, replace(weights, lr=cfg.mask_lr, schedule=cfg.mask_lr_schedule, milestones=MASK_MILESTONES)


def density_schedule(cfg: Config) -> EpochDensity | None:
    """--k-schedule as epoch -> density (None without one); a bad name is one line naming the choices."""
    if cfg.k_schedule == "none":
        return None
    try:
        schedule = DensitySchedule.parse(cfg.k_schedule)
    except ValueError as exc:
        raise UserError(f"--k-schedule {cfg.k_schedule}: {exc}") from None
    return EpochDensity(schedule, initial=cfg.init_density, final=cfg.k, epochs=cfg.schedule_epochs or cfg.epochs)


def build_trainer(cfg: Config, cls: type[BaseTrainer], *, model: nn.Module, maskset: MaskSet | None,
                  device: torch.device, group: Dist, log: RunLog) -> BaseTrainer:
    """The run's trainer, of class ``cls`` (``--trainer``), with its own options section read off ``cfg``."""
    weight_optim, score_optim = optim_settings(cfg)
    # A bar redraws ~190 bytes per step: into a redirected stderr (a cluster log) that is noise, so
    # without a terminal the per-batch lines at --print-freq go to the console instead.
    bar = (sys.stderr.isatty() if cfg.progress is None else cfg.progress) and group.main
    return cls(model=model, maskset=maskset, mode=cfg.exp_mode, device=device, weight_optim=weight_optim,
               score_optim=score_optim, freeze_bn=cfg.freeze_bn, label_smoothing=cfg.label_smoothing,
               progress=bar, log=log.debug if bar else log.info, print_freq=cfg.print_freq, seed=cfg.seed,
               options=section_of(cls.Options, cfg), robust=RobustOptions.of(cfg),
               source=cfg.source_net, speed=SpeedOptions.of(cfg), group=group, density_schedule=density_schedule(cfg),
               bn_l1=cfg.bn_l1)
