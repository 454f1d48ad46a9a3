"""What a trainer needs and accepts, declared once on its class and read by generic code.

Each trainer class carries ``capabilities``: the modes it runs, whether it collects Fisher gradient
rows, whether it reads a rewind point, whether it runs under ``--amp fp16``, whether it accepts
``--obs-update`` (and if not, why), and its method's name in the results report. The option checks
(``configs.checks``), ``train.py`` and the report (``study.report``) read this record instead of
comparing ``--trainer`` with a name, so a new trainer is a new class with its record and nothing
else changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from configs.choices import MODES

if TYPE_CHECKING:  # annotations only
    from configs.options import OptionSection


@dataclass(frozen=True)
class Capabilities:
    label: str                           # the method's name in the results report (summary.json "method")
    modes: tuple[str, ...] = ("prune",)  # the --exp-mode values it runs
    fisher_rows: bool = False            # collects Fisher gradient rows itself (the --fisher-* checks apply)
    rewind_point: bool = False           # reads a --rewind-epoch checkpoint of its --source-net run
    fp16: bool = True                    # runs under --amp fp16 (its GradScaler)
    obs_update: str | None = None        # None: accepts --obs-update; else why not (for the error line)
    coupled: str | None = None           # None: its masks come from the mask set's selector, so --coupled applies
    k_schedule: str | None = None        # None: its masks follow the mask set's k, so --k-schedule applies
    layer_k: str | None = None           # None: its masks come from the mask set's selector, so --layer-k applies

    def __post_init__(self) -> None:
        unknown = set(self.modes) - set(MODES)
        if unknown:
            raise ValueError(f"unknown modes {sorted(unknown)}; modes are {MODES}")


@dataclass(frozen=True)
class RunSpec:
    """What a trainer's option check needs to know of the run (besides its own options)."""

    mode: str
    layer_type: str
    k: float
    scope: str
    epochs: int
    coupled: bool = False  # --coupled: filter masks per dependency group


class TrainerSpec(Protocol):
    """A trainer class as the option checks see it: its record, its option section and that section's check."""

    name: str
    capabilities: Capabilities
    Options: type[OptionSection] | None

    @classmethod
    def check_options(cls, options: OptionSection | None, *, run: RunSpec) -> None: ...
