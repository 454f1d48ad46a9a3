"""What a training step asks of the device, counted the same way on every device: the operators it
dispatches and the host reads among them.

``DispatchCount`` is a ``TorchDispatchMode``: inside ``with DispatchCount() as count:`` every ATen
operator that reaches a kernel is counted once (the level a GPU launches kernels at; composite ops are
counted as what they decompose into), by name. A *host read* is an operator whose result the host must
wait for: ``_local_scalar_dense`` (behind ``.item()``, ``bool()``, ``int()``, ``float()`` and
``.tolist()`` of a tensor) and the ops whose output size depends on the data (``nonzero``,
``masked_select``, ``unique``...), which drain a GPU's queue just the same. On the CPU they cost
little, but the count is what a GPU step would wait for, which is why it is measured here, where every
CI machine can count it (issue: one code path for both devices, no host synchronisation inside a step).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

# Operators whose result the host must read before it can go on (see the module docstring).
HOST_READS = frozenset({"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique",
                        "_unique", "_unique2", "unique_consecutive", "unique_dim", "item"})


class DispatchCount(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the ``with`` block, by name (``counts``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def operators(self) -> int:
        return sum(self.counts.values())

    @property
    def host_reads(self) -> int:
        return sum(n for name, n in self.counts.items() if name in HOST_READS)

    def reads(self) -> dict[str, int]:
        """The host reads by operator name."""
        return {name: n for name, n in self.counts.items() if name in HOST_READS}
