"""``--obs-update`` for HYDRA and BiP: when a learned mask becomes fixed, compensate the surviving
weights for the weights it removes, with the OBS solver every trainer shares. ``ObsUpdate`` is the
hook the epoch loop calls (``engine.loop``): a finetune run compensates its source's mask before
the first epoch, a prune run its learned mask after the last (into ``model_obs.pth.tar``).

The weights the mask drops still hold values (HYDRA never changes weights; BiP's lower level only
moves the kept ones, plus weight decay), but the model that was trained is the MASKED one: its
BatchNorm statistics and affine parameters (and BiP's weights) fit the mask, so the model with every
weight back in place is not a trained point, and its gradients are meaningless (measured on Digits:
an OBS step from there takes HYDRA at k = 0.05 from 96 % to chance). The Fisher is therefore taken
at the masked model, with the gradient of every coordinate, masked ones included (what the loss
would do if a removed weight came back); the joint OBS update then moves the survivors so as to
reproduce, to first order per sample, what the removed weights did:
dw_R = -F^-1[R, Q] ([F^-1]_QQ)^-1 w_Q = -F_RR^-1 F_RQ w_Q (a ridge fit over the m gradient rows).

The quadratic model behind it is local, and a learned mask removes most weights at once (95 % at
k = 0.05), far outside it. So the update is scaled by the best of a few factors (0, 1/4, 1/2, 1) by
the loss on the validation split (held out from training and from the Fisher); a dataset without
one uses training samples, which the log says, since those are what the mask was trained on. A
factor of 0 (no compensation) is chosen when every move makes the loss worse.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from configs.options import OBS_UPDATE_SOLVERS, FisherOptions, ObsUpdateOptions
from engine.checkpoint import save_checkpoint
from engine.evaluate import evaluate
from engine.protocols import FitContext
from layers import MaskSet, dense_masks
from layers.masked import MaskedLayer
from pruning.layerwise import PERCDAMP, compensate_sequential
from pruning.methods import OBS_METHOD
from pruning.solver import FisherSettings, OBSSolver

if TYPE_CHECKING:  # annotations only
    from data.loaders import Loaders

OBS_UPDATE_STREAM = 0x5D  # sample stream of the compensation's gradients (epoch 0) and its line search (1)
SCALES = (0.0, 0.25, 0.5, 1.0)
LINE_SEARCH_SAMPLES = 1024


@dataclass(frozen=True)
class Compensation:
    """The record of one compensation, for the run log and summary.json."""

    removed: int          # weights the mask drops that were not already 0
    scale: float          # the factor of the OBS update the line search kept
    judged_on: str        # "validation" or "training" samples
    losses: tuple[float, ...]  # line-search loss at each of SCALES
    test_top1_before: float
    test_top1_after: float
    solve: str            # joint | sum (fisher), exact (layerwise)
    seconds: float
    solver: str = "fisher"  # fisher | layerwise
    how: str = ""           # the solver's settings, for the log line
    steps: int = 1          # Fisher sub-steps
    reconstruction: tuple[float, float] | None = None  # layerwise: mean relative layer error before, after

    def line(self, *, when: str, fisher: FisherSettings | None = None) -> str:
        tried = ", ".join(f"{s:g}: {loss:.4f}" for s, loss in zip(SCALES, self.losses))
        how = self.how
        if not how and fisher is not None:  # a record made without its settings' text
            how = f"m {fisher.m} x {fisher.samples_per_grad} samples, damp {fisher.damp:g}"
        return (f"OBS update ({when}, --obs-update): {self.removed:,} weights removed by the mask; {self.solver} "
                f"solver, {self.solve} solve, {how}; update scale {self.scale:g} kept by the {self.judged_on} loss "
                f"({tried}) in {self.seconds:.2f}s; test top1 {self.test_top1_before:.2f} before, "
                f"{self.test_top1_after:.2f} after")

    def as_dict(self) -> dict:
        out = {"removed": self.removed, "scale": self.scale, "line_search_losses": list(self.losses),
               "line_search_on": self.judged_on,
               "test_top1_before": self.test_top1_before, "test_top1_after": self.test_top1_after,
               "solve": self.solve, "solver": self.solver, "steps": self.steps, "seconds": round(self.seconds, 3)}
        if self.reconstruction is not None:
            out["reconstruction_error"] = {"before": self.reconstruction[0], "after": self.reconstruction[1]}
        return out


@torch.no_grad()
def _loss(model: nn.Module, samples: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    total, n = 0.0, 0
    for x, y in samples:
        total += float(F.cross_entropy(model(x), y, reduction="sum"))
        n += len(y)
    return total / max(n, 1)


def _take(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int,
          device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, held = [], 0
    for x, y in batches:
        out.append((x.to(device), y.to(device)))
        held += len(y)
        if held >= count:
            break
    return out


def _removal_order(layer: MaskedLayer, removed: torch.Tensor, granularity: str) -> torch.Tensor:
    """Rank (0 = first to go) of each coordinate the mask removes, lowest |score| first: per weight, or per
    filter (dim 0) / channel (dim 1) by the mean |score| of the unit for structured masks."""
    scores = layer.popup_scores.detach().abs()
    if granularity in ("filter", "channel"):
        dim = 0 if granularity == "filter" else 1
        other = tuple(d for d in range(scores.dim()) if d != dim)
        unit = scores.mean(dim=other)
        unit_removed = removed.any(dim=other)
        rank = torch.full_like(unit, float("inf"))
        order = torch.argsort(unit.masked_fill(~unit_removed, float("inf")), stable=True)
        rank[order] = torch.arange(len(order), dtype=unit.dtype, device=unit.device)
        shape = [1] * scores.dim()
        shape[dim] = -1
        return rank.view(shape).expand_as(scores).masked_fill(~removed, float("inf"))
    flat = scores.flatten().masked_fill(~removed.flatten(), float("inf"))
    rank = torch.empty_like(flat)
    rank[torch.argsort(flat, stable=True)] = torch.arange(flat.numel(), dtype=flat.dtype, device=flat.device)
    return rank.view_as(scores).masked_fill(~removed, float("inf"))


def _fisher_moves(*, model: nn.Module, maskset: MaskSet, new: dict[str, torch.Tensor], loaders: Loaders,
                  device: torch.device, fisher: FisherSettings, joint: bool, label_smoothing: float,
                  steps: int) -> str:
    """The empirical-Fisher OBS update for the removals of ``new``, in ``steps`` equal steps per layer,
    each with a fresh Fisher taken at the masked model (masks ``new``, the weights moved so far) on the
    next samples of the stream. Leaves the masks at ``new``; returns the solve used (joint | sum)."""
    layers = maskset.layers
    per_step = fisher.m * fisher.samples_per_grad
    batch = min(256, per_step)
    dense = dense_masks(layers)
    removed = {name: dense[name] & ~new[name] for name in layers}
    ranks = {name: _removal_order(layer, removed[name], maskset.granularity) for name, layer in layers.items()}
    units = {name: int(torch.isfinite(r).sum()) if maskset.granularity not in ("filter", "channel")
             else int(torch.isfinite(r).any(dim=tuple(d for d in range(r.dim())
                                                     if d != (0 if maskset.granularity == "filter" else 1))).sum())
             for name, r in ranks.items()}
    alive = dense  # every coordinate alive: the mask's removals are the set Q
    solve = "none"
    for step in range(1, steps + 1):
        maskset.set_masks(new)  # the Fisher at the masked model (the trained point), every column's gradient
        solver = OBSSolver(layers, granularity=maskset.granularity, method=OBS_METHOD,
                           fisher=fisher, device=device, nm=maskset.nm)
        solver.collect(model, loaders.stream(OBS_UPDATE_STREAM, epoch=0, batch_size=batch, skip=(step - 1) * per_step),
                       label_smoothing=label_smoothing, masked_columns=False)
        # after this step: the kept weights and the removals not yet reached (the last step: ``new`` exactly)
        target = {name: new[name] | (ranks[name] >= round(step * units[name] / steps)) & removed[name]
                  for name in layers} if step < steps else new
        maskset.set_masks(alive)
        solve = solver.compensate(target, joint=joint).solve
        solver.release()
        alive = target
    maskset.set_masks(new)
    return solve


def compensate_fixed_mask(*, model: nn.Module, maskset: MaskSet, loaders: Loaders, device: torch.device,
                          fisher: FisherSettings, joint: bool = True, label_smoothing: float = 0.0,
                          test_top1_before: float | None = None, solver: str = "fisher", steps: int = 1,
                          samples: int | None = None, percdamp: float = PERCDAMP) -> Compensation:
    """Fix the mask set's current masks and compensate the weights they remove (see the module docstring).
    ``test_top1_before``: the model's test top-1 at these masks, when the caller has just measured it.
    ``solver``: fisher (the empirical-Fisher OBS update, in ``steps`` steps) or layerwise (layer-wise
    OBS on ``samples`` calibration samples, default m x samples per row, dampened by ``percdamp``)."""
    if solver not in OBS_UPDATE_SOLVERS:
        raise ValueError(f"solver must be one of {OBS_UPDATE_SOLVERS}, got {solver!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t0 = time.perf_counter()
    was_training = model.training
    new = maskset.masks()
    maskset.freeze()
    layers = maskset.layers
    before = test_top1_before if test_top1_before is not None else evaluate(model, loaders.test, device=device)["top1"]
    removed = int(sum(int(((~layer.mask) & (layer.weight != 0)).sum()) for layer in layers.values()))
    start = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    reconstruction = None
    if solver == "fisher":
        solve = _fisher_moves(model=model, maskset=maskset, new=new, loaders=loaders, device=device, fisher=fisher,
                              joint=joint, label_smoothing=label_smoothing, steps=steps)
        how = (f"m {fisher.m} x {fisher.samples_per_grad} samples, damp {fisher.damp:g}"
               + (f", {steps} steps" if steps > 1 else ""))
    else:
        count = samples if samples is not None else fisher.m * fisher.samples_per_grad
        calibration = [x for x, _ in _take(loaders.stream(OBS_UPDATE_STREAM, epoch=0, batch_size=min(256, count)),
                                           count, device)]
        calibration[-1] = calibration[-1][:len(calibration[-1]) - (sum(len(x) for x in calibration) - count)]
        maskset.set_masks(new)
        done = compensate_sequential(model, dict(layers), new, calibration, percdamp=percdamp)
        errors = (sum(done.error_before.values()) / max(len(done.error_before), 1),
                  sum(done.error_after.values()) / max(len(done.error_after), 1))
        reconstruction = (round(errors[0], 6), round(errors[1], 6))
        solve = "exact"
        how = (f"{done.samples} calibration samples, percdamp {percdamp:g}, relative layer error "
               f"{errors[0]:.4f} -> {errors[1]:.4f} (mean over {done.layers} layers)")
    moved = {name: layer.weight.detach() - start[name] * layer.mask for name, layer in layers.items()}
    if loaders.val is not None:
        judged_on, held_out = "validation", _take(loaders.val, LINE_SEARCH_SAMPLES, device)
    else:
        judged_on = "training"
        held_out = _take(loaders.stream(OBS_UPDATE_STREAM, epoch=1, batch_size=256), LINE_SEARCH_SAMPLES, device)
    losses = []
    with torch.no_grad():
        for scale in SCALES:
            for name, layer in layers.items():
                layer.weight.copy_(start[name] * layer.mask + scale * moved[name])
            losses.append(_loss(model, held_out))
        best = SCALES[min(range(len(SCALES)), key=lambda i: losses[i])]
        for name, layer in layers.items():
            layer.weight.copy_(start[name] * layer.mask + best * moved[name])
    after = evaluate(model, loaders.test, device=device)["top1"]
    model.train(was_training)
    return Compensation(removed=removed, scale=best, judged_on=judged_on, losses=tuple(losses), test_top1_before=before,
                        test_top1_after=after, solve=solve, seconds=time.perf_counter() - t0, solver=solver, how=how,
                        steps=steps if solver == "fisher" else 1, reconstruction=reconstruction)


class ObsUpdate:
    """``--obs-update`` as a hook of the epoch loop (``engine.protocols.FitHook``): in a finetune run the
    source's mask is compensated before the first epoch; in a prune run the learned mask after the last,
    written to ``checkpoint/model_obs.pth.tar`` (the run's own checkpoints keep the uncompensated
    model). A resumed finetune run is not compensated again: its checkpoint holds the compensated weights."""

    def __init__(self, *, mode: str, fisher: FisherSettings, joint: bool = True, label_smoothing: float = 0.0,
                 update: ObsUpdateOptions | None = None) -> None:
        self.mode = mode
        self.fisher = fisher
        self.joint = joint
        self.label_smoothing = label_smoothing
        self.update = update if update is not None else ObsUpdateOptions(obs_update=True)
        self.records: dict[str, dict] = {}  # summary.json's "obs_update": what each compensation did

    @classmethod
    def of(cls, options: FisherOptions, *, mode: str, label_smoothing: float,
           update: ObsUpdateOptions | None = None) -> ObsUpdate:
        """From the run's Fisher options (the WoodFisher trainer's flags; lambda defaults to the OBS method's)
        and its --obs-update options (``update``; default: the Fisher solver in one step)."""
        fisher = FisherSettings.of(options, damp=OBS_METHOD.damp(options.fisher_damp))
        return cls(mode=mode, fisher=fisher, joint=options.obs_solve == "joint", label_smoothing=label_smoothing,
                   update=update)

    def _compensate(self, run: FitContext, test_top1_before: float | None = None) -> Compensation:
        assert run.maskset is not None  # prune and finetune runs have masked layers
        done = compensate_fixed_mask(model=run.model, maskset=run.maskset, loaders=run.loaders, device=run.device,
                                     fisher=self.fisher, joint=self.joint, label_smoothing=self.label_smoothing,
                                     test_top1_before=test_top1_before, solver=self.update.obs_update_solver,
                                     steps=self.update.obs_update_steps, samples=self.update.obs_update_samples,
                                     percdamp=self.update.obs_update_percdamp)
        run.group.broadcast_state(run.model)  # every rank solved the same system; rank 0's result, bit for bit
        return done

    def before_fit(self, run: FitContext) -> None:
        if self.mode != "finetune":
            return
        done = self._compensate(run)
        run.log(done.line(when="the source's mask, before fine-tuning", fisher=self.fisher))
        self.records["finetune_start"] = done.as_dict()

    def after_fit(self, run: FitContext, *, test_top1: float) -> None:
        if self.mode != "prune":
            return
        done = self._compensate(run, test_top1_before=test_top1)  # measured by the loop, same masks
        assert run.checkpoint is not None and run.run_dir is not None  # after the epochs the folder exists
        path = os.path.join(run.run_dir, "checkpoint", "model_obs.pth.tar")
        ckpt = {**run.checkpoint(), "obs_update": done.as_dict()}
        if run.group.main:
            save_checkpoint(ckpt, path)
        run.log(done.line(when="the learned mask, at the end of pruning", fisher=self.fisher)
                + f"; written to {path} (pass it to --source-net to fine-tune)")
        self.records["prune_end"] = {**done.as_dict(), "checkpoint": path}

    def summary_fields(self) -> dict[str, Any]:
        return {"obs_update": self.records} if self.records else {}
