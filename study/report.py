"""One results table (CSV) and plots from every finished run under a results folder.

    python -m study.report RESULT_DIR [--out DIR] [--layers-run RUN_FOLDER]

Rows: one per pretrain run (method ``dense``) and one per prune run, with the newest finetune run
started from it (its top-1 in ``top1_finetune``); a finetune run whose source is not a run in the
folder (a public checkpoint, a dense model) is a row of its own; an IMP (``--trainer lth``) run is a
row per round, at each round's density (its FLOPs only for the last round). ``top1`` is the last stage's test
top-1. The method is the one the run's trainer wrote into summary.json (``method``: its record's label,
``hydra``, ``bip``, ``lth``, or the WoodFisher trainer's ``--prune-method``, woodfisher, globalmagnitude,
magnitude, ...), with ``+obs`` when ``--obs-update`` compensated the mask.

Writes ``results.csv``, ``table.md`` (top-1 mean +- std over seeds per method and density), one plot per
(dataset, arch, layer type): top-1 against the remaining weight ratio on a log axis, one line per
method with the min-max band over seeds and the dense accuracy as a reference line, and a per-layer
sparsity bar chart of one run; then prints the paths.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NoReturn

from configs.errors import UserError, one_line
from engine.files import check_within, safe_name, write_bytes, write_text
from study.runs import Run, link, load_runs, newest

# A per-layer chart of more bars than this is unreadable (and its width grows with them): skipped, with a notice.
MAX_LAYER_BARS = 400

COLUMNS = ("dataset", "arch", "layer_type", "scope", "method", "seed", "k", "sparsity", "params_kept",
           "params_total", "params_ratio", "flops_kept", "flops_total", "flops_ratio", "top1_prune",
           "top1_finetune", "top1", "wall_seconds", "prune_run", "finetune_run")

def method_of(prune: dict[str, Any], finetune: dict[str, Any] | None) -> str:
    """The method of a row: ``dense`` (pretrain), ``finetune`` (a finetune run of an outside source), or the
    ``method`` its prune run's trainer wrote (``trainer_label`` for a summary from before that field),
    with ``+obs`` when ``--obs-update`` compensated the mask."""
    if prune.get("exp_mode") == "pretrain":
        return "dense"
    if prune.get("exp_mode") == "finetune":
        name = "finetune"
    else:
        name = str(prune.get("method") or trainer_label(prune))
    obs = {**(prune.get("obs_update") or {}), **((finetune or {}).get("obs_update") or {})}
    return name + ("+obs" if obs else "")


def trainer_label(summary: dict[str, Any]) -> str:
    """The method of a prune run whose summary predates its ``method`` field: its prune method, else the
    label of its trainer's record (``configs.capabilities``), else the trainer's name."""
    if summary.get("prune_method"):
        return str(summary["prune_method"])
    from trainers import TRAINERS  # only for such summaries: it imports torch

    trainer = str(summary.get("trainer"))
    return TRAINERS[trainer].capabilities.label if trainer in TRAINERS else trainer


def ratio(kept: Any, total: Any) -> float | None:
    return kept / total if isinstance(kept, int) and isinstance(total, int) and total else None


def row_of(first: Run, last: Run | None) -> dict[str, Any]:
    """A table row for a run (``first``) and the newest finetune run started from it (``last``)."""
    s, f = first.summary, (last.summary if last is not None else None)
    end = f or s
    wall = sum(float(x.get("wall_seconds") or 0) for x in (s, f) if x is not None)
    return {"dataset": s.get("dataset"), "arch": s.get("arch"), "layer_type": s.get("layer_type"),
            "scope": s.get("scope"), "method": method_of(s, f), "seed": s.get("seed"), "k": s.get("k"),
            "sparsity": end.get("sparsity"), "params_kept": end.get("params_kept"),
            "params_total": end.get("params_total"),
            "params_ratio": ratio(end.get("params_kept"), end.get("params_total")),
            "flops_kept": end.get("flops_kept"), "flops_total": end.get("flops_total"),
            "flops_ratio": ratio(end.get("flops_kept"), end.get("flops_total")),
            "top1_prune": s.get("test_top1") if s.get("exp_mode") == "prune" else None,
            "top1_finetune": f.get("test_top1") if f is not None else (
                s.get("test_top1") if s.get("exp_mode") == "finetune" else None),
            "top1": end.get("test_top1"), "wall_seconds": round(wall, 3),
            "prune_run": first.folder if s.get("exp_mode") == "prune" else None,
            "finetune_run": last.folder if last is not None else (
                first.folder if s.get("exp_mode") == "finetune" else None)}


def round_rows(run: Run) -> list[dict[str, Any]]:
    """An IMP (lth) run is a result at every round's density: one row per round, its accuracy and
    sparsity read from metrics.csv at the round's last epoch (the last round's row is the run's own)."""
    path = os.path.join(run.folder, "metrics.csv")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            by_epoch = {int(r["epoch"]): r for r in csv.DictReader(fh)}
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot read {path} ({exc}); delete that run folder or rerun it") from None
    rows = []
    rounds = run.summary["imp_rounds"]
    for entry in rounds[:-1]:
        epoch = by_epoch.get(int(entry["end_epoch"]))
        if epoch is None:
            raise UserError(f"{path} lacks epoch {entry['end_epoch']}, the end of IMP round {entry['round']}; "
                            "delete that run folder or rerun it")
        row = row_of(run, None)
        total = row["params_total"]
        # metrics.csv's sparsity is the masks'; the pruned weights are that share of the masked
        # layers' weights (summaries older than masked_params counted masked weights only).
        masked = run.summary.get("masked_params", total)
        kept = (total - round(float(epoch["sparsity"]) * masked)
                if isinstance(total, int) and isinstance(masked, int) else None)
        # Wall time up to this round: the run's, pro rata by epochs (the rounds are equally long).
        share = int(entry["end_epoch"]) / int(rounds[-1]["end_epoch"])
        row.update(wall_seconds=round(float(row["wall_seconds"]) * share, 3))
        row.update(k=entry["density"], sparsity=float(epoch["sparsity"]), top1_prune=float(epoch["test_top1"]),
                   top1=float(epoch["test_top1"]), params_kept=kept, params_ratio=ratio(kept, total),
                   flops_kept=None, flops_ratio=None)
        rows.append(row)
    return rows + [row_of(run, None)]


