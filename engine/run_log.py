"""What a run writes for people: log lines, a metrics CSV, tensorboard scalars, sparsity tables."""
from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

from engine.files import write_text
from layers import LayerSparsity
from pruning.cost import ModelCost


def sparsity_table(rows: Iterable[LayerSparsity], *, cost: ModelCost | None = None) -> str:
    """A per-layer table (layer, type, params, kept, sparsity) with a total row; with ``cost``, two
    more lines: the fraction of zero effective weights among the masked layers and among all weights
    of the model (what the masks removed, counted from the weights)."""
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
    if cost is not None:
        lines.append(f"zero weights: {100 * cost.sparsity_masked:.2f}% of the masked layers' "
                     f"{cost.masked_params:,}, {100 * cost.sparsity_model:.2f}% of all "
                     f"{cost.params_total:,} weights of the model")
    return "\n".join(lines)


class RunLog:
    """Console + ``run.log`` lines, ``metrics.csv`` rows and tensorboard scalars of one run folder."""

    def __init__(self, folder: str | None = None, *, tensorboard: bool = True) -> None:
        self.folder: str | None = None
        self.tensorboard = tensorboard
        self._file: TextIO | None = None
        self._writer: Any = None  # tensorboardX.SummaryWriter
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

    def csv_row(self, row: Mapping[str, float | int | str]) -> None:
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

    def rewrite_csv(self, rows: list[dict[str, Any]]) -> None:
        """Replace metrics.csv with ``rows`` at once (on resume: the checkpoint's history, so that an
        epoch redone after a kill is not listed twice)."""
        fields: list[str] = []
        for row in rows:
            fields += [key for key in row if key not in fields]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\r\n")  # csv's default, as csv_row
        writer.writeheader()
        writer.writerows(rows)
        assert self.folder is not None, "rewrite_csv needs an open run folder"
        write_text(os.path.join(self.folder, "metrics.csv"), out.getvalue() if rows else "")

    def close(self, *, after_error: bool = False) -> None:
        """Close the log and tensorboard files. ``after_error``: a failure to flush them is not
        raised, so that the error that ended the run (e.g. a full disk) is the one reported."""
        for close in (self._writer.close if self._writer else None, self._file.close if self._file else None):
            if close is None:
                continue
            try:
                close()
            except OSError:
                if not after_error:
                    raise
        self._writer = self._file = None


def csv_history(folder: str, last_epoch: int) -> list[dict[str, Any]]:
    """The rows of ``folder``/metrics.csv up to ``last_epoch``, one per epoch (the last one written):
    the history of a checkpoint written before checkpoints stored it."""
    path = os.path.join(folder, "metrics.csv")
    if not os.path.isfile(path):
        return []
    rows: dict[int, dict[str, Any]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if None in row.values() or None in row:
                continue  # a line cut short by the kill (or garbled): the checkpoint does not hold it
            try:
                epoch = int(row["epoch"])
            except (KeyError, ValueError):
                continue
            if epoch <= last_epoch:
                rows[epoch] = {key: _number(value) for key, value in row.items()}
    return [rows[e] for e in sorted(rows)]


def _number(text: str | None) -> Any:
    if text is None:  # a short row (int(None) and float(None) would fail alike)
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return text


def summary_table(summaries: list[dict]) -> str:
    """One row per run: stage, trainer, k, test top-1, sparsity (the quick start's closing table), and
    the PGD test top-1 where a run was evaluated with --val-method adv."""
    adv = any("test_adv_top1" in s for s in summaries)
    # robust sweeps run several methods per stage: the experiment name tells them apart
    width = max((len(s.get("exp_name", "")) for s in summaries), default=0) if adv else 0
    name = (lambda s: f"{s.get('exp_name', ''):<{width}} ") if adv else (lambda s: "")
    head = (f"{'run':<{width}} " if adv else "") + f"{'stage':<9} {'trainer':<8} {'k':>6} {'test top-1':>10}" \
        + (f" {'test PGD':>9}" if adv else "")
    lines = [f"{head} {'sparsity':>9}", "-" * (len(head) + 10)]
    for s in summaries:
        pgd = (f" {s['test_adv_top1']:>8.2f}%" if "test_adv_top1" in s else f" {'-':>9}") if adv else ""
        lines.append(f"{name(s)}{s['stage']:<9} {s['trainer']:<8} {s['k']:>6g} {s['test_top1']:>9.2f}%{pgd} "
                     f"{100 * s['sparsity']:>8.2f}%")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m engine.run_log RUN/summary.json ...
    import json

    print(summary_table([json.load(open(path, encoding="utf-8")) for path in sys.argv[1:]]))


class SilentLog(RunLog):
    """The log of a rank other than 0 in a distributed run: rank 0 alone prints and writes."""

    def open(self, folder: str) -> None:
        self.folder = None

    def info(self, line: str) -> None:
        pass

    def debug(self, line: str) -> None:
        pass

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def csv_row(self, row: Mapping[str, float | int | str]) -> None:
        pass

    def rewrite_csv(self, rows: list[dict[str, Any]]) -> None:
        pass

    def close(self, *, after_error: bool = False) -> None:
        pass
