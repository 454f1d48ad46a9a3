"""What to do with one unreadable record (undecodable image, missing LMDB key, malformed value).

By default the first bad record stops the run with its ``UserError``. With ``skip_bad_records``
the record is replaced by the next readable one, a warning names it, and it is counted in a
shared-memory counter so the main process sees the total over all DataLoader workers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import torch
from torch.utils.data import get_worker_info

from configs.errors import UserError

T = TypeVar("T")

# Bound the search for a readable neighbour: a file where this many records in a row are bad is
# broken as a whole and should stop the run rather than silently train on a sliver of it.
MAX_CONSECUTIVE_BAD = 64
_WARN_PER_PROCESS = 10
_SLOTS = 257  # one counter per DataLoader worker (plus the main process): no lost updates


class BadRecordError(UserError):
    """One record cannot be used; skippable with ``skip_bad_records``."""


class BadRecordPolicy:
    def __init__(self, *, skip: bool, source: str) -> None:
        self.skip = skip
        self.source = source
        self._counts = torch.zeros(_SLOTS, dtype=torch.int64).share_memory_()
        self._warned = 0

    @property
    def skipped(self) -> int:
        """Records skipped so far, summed over the main process and all workers."""
        return int(self._counts.sum())

    def fetch(self, index: int, size: int, load: Callable[[int], T]) -> T:
        """``load(index)``, or with skipping, ``load`` of the first readable record after it."""
        for attempt in range(MAX_CONSECUTIVE_BAD):
            try:
                return load((index + attempt) % size)
            except BadRecordError as error:
                if not self.skip:
                    raise
                self._count(error)
        raise UserError(f"{MAX_CONSECUTIVE_BAD} consecutive unreadable records in {self.source} from index "
                        f"{index}: the data is broken as a whole; re-create it (see the warnings above)")

    def _count(self, error: BadRecordError) -> None:
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (_SLOTS - 1)
        self._counts[slot] += 1
        if self._warned < _WARN_PER_PROCESS:
            self._warned += 1
            print(f"warning: skipping bad record: {error}", file=sys.stderr)
