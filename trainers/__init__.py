"""Trainers (a registry), their shared loop, checkpoints and logging."""
from trainers import base, bilevel, lth, woodfisher  # noqa: F401  (importing registers the trainers)
from trainers.registry import TRAINERS, get_trainer, register_trainer

__all__ = ["TRAINERS", "get_trainer", "register_trainer"]
