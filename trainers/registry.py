"""Trainers by name: a new method is a new entry, not a new branch in train.py."""
from __future__ import annotations

from collections.abc import Callable

from configs.registry import Registry

TRAINERS: Registry[type] = Registry("trainer", flag="--trainer")
get_trainer = TRAINERS.get


def register_trainer(name: str) -> Callable[[type], type]:
    """Class decorator: registers the trainer under ``name`` and records the name on the class."""
    def wrap(cls: type) -> type:
        cls.name = name  # type: ignore[attr-defined]
        return TRAINERS.add(name, cls)
    return wrap
