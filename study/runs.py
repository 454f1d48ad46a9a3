"""Finished runs under a results folder, the prune -> finetune chains they form, and their settings.

A run is finished when its folder holds ``summary.json`` (written last, atomically). A finetune run
belongs to the prune run whose checkpoint it started from: its ``source_net`` lies in that run's
``checkpoint/`` folder. Paths are matched by their last three folders (exp name, mode, run), so a
results folder that was moved or copied elsewhere still links up.

A run's *settings* (``settings``) are everything that shapes what it computes except its seed: its
``config.yml`` (every option, as train.py wrote it when the run started) without the ``BOOKKEEPING``
options, and the setting entries of its summary. Two runs are seeds of one experiment only when their
settings are equal; the results report never pools runs with different settings.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from configs.choices import MODES
from configs.errors import UserError


@dataclass(eq=False)  # a run is itself: identity, not a comparison of whole summaries
class Run:
    folder: str
    summary: dict[str, Any]
    children: list[Run] = field(default_factory=list)  # finetune runs started from this run
    parent: Run | None = None  # the run whose checkpoint this one started from (set by ``link``)
    config: dict[str, Any] | None = None  # its config.yml; None where the folder has none (``read_config``)

    @property
    def key(self) -> tuple[str, ...]:
        return run_key(self.folder)

    @property
    def mode(self) -> str:
        return str(self.summary.get("exp_mode", ""))


def run_key(folder: str) -> tuple[str, ...]:
    """(exp name, mode, run folder name): what identifies a run inside any results folder."""
    parts = os.path.normpath(folder).split(os.sep)
    return tuple(parts[-3:])


def source_key(source_net: str | None) -> tuple[str, ...] | None:
    """The run key of a checkpoint path ``.../EXP/MODE/RUN/checkpoint/FILE``; None for other paths."""
    if not source_net:
        return None
    parts = os.path.normpath(source_net).split(os.sep)
    if len(parts) < 5 or parts[-2] != "checkpoint":
        return None
    return tuple(parts[-5:-2])


def summary_files(root: str) -> Iterator[str]:
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if "summary.json" in files:
            yield os.path.join(folder, "summary.json")


# What every summary.json of train.py holds and a results row needs: a file without them was not written
# by this project (or by a version too old to report on), and is skipped rather than read as a wrong row.
REQUIRED = ("exp_mode", "dataset", "arch", "layer_type", "k", "trainer", "seed", "test_top1")


MAX_SUMMARY_BYTES = 64 * 2**20  # far above any run's (a 1,000-layer model writes ~100 kB)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# The type each entry the report reads must have when present (None allowed where noted): a summary
# with another type was not written by train.py and is skipped, never half-read into a row.
_TEXT = ("exp_mode", "dataset", "arch", "layer_type", "trainer")
_NUMBERS = ("k", "test_top1")
_OPTIONAL_NUMBERS = ("sparsity", "wall_seconds")
_OPTIONAL_COUNTS = ("params_kept", "params_total", "flops_kept", "flops_total", "masked_params")
_OPTIONAL_TEXT = ("source_net", "finished_at", "exp_name", "scope", "method", "prune_method")


def _malformed(summary: dict[str, Any]) -> str | None:
    """Why ``summary``'s entries cannot be reported on, or None."""
    for key in _TEXT:
        if not isinstance(summary[key], str):
            return f"{key} is not a string"
    for key in _NUMBERS:
        if not _number(summary[key]):
            return f"{key} is not a number"
    if not (isinstance(summary["seed"], int) and not isinstance(summary["seed"], bool)):
        return "seed is not an integer"
    for key in _OPTIONAL_NUMBERS:
        if summary.get(key) is not None and not _number(summary[key]):
            return f"{key} is not a number"
    for key in _OPTIONAL_COUNTS:
        if summary.get(key) is not None and not _count(summary[key]):
            return f"{key} is not a count"
    for key in _OPTIONAL_TEXT:
        if summary.get(key) is not None and not isinstance(summary[key], str):
            return f"{key} is not a string"
    layers = summary.get("layers")
    if layers is not None:
        if not isinstance(layers, list):
            return "layers is not a list"
        for row in layers:
            if not (isinstance(row, dict) and isinstance(row.get("name"), str) and _count(row.get("params"))
                    and _count(row.get("kept")) and row["kept"] <= row["params"]):
                return "layers holds an entry that is not {name, params, kept} with kept <= params"
    rounds = summary.get("imp_rounds")
    if rounds is not None and not (isinstance(rounds, list) and rounds and all(
            isinstance(r, dict) and _count(r.get("end_epoch")) and _number(r.get("density")) for r in rounds)):
        return "imp_rounds is not a list of {round, density, end_epoch}"
    return None


