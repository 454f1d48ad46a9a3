"""Trainers by name: a new method is a new entry, not a new branch in train.py."""
from __future__ import annotations

import difflib

from configs.errors import UserError

TRAINERS: dict[str, type] = {}


def register_trainer(name: str):
    def wrap(cls):
        if name in TRAINERS:
            raise ValueError(f"trainer {name!r} registered twice")
        TRAINERS[name] = cls
        cls.name = name
        return cls
    return wrap


def get_trainer(name: str) -> type:
    if name not in TRAINERS:
        match = difflib.get_close_matches(name, TRAINERS, n=1)
        hint = f"; did you mean '{match[0]}'?" if match else ""
        raise UserError(f"unknown trainer '{name}'{hint} (choose from {', '.join(sorted(TRAINERS))})")
    return TRAINERS[name]
