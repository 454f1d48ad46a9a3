"""One results table (CSV) and plots from every finished run under a results folder.

    python -m study.report RESULT_DIR [--out DIR] [--layers-run RUN_FOLDER]

Rows: one per pretrain run (method ``dense``) and one per prune run, with the newest finetune run
started from it (its top-1 in ``top1_finetune``); a finetune run whose source is not a run in the
folder (a public checkpoint, a dense model) is a row of its own; an IMP (``--trainer lth``) run is a
row per round, at each round's density (its FLOPs only for the last round). ``top1`` is the last stage's test
top-1. The method is the one the run's trainer wrote into summary.json (``method``: its record's label,
``hydra``, ``bip``, ``lth``, or the WoodFisher trainer's ``--prune-method``, woodfisher, globalmagnitude,
magnitude, ...), with ``+obs`` when ``--obs-update`` compensated the mask.

Only seeds are pooled: a row's ``setting`` names everything that shaped it except the seeds (its runs'
settings, ``study.runs.settings``: config.yml without bookkeeping options, for the source run in the folder,
the prune run and the finetune run). Runs of one method with different settings are separate lines of the
table and the plots, named by what differs (``woodfisher (prune_freq=2)``); a second row of the same setting
and the same seeds is not another seed: the newest one counts, the other is marked ``duplicate_of`` in
results.csv and named in a notice. A ``--flops-target`` run is reported at the density it reached (1 -
its sparsity), not at its ``--k``.

Writes ``results.csv``, ``table.md`` (top-1 mean +- std over seeds per method, setting and density), one plot
per (dataset, arch, layer type): top-1 against the remaining weight ratio on a log axis, one line per
method and setting with the min-max band over seeds and the dense accuracy as a reference line, and a
per-layer sparsity bar chart of one run; then prints the paths.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NoReturn

from configs.errors import UserError, one_line
from engine.files import check_within, safe_name, write_bytes, write_text
from study.runs import SEED, Run, link, load_runs, newest, settings

# A per-layer chart of more bars than this is unreadable (and its width grows with them): skipped, with a notice.
MAX_LAYER_BARS = 400

COLUMNS = ("dataset", "arch", "layer_type", "scope", "method", "setting", "seed", "k", "flops_target", "sparsity",
           "params_kept", "params_total", "params_ratio", "flops_kept", "flops_total", "flops_ratio", "top1_prune",
           "top1_finetune", "top1", "wall_seconds", "prune_run", "finetune_run", "duplicate_of")
# Stages of a row's chain, as prefixes of its setting keys: the prune (or pretrain) run's own keys have none.
SOURCE, FINETUNE = "source:", "finetune:"

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


def chain_settings(first: Run, last: Run | None) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """What shaped a row besides its seeds, and those seeds: the settings of ``first`` (no prefix), of the
    runs it started from under the results folder (``source:``, ``source:source:``, ...) and of the finetune
    run ``last`` (``finetune:``, without its ``k`` where it is ``first``'s); the seeds in that chain's order."""
    own, seeds = dict(settings(first)), [first.summary.get(SEED)]
    prefix, parent, seen = SOURCE, first.parent, {id(first)}
    while parent is not None and id(parent) not in seen:  # a chain of copied folders may loop: stop there
        seen.add(id(parent))
        own.update({prefix + key: value for key, value in settings(parent).items()})
        seeds.insert(0, parent.summary.get(SEED))
        prefix, parent = SOURCE + prefix, parent.parent
    if last is not None:
        tail = settings(last)
        if tail.get("k") == own.get("k"):
            tail.pop("k", None)
        own.update({FINETUNE + key: value for key, value in tail.items()})
        seeds.append(last.summary.get(SEED))
    return own, tuple(seeds)


def setting_id(row_settings: dict[str, Any]) -> str:
    """A short name of a setting (without its ``k``, the table's column): equal settings, equal names."""
    text = json.dumps({key: value for key, value in row_settings.items() if key != "k"}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def row_of(first: Run, last: Run | None) -> dict[str, Any]:
    """A table row for a run (``first``) and the newest finetune run started from it (``last``). Its
    ``setting`` is ``setting_id`` of ``chain_settings``; keys starting with ``_`` are the report's own and
    not written to results.csv. A ``--flops-target`` run's ``k`` is the density it reached."""
    s, f = first.summary, (last.summary if last is not None else None)
    end = f or s
    wall = sum(float(x.get("wall_seconds") or 0) for x in (s, f) if x is not None)
    chain, seeds = chain_settings(first, last)
    flops_target = chain.get("flops_target")
    k = s.get("k")
    if flops_target is not None and isinstance(end.get("sparsity"), (int, float)):
        k = round(1 - float(end["sparsity"]), 6)  # the kept fraction: its --k (default 1) is not its density
    final = last or first
    return {"dataset": s.get("dataset"), "arch": s.get("arch"), "layer_type": s.get("layer_type"),
            "scope": s.get("scope"), "method": method_of(s, f), "setting": setting_id(chain), "seed": s.get("seed"),
            "k": k, "flops_target": flops_target, "duplicate_of": None,
            "_settings": {key: value for key, value in chain.items() if key != "k"}, "_seeds": seeds,
            "_cell": ("flops", flops_target) if flops_target is not None else k,
            "_folder": final.folder, "_newest": (str(final.summary.get("finished_at", "")), final.folder),
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
        row.update(k=entry["density"], _cell=entry["density"], sparsity=float(epoch["sparsity"]),
                   top1_prune=float(epoch["test_top1"]),
                   top1=float(epoch["test_top1"]), params_kept=kept, params_ratio=ratio(kept, total),
                   flops_kept=None, flops_ratio=None)
        rows.append(row)
    return rows + [row_of(run, None)]


def collect_rows(runs: list[Run], *, notice: Callable[[str], None] = lambda line: None) -> list[dict[str, Any]]:
    """Every row of the report (``row_of``, ``round_rows``), duplicates marked (``mark_duplicates``)."""
    link(runs)
    rows = []
    for run in runs:
        if run.mode == "prune" and run.summary.get("imp_rounds"):
            rows.extend(round_rows(run))
        elif run.mode in ("pretrain", "prune"):
            rows.append(row_of(run, newest([c for c in run.children if c.mode == "finetune"])))
        elif run.mode == "finetune" and (run.parent is None or run.parent.mode == "finetune"):
            rows.append(row_of(run, None))
    mark_duplicates(rows, notice=notice)
    return rows


def mark_duplicates(rows: list[dict[str, Any]], *, notice: Callable[[str], None] = lambda line: None) -> None:
    """Rows of one setting, density and seeds are one result, not several seeds: the newest (its last run's
    ``finished_at``, then folder) counts; each other gets ``duplicate_of`` (the counted row's run folder),
    and a notice names both runs once."""
    same: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        same[(row["setting"], row["_cell"], json.dumps(row["_seeds"], default=str))].append(row)
    said = set()
    for group in same.values():
        if len(group) < 2:
            continue
        kept = max(group, key=lambda r: r["_newest"])
        for row in group:
            if row is not kept:
                row["duplicate_of"] = kept["_folder"]
                if (row["_folder"], kept["_folder"]) not in said:
                    said.add((row["_folder"], kept["_folder"]))
                    notice(f"{row['_folder']} repeats the setting and seed {row['seed']} of {kept['_folder']}: the "
                           "newer one is reported, this one is not counted as another seed (duplicate_of in "
                           "results.csv)")


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


def counted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows a mean over seeds counts: results with a top-1, not a duplicate of another row."""
    return [r for r in rows if r["top1"] is not None and r["duplicate_of"] is None]


# At most this many differing settings name a line (then "+N more"); the setting id tells lines apart anyway.
MAX_NAMED_SETTINGS = 4


def _value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 40 else text[:39] + "…"


def _stage(key: str) -> str:
    return key.rsplit(":", 1)[0] if ":" in key else ""


def _differences(variants: list[dict[str, Any]]) -> list[list[str]]:
    """Per setting of ``variants`` (dicts of setting keys): the ``key=value`` parts that tell it from the
    others. A stage (``finetune``, ``source``) that some settings lack is one part (``no finetune run``)
    rather than a part per key; a key a setting lacks in a stage it has reads ``?`` (a run without config.yml)."""
    parts: list[list[str]] = [[] for _ in variants]
    keys = sorted({key for v in variants for key in v}, key=lambda key: (key.count(":"), _stage(key), key))
    stages = {_stage(key) for key in keys} - {""}
    has = {stage: [any(_stage(key) == stage for key in v) for v in variants] for stage in stages}
    for stage in sorted(stages):
        if not all(has[stage]):
            for i, present in enumerate(has[stage]):
                parts[i].append(f"with {stage} run" if present else f"no {stage} run")
    missing = object()
    for key in keys:
        stage = _stage(key)
        among = [i for i, v in enumerate(variants) if not stage or has[stage][i]]
        values = [variants[i].get(key, missing) for i in among]
        if all(value == values[0] for value in values[1:]):  # the same for all that have the stage
            continue
        for i, value in zip(among, values, strict=True):
            parts[i].append(f"{key}={'?' if value is missing else _value(value)}")
    return parts


def variant_names(rows: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """A name per (method, setting) of ``rows`` (one table, one plot): the method where it has one setting,
    else the method and what tells its setting from the method's others, e.g. ``woodfisher (prune_freq=2)``.
    A FLOPs-target setting always names its target."""
    by_method: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        by_method[str(row["method"])][str(row["setting"])] = row["_settings"]
    names: dict[tuple[str, str], str] = {}
    for method, variants in by_method.items():
        ids = sorted(variants)
        parts = _differences([variants[i] for i in ids]) if len(ids) > 1 else [[]]
        for sid, own in zip(ids, parts, strict=True):
            target = variants[sid].get("flops_target")
            if target is not None and not any(p.startswith("flops_target=") for p in own):
                own = [f"flops_target={_value(target)}", *own]
            if len(own) > MAX_NAMED_SETTINGS:
                own = [*own[:MAX_NAMED_SETTINGS], f"+{len(own) - MAX_NAMED_SETTINGS} more"]
            names[(method, sid)] = f"{method} ({', '.join(own)})" if own else method
        taken = defaultdict(list)
        for sid in ids:
            taken[names[(method, sid)]].append(sid)
        for name, sids in taken.items():
            if len(sids) > 1:  # told apart only past MAX_NAMED_SETTINGS: the setting id as well
                for sid in sids:
                    names[(method, sid)] = f"{name} [{sid}]"
    return names


def lines_of(members: list[dict[str, Any]]) -> dict[str, dict[float, list[dict[str, Any]]]]:
    """``members`` (one table's counted rows) by line (``variant_names``), then by density: a line's rows at
    one density are seeds of one setting. A FLOPs-target setting's rows sit at their mean reached density."""
    names = variant_names(members)
    cells: dict[str, dict[Any, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in members:
        cells[names[(str(row["method"]), str(row["setting"]))]][row["_cell"]].append(row)
    lines: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for name, by_cell in cells.items():
        lines[name] = {}
        for cell, group in by_cell.items():
            density = float(cell) if not isinstance(cell, tuple) else \
                round(statistics.mean(float(r["k"]) for r in group), 4)
            lines[name].setdefault(density, []).extend(group)
    return lines


def markdown_table(rows: list[dict[str, Any]], *, ks: Sequence[float] | None = None) -> str:
    """Per (dataset, arch, layer type): final top-1 as mean ± std over seeds (n seeds) per method, setting
    (``variant_names``) and k. ``ks``: only these columns; a line with no run at a column's k (IMP, whose
    rounds sit at 0.8^r; a FLOPs target's reached density) shows its nearest density within 10 %, named in
    the cell."""
    out = []
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in counted(rows):
        if row["method"] != "dense":
            groups[group_key(row)].append(row)
    dense = dense_top1(rows)
    for key in sorted(groups):
        lines = lines_of(groups[key])
        columns = sorted(ks or {k for cells in lines.values() for k in cells}, reverse=True)
        out.append(f"**{key[0]}, {key[1]}, {key[2]}**" + dense_note(dense.get(key[:2], {})) + "\n")
        out.append("| method | " + " | ".join(f"k = {k:g}" for k in columns) + " |")
        out.append("|---|" + "---|" * len(columns))
        for name in sorted(lines):
            cells = []
            own = sorted(lines[name])
            for k in columns:
                near = min(own, key=lambda d: abs(d - k))
                if near != k and (ks is None or abs(near - k) > 0.1 * k):
                    cells.append("")
                    continue
                vals = [float(r["top1"]) for r in lines[name][near]]
                cells.append(f"{mean_std(vals)} ({len(vals)})" + (f" at k = {near:.4g}" if near != k else ""))
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def dense_note(ref: dict[str, list[float]]) -> str:
    """The dense reference of a table's heading: ``(dense: 98.00 %)``, or one entry per dense setting."""
    if not ref:
        return ""
    if len(ref) == 1:
        return f" (dense: {mean_std(next(iter(ref.values())))} %)"
    return " (" + "; ".join(f"{name}: {mean_std(v)} ({len(v)}) %" for name, v in sorted(ref.items())) + ")"


def dense_top1(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, list[float]]]:
    """The dense top-1s per (dataset, arch), by dense setting (``variant_names``: ``dense`` where one)."""
    by_model: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in counted(rows):
        if row["method"] == "dense":
            by_model[(str(row["dataset"]), str(row["arch"]))].append(row)
    dense: dict[tuple[str, str], dict[str, list[float]]] = {}
    for model, members in by_model.items():
        names = variant_names(members)
        dense[model] = defaultdict(list)
        for row in members:
            dense[model][names[(str(row["method"]), str(row["setting"]))]].append(float(row["top1"]))
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
    """One PNG per (dataset, arch, layer type): top-1 against the remaining weight ratio, a line per method
    and setting (``lines_of``: the band is over seeds of that one setting)."""
    matplotlib = matplotlib_agg()
    plt = matplotlib.pyplot

    dense = dense_top1(rows)
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in counted(rows):
        if row["method"] != "dense" and row["params_ratio"] is not None:
            groups[group_key(row)].append(row)
    written = []
    for key in sorted(groups):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        lines = lines_of(groups[key])
        for name in sorted(lines):
            ks = sorted(lines[name], reverse=True)
            x = [statistics.mean(float(r["params_ratio"]) for r in lines[name][k]) for k in ks]
            acc = [[float(r["top1"]) for r in lines[name][k]] for k in ks]
            line, = ax.plot(x, [statistics.mean(a) for a in acc], marker="o", markersize=3, label=name)
            if any(len(a) > 1 for a in acc):
                ax.fill_between(x, [min(a) for a in acc], [max(a) for a in acc], color=line.get_color(), alpha=0.2)
        for i, (name, ref) in enumerate(sorted(dense.get(key[:2], {}).items())):
            ax.axhline(statistics.mean(ref), color="black", linestyle=("--", ":", "-.")[i % 3], linewidth=1,
                       label=f"{name} ({statistics.mean(ref):.2f} %)")
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
    finals = [r for r in counted(rows) if r["method"] != "dense" and (r["finetune_run"] or r["prune_run"])]
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
    rows = collect_rows(runs, notice=notice)
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