def read_summary(path: str) -> dict[str, Any] | str:
    """The summary at ``path``, or why it cannot be reported on."""
    try:
        if os.path.getsize(path) > MAX_SUMMARY_BYTES:
            return f"larger than {MAX_SUMMARY_BYTES // 2**20} MB (no run of train.py writes one so large)"
        with open(path, encoding="utf-8") as fh:
            summary = json.load(fh)
    except (OSError, ValueError) as exc:
        return f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    except RecursionError:
        return "unreadable (nested too deep to be a run summary)"
    if not isinstance(summary, dict):
        return "not a run summary (a JSON object)"
    missing = [key for key in REQUIRED if key not in summary]
    if missing:
        return f"not a summary of this project's train.py (no {', '.join(missing)})"
    if summary["exp_mode"] not in MODES:
        return f"unknown exp_mode {str(summary['exp_mode'])[:40]!r}"
    why = _malformed(summary)
    return f"malformed ({why})" if why else summary


def read_config(folder: str) -> dict[str, Any] | str | None:
    """The options of the run in ``folder`` (its config.yml), None without that file, or why it cannot be read."""
    path = os.path.join(folder, "config.yml")
    if not os.path.isfile(path):
        return None
    try:
        if os.path.getsize(path) > MAX_SUMMARY_BYTES:
            return "too large to be a run's config"
        with open(path, encoding="utf-8") as fh:
            config = yaml.safe_load(fh)
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as exc:
        return f"unreadable ({type(exc).__name__})"
    if not isinstance(config, dict) or not all(isinstance(key, str) for key in config):
        return "not a mapping of options"
    return config


def load_runs(root: str, *, notice: Callable[[str], None] = lambda line: None) -> list[Run]:
    """Every finished run under ``root``, sorted by folder, with its config.yml. A summary that cannot be
    read, or that this project did not write, is skipped with a ``notice`` naming it; a config.yml that
    cannot be read is a notice, and the run's settings are then its summary's only."""
    if not os.path.isdir(root):
        raise UserError(f"{root} is not a folder: pass the --result-dir of the runs to report on")
    runs = []
    for path in summary_files(root):
        summary = read_summary(path)
        if isinstance(summary, str):
            notice(f"skipped {path}: {summary}")
            continue
        folder = os.path.dirname(path)
        config = read_config(folder)
        if isinstance(config, str):
            notice(f"{os.path.join(folder, 'config.yml')}: {config}; the run's settings are read from its "
                   "summary.json only, so it is reported apart from runs whose config.yml was read")
            config = None
        runs.append(Run(folder=folder, summary=summary, config=config))
    return sorted(runs, key=lambda r: r.folder)


