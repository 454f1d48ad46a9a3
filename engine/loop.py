"""The epoch loop shared by every trainer: schedule, train, evaluate, log, checkpoint.

The checkpoint is the record of a run: it holds the per-epoch rows (``history``) that
metrics.csv shows, and checkpoint.pth.tar is written last in an epoch, so a run killed at any
point resumes from a consistent state and redoes at most the epoch it was in (rewriting the
model_best and CSV rows of that epoch).
"""
from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from engine.checkpoint import rewind_checkpoint, rng_state, save_checkpoint
from engine.distributed import SINGLE, Dist
from engine.evaluate import BASE, Evaluation
from engine.files import deferred_interrupts
from engine.protocols import FitContext, FitHook, Trainer
from engine.run_log import RunLog
from layers import MaskSet, dense_state_dict

if TYPE_CHECKING:  # annotations only
    from data.loaders import Loaders


def seed_everything(seed: int) -> None:
    """The run's seed in every generator it draws from (Python, NumPy, torch)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the global RNG at the start of ``epoch``: an epoch depends only on (seed, epoch)
    and the state it starts from, so a resumed run repeats the uninterrupted one exactly."""
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


@dataclass
class RunState:
    start_epoch: int = 0
    best_prec1: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    source_top1: float | None = None  # val top-1 of the source network before the run's first epoch
    test: dict[str, float] = field(default_factory=dict)  # the final test evaluation (checkpoint.pth.tar's model)


def collapsed(*, before: float | None, after: float, num_classes: int) -> bool:
    """Whether accuracy fell from clearly above chance (3x) to about chance (1.5x) in one epoch: what a
    broken pruning step (e.g. a Newton step that left the quadratic model's region) looks like."""
    chance = 100.0 / num_classes
    return before is not None and before >= 3 * chance and after <= 1.5 * chance


def collapse_warning(*, epoch: int, before: float, after: float, num_classes: int, pruned: bool) -> str:
    cause = (" right after a pruning event: the pruning step broke the network (for OBS methods try a larger "
             "--fisher-damp or a smaller step, e.g. more --recompute-num)" if pruned else
             ": the training diverged or the learning rate is too high (lower --lr / --mask-lr)")
    return (f"WARNING: val top-1 collapsed from {before:.2f}% to {after:.2f}% (chance {100 / num_classes:.1f}%) "
            f"in epoch {epoch}{cause}")


