"""Trainers by name: a new method is a new entry, not a new branch in train.py.

The base trainer (plain training and HYDRA) is the first entry; every other trainer module
registers itself with ``@register_trainer`` and imports this module, never the other way round.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from configs.registry import Registry
from trainers.base import BaseTrainer

TRAINERS: Registry[type[BaseTrainer]] = Registry("trainer", flag="--trainer")
get_trainer = TRAINERS.get
TrainerClass = TypeVar("TrainerClass", bound="type[BaseTrainer]")


def register_trainer(name: str) -> Callable[[TrainerClass], TrainerClass]:
    """Class decorator: registers the trainer under ``name`` and records the name on the class."""
    def wrap(cls: TrainerClass) -> TrainerClass:
        cls.name = name
        TRAINERS.add(name, cls)
        return cls
    return wrap


register_trainer(BaseTrainer.name)(BaseTrainer)