# -- settings: what makes two runs the same experiment ---------------------------------------------
# Options of config.yml that do not change what a run computes, and so never tell two runs apart in the
# report: where its files are, how it is executed and logged. Every other option splits (the learning
# rates, schedules, epochs, objective, exclusions, coupling, every trainer option, ...), and so does an
# option this list does not know (a newer train.py's, another project's): a missing entry here can only
# show one experiment as two rows, never pool two experiments as seeds of one.
BOOKKEEPING = (
    # names and paths
    "configs",      # the YAML file the options came from: its values are the options in config.yml
    "result_dir",   # where the run folder was written
    "exp_name",     # the run folder's name (sh/study.sh names each seed's runs apart: ..._s1, ..._s2)
    "resume",       # the checkpoint a resumed run continued from: the same run, continued
    "source_net",   # the path of the checkpoint the run started from (differs for every seed's finetune); when
                    # that checkpoint is a run under the results folder, its settings count ("source:" keys)
    "data_dir",     # where the dataset's files lie (the dataset itself is ``dataset``)
    # execution and logging
    "device",       # cpu, cuda or cuda:N: the same computation on another device
    "num_workers",  # DataLoader processes: the batches are the same
    "test_batch_size",  # evaluation in eval mode: every example's prediction is independent of the batch
    "print_freq", "progress",  # what the run log and terminal show
    "dist_timeout",  # how long torchrun processes wait for each other
    "evaluate",     # evaluation-only runs write no summary.json; listed for completeness
    "save_dense",   # an extra checkpoint file
    "decode",       # GPU or CPU decoding of the same crops and flips (pixels within resampling differences)
    "channels_last", "compile",  # memory format and compilation change float rounding at most
)
# The one option that is not a setting: runs that differ in it alone are seeds of one experiment.
SEED = "seed"
# Summary entries that are settings (the rest are results: accuracies, counts, times, folders). They take
# precedence over config.yml's (the summary's ``layer_type`` of a pretrain run is ``dense``), and are a run's
# only settings where its folder has no readable config.yml.
SUMMARY_SETTINGS = ("exp_mode", "dataset", "arch", "layer_type", "scope", "k", "trainer", "prune_method", "method",
                    "epochs", "objective", "val_method", "flops_target")


def _normal_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with old option names under their current ones and the options it predates at their
    defaults (as a resume reads it), so that a run of an older train.py matches a newer one's defaults."""
    from configs.schema import ALIASES, FIELDS  # no torch: configs imports none

    values = {ALIASES.get(name, name): value for name, value in config.items()}
    for name, f in FIELDS.items():
        values.setdefault(name, f.default)
    return values


def settings(run: Run) -> dict[str, Any]:
    """What shapes ``run`` besides its seed: its config.yml without ``BOOKKEEPING`` (and ``SEED``), and
    its summary's ``SUMMARY_SETTINGS``. Values are JSON data (YAML and JSON scalars, lists, mappings)."""
    own: dict[str, Any] = {}
    if run.config is not None:
        own = {key: value for key, value in _normal_config(run.config).items()
               if key not in BOOKKEEPING and key != SEED}
    own.update({key: run.summary[key] for key in SUMMARY_SETTINGS if key in run.summary})
    return own


def link(runs: list[Run]) -> list[Run]:
    """Attach each run to the run it started from (``children``); returns the roots: runs whose source is
    not a run under the same folder (pretrain runs, and prune/finetune runs of outside checkpoints)."""
    by_key = {r.key: r for r in runs}
    roots = []
    for run in runs:
        parent = by_key.get(source_key(run.summary.get("source_net")) or ())
        if parent is not None and parent is not run:
            parent.children.append(run)
            run.parent = parent
        else:
            roots.append(run)
    return roots


def newest(runs: list[Run]) -> Run | None:
    """The run written last (``finished_at``, then folder name): a rerun of an experiment replaces it."""
    return max(runs, key=lambda r: (str(r.summary.get("finished_at", "")), r.folder), default=None)


def find_finished(root: str, exp_name: str, mode: str) -> str | None:
    """The newest finished run folder of ``root/exp_name/mode``, or None. For launchers that skip the
    runs an interrupted sweep already finished."""
    folder = os.path.join(root, exp_name, mode)
    if not os.path.isdir(folder):
        return None
    found = newest(load_runs(folder))
    return found.folder if found is not None else None


if __name__ == "__main__":  # python -m study.runs ROOT EXP_NAME MODE: print the finished run's folder
    import sys

    if len(sys.argv) != 4:
        print("usage: python -m study.runs RESULT_DIR EXP_NAME MODE", file=sys.stderr)
        raise SystemExit(2)
    done = find_finished(*sys.argv[1:])
    if done is None:
        raise SystemExit(1)
    print(done)