def checkpoint_state(*, epoch: int, arch: str, model: nn.Module, maskset: MaskSet | None, trainer: Trainer,
                     best_prec1: float, config: dict[str, Any],
                     history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    optim = trainer.state_dict()
    return {
        "epoch": epoch,  # epochs completed, as HYDRA/BiP store it
        "arch": arch,
        "state_dict": model.state_dict(),
        "best_prec1": best_prec1,
        "optimizer": optim.get("optimizer"),
        "mask_optimizer": optim.get("mask_optimizer"),
        "trainer_state": optim,
        "masks": maskset.masks() if maskset is not None else None,
        "masks_frozen": bool(maskset.frozen) if maskset is not None else False,
        "config": config,
        "rng": rng_state(),
        "history": list(history or []),  # metrics.csv is rewritten from it on resume
    }


def sparsity_scalars(maskset: MaskSet | None) -> dict[str, float]:
    if maskset is None:
        return {"sparsity/overall": 0.0}
    rows = maskset.report()
    out = {f"sparsity/{r.name}": r.sparsity for r in rows}
    total = sum(r.params for r in rows)
    out["sparsity/overall"] = 1.0 - sum(r.kept for r in rows) / total if total else 0.0
    return out


def lr_names(lrs: dict[str, float]) -> dict[str, float]:
    """Optimizer keys -> the names users know: lr (weights, or HYDRA's scores) and mask_lr (BiP)."""
    return {"mask_lr" if key == "mask_optimizer" else "lr": value for key, value in lrs.items()}


def start_point(*, model: nn.Module, maskset: MaskSet | None, loaders: Loaders, device: torch.device,
                evaluate: Evaluation, group: Dist, hooks: Sequence[FitHook], source: bool,
                notice: Callable[[str], None]) -> float | None:
    """The start of a fresh run, before its folder exists (so that what fails here leaves nothing
    behind): each hook's ``before_fit`` (``--obs-update`` on a source's mask), then, when the run
    starts from a ``source`` network, its val top-1 as a notice; returns that top-1, the reference
    of the first epoch's collapse check (None without a source)."""
    run = FitContext(model=model, maskset=maskset, loaders=loaders, device=device, group=group, log=notice)
    for hook in hooks:
        hook.before_fit(run)
    if not source:
        return None
    start = evaluate(model, loaders.val if loaders.val is not None else loaders.test, device=device)
    notice("source network before the first epoch: "
           + "  ".join(f"val {key} {start[key]:.2f}" for key in ("top1", *evaluate.shown)))
    return start["top1"]


def fit(*, model: nn.Module, maskset: MaskSet | None, trainer: Trainer, loaders: Loaders, device: torch.device,
        epochs: int,
        seed: int, arch: str, config: dict[str, Any], run_dir: str, log: RunLog, state: RunState,
        save_dense: bool, num_classes: int, evaluate: Evaluation = BASE,
        rewind_epoch: int | None = None, group: Dist = SINGLE, hooks: Sequence[FitHook] = ()) -> RunState:
    """Train ``epochs`` epochs from ``state``, then evaluate the model on the test split (``state.test``)
    and call each hook's ``after_fit``. ``rewind_epoch`` R also saves the model after R epochs (0: before
    the first) as ``checkpoint/rewind_epoch_R.pth.tar``, the point a lottery-ticket run rewinds to.
    ``group``: a distributed run's ranks (engine.distributed); only rank 0 writes files."""
    ckpt_dir = os.path.join(run_dir, "checkpoint")
    rewind_path = rewind_checkpoint(ckpt_dir, rewind_epoch) if rewind_epoch is not None else ""
    if rewind_epoch == 0 and state.start_epoch == 0 and group.main:
        with deferred_interrupts():
            save_checkpoint(checkpoint_state(epoch=0, arch=arch, model=model, maskset=maskset, trainer=trainer,
                                             best_prec1=0.0, config=config), rewind_path)
    for epoch in range(state.start_epoch, epochs):
        loaders.set_epoch(epoch)
        # Per rank: random draws inside a step (PGD's random start, smoothing noise, dropout) must be
        # independent across the ranks' slices, not the same numbers for each slice.
        torch.manual_seed(epoch_seed(seed, epoch) + group.rank)
        lrs = lr_names(trainer.set_epoch(epoch))
        t0 = time.perf_counter()
        train = trainer.train_epoch(epoch, loaders)
        group.average_buffers(model)  # BatchNorm statistics of all ranks' slices (equal with SyncBatchNorm)
        notes = trainer.pop_notes()
        for line in notes:
            log.info(line)
        val = evaluate(model, loaders.val if loaders.val is not None else loaders.test, device=device)
        test = evaluate(model, loaders.test, device=device) if loaders.val is not None else val
        seconds = time.perf_counter() - t0
        # Only epochs with the run's final masks compete for model_best (not a gradual pruner's denser early epochs).
        # model_best: the evaluation's metric (top1, or the robust one of --val-method), HYDRA's prec1.
        final = trainer.final_masks(epoch)
        chosen = val[evaluate.metric]
        is_best = final and (chosen > state.best_prec1 or state.best_prec1 == 0.0)
        if final:
            state.best_prec1 = max(state.best_prec1, chosen)
        sparsity = sparsity_scalars(maskset)
        lr_text = "  ".join(f"{k} {v:.4g}" for k, v in lrs.items())
        robust = "".join(f"  | val {key} {val[key]:6.2f}  test {key} {test[key]:6.2f}" for key in evaluate.shown)
        log.info(f"epoch {epoch + 1:>3}/{epochs}  {lr_text}  train loss {train['loss']:.4f} top1 {train['top1']:6.2f}"
                 f"  | val top1 {val['top1']:6.2f}  test top1 {test['top1']:6.2f}{robust}  | sparsity "
                 f"{100 * sparsity['sparsity/overall']:6.2f}%  | {seconds:5.1f}s{'  *best' if is_best else ''}")
        before = state.history[-1]["val_top1"] if state.history else state.source_top1
        fell = collapsed(before=before, after=val["top1"], num_classes=num_classes)
        if fell:  # loud: on the console, in run.log, and on stderr, where a cluster job's errors go
            assert before is not None  # collapsed() needs an accuracy before
            line = collapse_warning(epoch=epoch + 1, before=before, after=val["top1"], num_classes=num_classes,
                                    pruned=bool(notes))
            log.info(line)
            if group.main:
                print(line, file=sys.stderr, flush=True)
        scalars = {**{f"train/{k}": v for k, v in train.items()}, **{f"val/{k}": v for k, v in val.items()},
                   **{f"test/{k}": v for k, v in test.items()}, **sparsity}
        scalars.update({f"lr/{k}": v for k, v in lrs.items()})
        log.scalars(epoch + 1, scalars)
        row = {"epoch": epoch + 1, **lrs,
               **{f"train_{k}": v for k, v in train.items()}, **{f"val_{k}": v for k, v in val.items()},
               **{f"test_{k}": v for k, v in test.items()}, "sparsity": sparsity["sparsity/overall"],
               "seconds": round(seconds, 3), "collapsed": int(fell)}
        log.csv_row(row)
        state.history.append(row)
        if maskset is not None and group.enabled:  # masks() copies every mask: not in a run of one
            group.check_masks(maskset.masks(), epoch=epoch + 1)
        if not group.main:
            continue
        ckpt = checkpoint_state(epoch=epoch + 1, arch=arch, model=model, maskset=maskset, trainer=trainer,
                                best_prec1=state.best_prec1, config=config, history=state.history)
        # checkpoint.pth.tar last: until it is written a resume redoes this epoch and every other file
        # with it, so model_best can never fall behind best_prec1. An interrupt waits for all of them.
        with deferred_interrupts():
            dense = dense_state_dict(model) if save_dense else None
            if rewind_epoch is not None and rewind_epoch == epoch + 1:
                save_checkpoint(ckpt, rewind_path)
            if is_best:
                save_checkpoint(ckpt, os.path.join(ckpt_dir, "model_best.pth.tar"))
                if dense is not None:
                    save_checkpoint(dense, os.path.join(ckpt_dir, "model_best_dense.pth.tar"))
            if dense is not None:
                save_checkpoint(dense, os.path.join(ckpt_dir, "checkpoint_dense.pth.tar"))
            save_checkpoint(ckpt, os.path.join(ckpt_dir, "checkpoint.pth.tar"))
    state.test = evaluate(model, loaders.test, device=device)  # the model of checkpoint.pth.tar
    run = FitContext(model=model, maskset=maskset, loaders=loaders, device=device, group=group, log=log.info,
                     run_dir=run_dir,
                     checkpoint=lambda: checkpoint_state(epoch=epochs, arch=arch, model=model, maskset=maskset,
                                                         trainer=trainer, best_prec1=state.best_prec1, config=config,
                                                         history=state.history))
    for hook in hooks:
        hook.after_fit(run, test_top1=state.test["top1"])
    return state
