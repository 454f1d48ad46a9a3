"""Trainers by name: a new method is a new entry, not a new branch in train.py."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from configs.registry import Registry

if TYPE_CHECKING:  # trainers.base registers itself here: a run-time import would be circular
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
