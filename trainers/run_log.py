"""What a run writes for people: log lines, a metrics CSV, tensorboard scalars, sparsity tables."""
from __future__ import annotations

import csv
import os
import sys
from typing import Iterable

from layers import LayerSparsity


def sparsity_table(rows: Iterable[LayerSparsity]) -> str:
    """A per-layer table (layer, type, params, kept, sparsity) with a total row."""
    rows = list(rows)
    width = max([len("layer"), len("total")] + [len(r.name) for r in rows])
    head = f"{'layer':<{width}}  {'type':<7} {'params':>11} {'kept':>11} {'sparsity':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.kind:<7} {r.params:>11,} {r.kept:>11,} {100 * r.sparsity:>8.2f}%")
    params, kept = sum(r.params for r in rows), sum(r.kept for r in rows)
    total = 1 - kept / params if params else 0.0
    lines.append("-" * len(head))
    lines.append(f"{'total':<{width}}  {'':<7} {params:>11,} {kept:>11,} {100 * total:>8.2f}%")
    return "\n".join(lines)


class RunLog:
    """Console + ``run.log`` lines, ``metrics.csv`` rows and tensorboard scalars of one run folder."""

    def __init__(self, folder: str | None = None, *, tensorboard: bool = True) -> None:
        self.folder = None
        self.tensorboard = tensorboard
        self._file = None
        self._writer = None
        self._pending: list[str] = []  # debug lines written before the folder exists
        if folder:
            self.open(folder)

    def open(self, folder: str) -> None:
        """Start writing into ``folder`` (created by the caller once the run's input is validated)."""
        self.folder = folder
        self._file = open(os.path.join(folder, "run.log"), "a", encoding="utf-8")
        for line in self._pending:
            self._file.write(line + "\n")
        self._pending.clear()
        if self.tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: only runs with a folder need it
            self._writer = SummaryWriter(os.path.join(folder, "tensorboard"))

    def info(self, line: str) -> None:
        """A line for the console and the log file."""
        print(line, flush=True)
        self.debug(line)

    def debug(self, line: str) -> None:
        """A line for the log file only (per-batch progress)."""
        if self._file:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            self._pending.append(line)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)

    def csv_row(self, row: dict[str, float | int | str]) -> None:
        if not self.folder:
            return
        path = os.path.join(self.folder, "metrics.csv")
        fields = list(row)
        new = not os.path.exists(path)
        with open(path, "a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            if new:
                writer.writeheader()
            writer.writerow(row)

    def close(self) -> None:
        if self._writer:
            self._writer.close()
        if self._file:
            self._file.close()


def warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def summary_table(summaries: list[dict]) -> str:
    """One row per run: stage, trainer, k, test top-1, sparsity (the quick start's closing table)."""
    lines = [f"{'stage':<9} {'trainer':<8} {'k':>6} {'test top-1':>10} {'sparsity':>9}", "-" * 46]
    for s in summaries:
        lines.append(f"{s['stage']:<9} {s['trainer']:<8} {s['k']:>6g} {s['test_top1']:>9.2f}% {100 * s['sparsity']:>8.2f}%")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m trainers.run_log RUN/summary.json ...
    import json

    print(summary_table([json.load(open(path, encoding="utf-8")) for path in sys.argv[1:]]))