def collect_rows(runs: list[Run]) -> list[dict[str, Any]]:
    link(runs)
    rows = []
    for run in runs:
        if run.mode == "prune" and run.summary.get("imp_rounds"):
            rows.extend(round_rows(run))
        elif run.mode in ("pretrain", "prune"):
            rows.append(row_of(run, newest([c for c in run.children if c.mode == "finetune"])))
        elif run.mode == "finetune" and (run.parent is None or run.parent.mode == "finetune"):
            rows.append(row_of(run, None))
    return rows


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: ("" if row[key] is None else row[key]) for key in COLUMNS})
    write_text(path, out.getvalue())


def save_figure(fig: Any, path: str) -> None:
    """A matplotlib figure as a PNG, written atomically (``engine.files``): never half a file under its name."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    write_bytes(path, buffer.getvalue())


def group_key(row: dict[str, Any]) -> tuple[str, str, str]:
    return (str(row["dataset"]), str(row["arch"]), str(row["layer_type"]))


def mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def markdown_table(rows: list[dict[str, Any]], *, ks: Sequence[float] | None = None) -> str:
    """Per (dataset, arch, layer type): final top-1 as mean ± std over seeds (n seeds) per method and k.
    ``ks``: only these columns; a method with no run at a column's k (IMP, whose rounds sit at 0.8^r)
    shows its nearest density within 10 %, named in the cell."""
    out = []
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["method"] != "dense" and row["top1"] is not None:
            groups[group_key(row)].append(row)
    dense = dense_top1(rows)
    for key in sorted(groups):
        members = groups[key]
        columns = sorted(ks or {float(r["k"]) for r in members}, reverse=True)
        methods = sorted({str(r["method"]) for r in members})
        ref = dense.get(key[:2])
        out.append(f"**{key[0]}, {key[1]}, {key[2]}**"
                   + (f" (dense: {mean_std(ref)} %)" if ref else "") + "\n")
        out.append("| method | " + " | ".join(f"k = {k:g}" for k in columns) + " |")
        out.append("|---|" + "---|" * len(columns))
        for method in methods:
            cells = []
            own = sorted({float(r["k"]) for r in members if r["method"] == method})
            for k in columns:
                near = min(own, key=lambda d: abs(d - k))
                if near != k and (ks is None or abs(near - k) > 0.1 * k):
                    cells.append("")
                    continue
                vals = [float(r["top1"]) for r in members if r["method"] == method and float(r["k"]) == near]
                cells.append(f"{mean_std(vals)} ({len(vals)})" + (f" at k = {near:.4g}" if near != k else ""))
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def dense_top1(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[float]]:
    dense: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        if row["method"] == "dense" and row["top1"] is not None:
            dense[(str(row["dataset"]), str(row["arch"]))].append(float(row["top1"]))
    return dense


def matplotlib_agg() -> ModuleType:
    """matplotlib on its file-only backend, or a UserError naming the extra that installs it (the report's
    plots are its only use, so it is not a core dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot  # the plots reach it as matplotlib.pyplot
    except ImportError as exc:
        raise UserError(f"the report's plots need matplotlib ({exc.name or 'matplotlib'} cannot be imported): "
                        "pip install 'pruning-trainer[report]'") from None
    return matplotlib


def plot_accuracy(rows: list[dict[str, Any]], out_dir: str) -> list[str]:
    """One PNG per (dataset, arch, layer type): top-1 against the remaining weight ratio."""
    matplotlib = matplotlib_agg()
    plt = matplotlib.pyplot

    dense = dense_top1(rows)
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["method"] != "dense" and row["top1"] is not None and row["params_ratio"] is not None:
            groups[group_key(row)].append(row)
    written = []
    for key in sorted(groups):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for method in sorted({str(r["method"]) for r in groups[key]}):
            by_k: dict[float, list[dict[str, Any]]] = defaultdict(list)
            for r in groups[key]:
                if r["method"] == method:
                    by_k[float(r["k"])].append(r)
            ks = sorted(by_k, reverse=True)
            x = [statistics.mean(float(r["params_ratio"]) for r in by_k[k]) for k in ks]
            acc = [[float(r["top1"]) for r in by_k[k]] for k in ks]
            line, = ax.plot(x, [statistics.mean(a) for a in acc], marker="o", markersize=3, label=method)
            if any(len(a) > 1 for a in acc):
                ax.fill_between(x, [min(a) for a in acc], [max(a) for a in acc], color=line.get_color(), alpha=0.2)
        ref = dense.get(key[:2])
        if ref:
            ax.axhline(statistics.mean(ref), color="black", linestyle="--", linewidth=1,
                       label=f"dense ({statistics.mean(ref):.2f} %)")
        ax.set_xscale("log")
        ax.invert_xaxis()  # sparser to the right, as in the BiP/HYDRA papers' figures
        # Ticks at 1-2-5 steps (100 %, 50 %, 20 %, 10 %, ...): log-axis minor labels would overlap.
        ticks = [m * 10.0 ** e for e in range(-6, 1) for m in (1, 2, 5) if m * 10.0 ** e <= 1]
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{100 * v:.3g}%"))
        ax.set_xlabel("remaining weight ratio (log scale)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"{key[0]}, {key[1]}, {key[2]} (mean over seeds, band: min-max)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        # The name comes from the summaries' data: reduced to a safe character set, it stays in out_dir.
        path = os.path.join(out_dir, "accuracy_" + "_".join(safe_name(part, max_length=60) for part in key) + ".png")
        fig.tight_layout()
        try:
            save_figure(fig, path)
        finally:
            plt.close(fig)
        written.append(path)
    return written


def plot_layers(summary: dict[str, Any], out_dir: str, *, name: str,
                notice: Callable[[str], None] = lambda line: None) -> str | None:
    """Per-layer sparsity bars of one run (its ``layers`` record); none for more than ``MAX_LAYER_BARS``."""
    layers = summary.get("layers") or []
    if not layers:
        return None
    if len(layers) > MAX_LAYER_BARS:
        notice(f"no per-layer chart: the run has {len(layers):,} masked layers, more than {MAX_LAYER_BARS} bars "
               "can show (their counts are in its summary.json and sparsity.txt)")
        return None
    plt = matplotlib_agg().pyplot
    fig, ax = plt.subplots(figsize=(max(6.4, 0.35 * len(layers)), 4.2))
    sparsity = [100 * (1 - r["kept"] / r["params"]) if r["params"] else 0.0 for r in layers]
    ax.bar(range(len(layers)), sparsity)
    ax.set_xticks(range(len(layers)), [r["name"] for r in layers], rotation=90, fontsize=7)
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    overall = summary.get("sparsity")
    ax.set_title(f"per-layer sparsity: {str(summary.get('exp_name'))[:60]}"
                 + (f" (overall {100 * float(overall):.2f} %)" if overall is not None else ""))
    fig.tight_layout()
    path = os.path.join(out_dir, f"layers_{safe_name(name, max_length=120)}.png")
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return path


def layers_run(rows: list[dict[str, Any]], runs: list[Run], chosen: str | None) -> Run | None:
    """The run of the per-layer chart: ``chosen``, or the sparsest final run of the table."""
    by_folder = {os.path.normpath(r.folder): r for r in runs}
    if chosen is not None:
        run = by_folder.get(os.path.normpath(chosen))
        if run is None:
            raise UserError(f"--layers-run {chosen} is not a finished run under the results folder")
        return run
    finals = [r for r in rows if r["method"] != "dense" and (r["finetune_run"] or r["prune_run"])]
    if not finals:
        return None
    best = max(finals, key=lambda r: (float(r["sparsity"] or 0), str(r["finetune_run"] or r["prune_run"])))
    return by_folder.get(os.path.normpath(best["finetune_run"] or best["prune_run"]))


def report(result_dir: str, *, out: str | None = None, layers: str | None = None, ks: Sequence[float] | None = None,
           notice: Callable[[str], None] = lambda line: None) -> list[str]:
    bad = [k for k in ks or () if not 0 < k <= 1]  # NaN fails both comparisons
    if bad:
        raise UserError(f"--ks {bad[0]:g} is not a density in (0, 1]; pass k values of the runs, e.g. --ks 0.1 0.05")
    runs = load_runs(result_dir, notice=notice)
    if not runs:
        raise UserError(f"no finished run of train.py (a folder with its summary.json) under {result_dir}")
    rows = collect_rows(runs)
    matplotlib_agg()  # before anything is written: without it the report stops with one line
    out_dir = out or os.path.join(result_dir, "report")
    if out is None:
        # The default folder lies in the results folder; if it (or a link on its way) points elsewhere,
        # the report would write there: refused before anything is written.
        check_within(os.path.join(out_dir, "table.md"), result_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} exists and is not a folder; pass another --out")
    written = [os.path.join(out_dir, "results.csv"), os.path.join(out_dir, "table.md")]
    write_csv(rows, written[0])
    write_text(written[1], markdown_table(rows, ks=ks) + "\n")
    written += plot_accuracy(rows, out_dir)
    chart_run = layers_run(rows, runs, layers)
    if chart_run is not None:
        path = plot_layers(chart_run.summary, out_dir, name="_".join(chart_run.key), notice=notice)
        if path:
            written.append(path)
    return written


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see python -m study.report --help)")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m study.report", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("result_dir", help="the --result-dir of the runs (searched recursively)")
    parser.add_argument("--out", help="where to write (default RESULT_DIR/report)")
    parser.add_argument("--layers-run", help="run folder of the per-layer sparsity chart (default: the sparsest)")
    parser.add_argument("--ks", type=float, nargs="+", help="columns of table.md: these densities only (IMP shows "
                        "its nearest round within 10 %%, named in the cell); default: every density found")
    try:
        args = parser.parse_args(argv)
        written = report(args.result_dir, out=args.out, layers=args.layers_run, ks=args.ks,
                         notice=lambda line: print(f"notice: {line}", file=sys.stderr))
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write the report ({exc.strerror}: {exc.filename}); pass a writable --out",
              file=sys.stderr)
        return 2
    with open(written[0], encoding="utf-8") as fh:
        n = sum(1 for _ in csv.DictReader(fh))
    print(f"report of {n} rows from {args.result_dir}:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
