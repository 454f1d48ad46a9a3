"""One registry class for everything chosen by name: architectures, datasets, trainers, prune methods.

A registry is filled by a decorator (``@MODELS.register("resnet18")``), so a new method is a new
entry and never a new ``if`` branch. Looking a name up follows one rule everywhere:

1. the exact name;
2. else the one name equal to it ignoring case (``cifar10`` -> ``CIFAR10``); two such names
   (``resnet18`` and ``ResNet18``) make it ambiguous, so it falls through to 3;
3. else a ``UserError`` naming the flag, the closest registered name (difflib, ignoring case) and
   the choices.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, ItemsView, Iterator, ValuesView
from typing import Any, Generic, TypeVar

from configs.errors import UserError

T = TypeVar("T")
_LIST_LIMIT = 8  # longer choice lists point to --help instead of filling the line


class Registry(Generic[T]):
    def __init__(self, kind: str, *, flag: str) -> None:
        self.kind = kind  # what an entry is, for messages: "architecture", "dataset", ...
        self.flag = flag  # the command-line flag that picks an entry
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` adds the decorated object under ``name``."""
        def add(item: T) -> T:
            return self.add(name, item)
        return add

    def add(self, name: str, item: T) -> T:
        # A silent overwrite would make the name mean whichever module was imported last.
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def resolve(self, name: str) -> str:
        """The registered name ``name`` stands for (see the module docstring), or UserError."""
        if name in self._items:
            return name
        same = [key for key in self._items if key.lower() == str(name).lower()]
        if len(same) == 1:
            return same[0]
        names = self.names()
        lower = {key.lower(): key for key in names}
        close = difflib.get_close_matches(str(name).lower(), list(lower), n=1, cutoff=0.0)
        hint = f"; did you mean {lower[close[0]]!r}?" if close else ""
        choices = (f"choose from {', '.join(names)}" if len(names) <= _LIST_LIMIT
                   else "see python train.py --help for the list")
        raise UserError(f"unknown {self.kind} {name!r} for {self.flag}{hint} ({choices})")

    def get(self, name: str) -> T:
        return self._items[self.resolve(name)]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> ItemsView[str, T]:
        return self._items.items()

    def values(self) -> ValuesView[T]:
        return self._items.values()

    def pop(self, name: str, default: Any = None) -> Any:
        return self._items.pop(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
