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

from configs.options import FisherOptions
from engine.checkpoint import save_checkpoint
from engine.evaluate import evaluate
from engine.protocols import FitContext
from layers import MaskSet, dense_masks
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
    solve: str            # joint | sum
    seconds: float

    def line(self, *, when: str, fisher: FisherSettings) -> str:
        tried = ", ".join(f"{s:g}: {loss:.4f}" for s, loss in zip(SCALES, self.losses))
        return (f"OBS update ({when}, --obs-update): {self.removed:,} weights removed by the mask; {self.solve} "
                f"solve, m {fisher.m} x {fisher.samples_per_grad} samples, damp {fisher.damp:g}; update scale "
                f"{self.scale:g} kept by the {self.judged_on} loss ({tried}) in {self.seconds:.2f}s; test top1 "
                f"{self.test_top1_before:.2f} before, {self.test_top1_after:.2f} after")

    def as_dict(self) -> dict:
        return {"removed": self.removed, "scale": self.scale, "line_search_losses": list(self.losses),
                "line_search_on": self.judged_on,
                "test_top1_before": self.test_top1_before, "test_top1_after": self.test_top1_after,
                "solve": self.solve, "seconds": round(self.seconds, 3)}


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


def compensate_fixed_mask(*, model: nn.Module, maskset: MaskSet, loaders: Loaders, device: torch.device,
                          fisher: FisherSettings, joint: bool = True, label_smoothing: float = 0.0,
                          test_top1_before: float | None = None) -> Compensation:
    """Fix the mask set's current masks and compensate the weights they remove (see the module docstring).
    ``test_top1_before``: the model's test top-1 at these masks, when the caller has just measured it."""
    t0 = time.perf_counter()
    was_training = model.training
    new = maskset.masks()
    maskset.freeze()
    layers = maskset.layers
    before = test_top1_before if test_top1_before is not None else evaluate(model, loaders.test, device=device)["top1"]
    removed = int(sum(int(((~layer.mask) & (layer.weight != 0)).sum()) for layer in layers.values()))
    solver = OBSSolver(layers, granularity=maskset.granularity, method=OBS_METHOD,
                       fisher=fisher, device=device, nm=maskset.nm)
    batch = min(256, fisher.m * fisher.samples_per_grad)
    solver.collect(model, loaders.stream(OBS_UPDATE_STREAM, epoch=0, batch_size=batch),
                   label_smoothing=label_smoothing, masked_columns=False)  # at the masked model
    start = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    maskset.set_masks(dense_masks(layers))  # every coordinate alive: the mask's removals are the set Q
    record = solver.compensate(new, joint=joint)
    solver.release()
    maskset.set_masks(new)
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
                        test_top1_after=after, solve=record.solve, seconds=time.perf_counter() - t0)


class ObsUpdate:
    """``--obs-update`` as a hook of the epoch loop (``engine.protocols.FitHook``): in a finetune run the
    source's mask is compensated before the first epoch; in a prune run the learned mask after the last,
    written to ``checkpoint/model_obs.pth.tar`` (the run's own checkpoints keep the uncompensated
    model). A resumed finetune run is not compensated again: its checkpoint holds the compensated weights."""

    def __init__(self, *, mode: str, fisher: FisherSettings, joint: bool = True, label_smoothing: float = 0.0) -> None:
        self.mode = mode
        self.fisher = fisher
        self.joint = joint
        self.label_smoothing = label_smoothing
        self.records: dict[str, dict] = {}  # summary.json's "obs_update": what each compensation did

    @classmethod
    def of(cls, options: FisherOptions, *, mode: str, label_smoothing: float) -> ObsUpdate:
        """From the run's Fisher options (the WoodFisher trainer's flags; lambda defaults to the OBS method's)."""
        fisher = FisherSettings.of(options, damp=OBS_METHOD.damp(options.fisher_damp))
        return cls(mode=mode, fisher=fisher, joint=options.obs_solve == "joint", label_smoothing=label_smoothing)

    def _compensate(self, run: FitContext, test_top1_before: float | None = None) -> Compensation:
        assert run.maskset is not None  # prune and finetune runs have masked layers
        done = compensate_fixed_mask(model=run.model, maskset=run.maskset, loaders=run.loaders, device=run.device,
                                     fisher=self.fisher, joint=self.joint, label_smoothing=self.label_smoothing,
                                     test_top1_before=test_top1_before)
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
