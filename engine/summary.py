"""What a run reports at its end: the last log lines and ``summary.json``, one row of a results table;
and the report of ``--evaluate``, which writes nothing."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from configs.schema import Config
from data.loaders import Loaders
from engine.distributed import Dist
from engine.evaluate import Evaluation
from engine.files import write_text
from engine.loop import RunState
from engine.run_log import RunLog, sparsity_table
from layers import MaskSet
from pruning.cost import ModelCost, model_cost


def header(cfg: Config, *, masked: bool, device: torch.device, group: Dist, resumed_after: int | None) -> str:
    """The run log's line that says what runs: mode, model, data, trainer, masks, epochs, device, processes."""
    layer_type = cfg.layer_type + (f" {cfg.nm}" if cfg.layer_type == "nm" else "") if masked else "dense"
    processes = f" x {group.world} processes ({group.backend})" if group.enabled else ""
    return (f"{cfg.exp_mode} {cfg.arch} on {cfg.dataset} with trainer {cfg.trainer}, layer type {layer_type}, "
            f"k {cfg.k:g} ({cfg.scope}), {cfg.epochs} epochs, device {device}{processes}"
            + (f", resuming after epoch {resumed_after}" if resumed_after is not None else ""))


def run_summary(cfg: Config, *, run_dir: str, masked: bool, state: RunState, density: float, wall_seconds: float,
                evaluation: Evaluation) -> dict[str, Any]:
    """summary.json's general entries. ``wall_seconds`` is this invocation; ``train_seconds`` sums the
    epochs of the whole run, across resumes. Every metric of the final test evaluation is a
    ``test_<key>``; ``best_val_<metric>`` is the best validation value of the metric that chose
    model_best (``model_best_by``). The trainer adds its own (``method``, ...)."""
    return {"stage": cfg.exp_mode, "exp_name": cfg.exp_name, "exp_mode": cfg.exp_mode, "dataset": cfg.dataset,
            "arch": cfg.arch, "layer_type": cfg.layer_type if masked else "dense", "scope": cfg.scope, "k": cfg.k,
            "trainer": cfg.trainer, "prune_method": None,  # a trainer with prune methods sets it
            "seed": cfg.seed, "epochs": cfg.epochs,
            "source_net": os.path.abspath(cfg.source_net) if cfg.source_net else None,
            "objective": cfg.objective, "val_method": cfg.val_method,
            **{f"test_{key}": value for key, value in state.test.items() if key != "certified"},
            f"best_val_{evaluation.metric}": state.best_prec1, "model_best_by": f"val_{evaluation.metric}",
            "sparsity": 1 - density, "run_dir": run_dir, "wall_seconds": round(wall_seconds, 3),
            "collapsed_epochs": [row["epoch"] for row in state.history if row.get("collapsed")],
            "train_seconds": round(sum(float(row.get("seconds") or 0) for row in state.history), 3)}


def write_summary(run_dir: str, summary: dict[str, Any], maskset: MaskSet | None, *,
                  cost: ModelCost | None = None) -> None:
    """summary.json (and sparsity.txt), each written atomically: a reader never sees half a file. The
    summary gets the per-layer kept counts (``layers``) and the time it was written (``finished_at``, UTC),
    which the results report uses to pick the newest of several runs of one experiment."""
    rows = maskset.report() if maskset is not None else []
    summary = {**summary, "layers": [{"name": r.name, "type": r.kind, "params": r.params, "kept": r.kept}
                                     for r in rows],
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_text(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    if maskset is not None:
        write_text(os.path.join(run_dir, "sparsity.txt"), sparsity_table(rows, cost=cost) + "\n")


def finish(cfg: Config, *, run_dir: str, model: nn.Module, maskset: MaskSet | None, state: RunState,
           evaluation: Evaluation, example: torch.Tensor, group: Dist, log: RunLog, wall_seconds: float,
           extra: Mapping[str, Any]) -> None:
    """The end of a run: the per-layer sparsity, the result line, a collapse warning, the weights and
    FLOPs kept (for one ``example`` input), and, on rank 0, summary.json with the trainer's and the
    hooks' fields (``extra``)."""
    density = maskset.density() if maskset is not None else 1.0
    cost = model_cost(model, example=example)
    if maskset is not None:
        log.info("per-layer sparsity:\n" + sparsity_table(maskset.report(), cost=cost))
    final = state.test
    robust = "".join(f"  test {key} {final[key]:.2f}" for key in evaluation.shown)
    log.info(f"done: {cfg.exp_mode} k {cfg.k:g}  test top1 {final['top1']:.2f}{robust}  best val {evaluation.metric} "
             f"{state.best_prec1:.2f}  sparsity {100 * cost.sparsity_masked:.2f}% masked layers, "
             f"{100 * cost.sparsity_model:.2f}% model  checkpoints in "
             f"{os.path.join(run_dir, 'checkpoint')}")
    fallen = [row["epoch"] for row in state.history if row.get("collapsed")]
    if fallen:
        log.info(f"WARNING: accuracy collapsed to about chance in epoch(s) {', '.join(map(str, fallen))} "
                 "(see the warnings above); this run's results are not a fair measure of the method")
    log.info(cost.line())
    if group.main:
        summary = run_summary(cfg, run_dir=run_dir, masked=maskset is not None, state=state, density=density,
                              wall_seconds=wall_seconds, evaluation=evaluation)
        write_summary(run_dir, {**summary, **cost.as_dict(), **extra}, maskset, cost=cost)


def evaluation_report(*, model: nn.Module, maskset: MaskSet | None, loaders: Loaders, evaluation: Evaluation,
                      device: torch.device, example: torch.Tensor) -> list[str]:
    """``--evaluate``: the metrics of every split, the per-layer sparsity and the weights and FLOPs kept."""
    lines = []
    for split, loader in (("val", loaders.val), ("test", loaders.test)):
        if loader is not None:
            metrics = evaluation(model, loader, device=device)
            lines.append(f"{split}: " + "  ".join(f"{key} {value:.4f}" if "loss" in key else f"{key} {value:.2f}"
                                                  for key, value in metrics.items()))
    cost = model_cost(model, example=example)
    if maskset is not None:
        lines.append(sparsity_table(maskset.report(), cost=cost))
    lines.append(cost.line())
    return lines
