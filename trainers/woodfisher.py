"""WoodFisher: gradual second-order (OBS) pruning of a trained network (Singh & Alistarh, NeurIPS 2020).

``--trainer woodfisher`` trains the weights (every parameter but the scores, which are unused and
frozen) and, at each pruning epoch of the schedule, before that epoch's training, runs a pruning
event:

1. collect m = ``fisher_subsample_size`` gradients, each the mean loss gradient over
   ``fisher_mini_bsz`` training samples (chunks of at most ``max_mini_bsz``), model in eval mode,
   labels true or sampled from the model (``true_fisher``), pruned coordinates zeroed; they are
   written into ONE preallocated (m x D) matrix (D = all masked weights, layers side by side), on
   the model's device or in CPU memory (``offload_grads``);
2. build the block inverse of F = lambda I + G^T G / m (``pruning.fisher_inverse``) per layer in
   blocks of ``fittable_params`` (``fisher_blocks chunk``), per whole layer (``layer``) or over all
   weights at once (``all``);
3. score every weight (or filter / channel) with the method's statistic (a registry below, one
   entry per method), select with the shared selector (``layers.selector.select_masks``; global
   with ``woodburry_joint_sparsify``, per layer otherwise; exact counts n_keep(k, N) at density
   k = 1 - sparsity, and exactly the run's ``--k`` at the final target);
4. apply the method's update (OBS: w <- w - scale * F^-1 s) to the surviving weights, set pruned
   weights to 0, install the masks (frozen), clear the pruned coordinates of the optimizer state
   (momentum buffers) and log the event.

``recompute_num`` splits an event into sub-steps from the CURRENT sparsity to the event's target,
each with a fresh Fisher. Between events the weights are fine-tuned by the base trainer's loop,
with the masks re-applied after every optimizer step so pruned weights stay exactly zero (also
under momentum, weight decay or Adam). ``one_shot``: one event to the target at epoch 0 and no
training at all, so the run evaluates the pruned model.

Granularity support per method (``PruneMethod.granularities``):
    woodfisher       unstructured, filter, channel  (filter/channel: group OBS, blocks aligned to
                                                     whole groups; not with --fisher-blocks all)
    woodtaylor       unstructured
    diagfisher       unstructured, filter, channel  (group statistic = sum of w_q^2 F_qq)
    magnitude        unstructured, filter, channel  (per layer; group statistic = ||w_Q||^2)
    globalmagnitude  unstructured, filter, channel  (global)
FLOPs-aware pruning (``pruning.flops`` counts one MAC per weight per output position and sample,
measured once with forward hooks on one training input):
    --flops-power p   every method's statistic is divided by flops_per_weight[layer]^p before the
                      global selection, so FLOP-heavy layers lose more weights; the number of kept
                      units is unchanged (n_keep at the event's density). A group's FLOPs per
                      weight is its layer's. With a per-layer selection (magnitude,
                      --no-woodburry-joint-sparsify) one factor per layer changes nothing.
    --flops-target f  the run's final target is a fraction f of the dense FLOPs of the masked
                      layers instead of a weight count: AGP runs over FLOPs sparsity, from
                      --init-sparsity to 1 - f, and each (sub-)step keeps the largest prefix of the
                      units ranked by the (weighted) statistic whose FLOPs fit the step's budget;
                      the search only sums FLOPs, then ONE update is applied for the chosen set
                      (the public code re-applies the OBS update at every step of its binary
                      search). --k must stay 1 (the density then follows from the FLOPs budget);
                      the selection is global (not with a per-layer method or
                      --no-woodburry-joint-sparsify); the weight sparsity reached is what the run
                      reports, and every event logs the kept FLOPs fraction.

Everything tensor-valued in an event runs on the model's device (with ``offload_grads`` only the
storage of G is on the CPU; each layer's slice is copied to the device to be used).
"""
from __future__ import annotations

import difflib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from configs.errors import UserError
from data.sampling import EpochSampler, derive_seed
from layers.selector import UNIT_SCORES, expand_units, global_ranking, select_masks, unit_counts
from engine.optim import OptimSettings, own_only, split_parameters
from trainers.base import BaseTrainer
from pruning.fisher_inverse import DiagonalFisher, EmpiricalFisherInverse
from pruning.flops import flops_budget, flops_per_weight, largest_prefix_within
from engine.memory import MemoryNeed
from pruning.obs import (
    diagonal_fisher_statistic,
    diagonal_fisher_update,
    group_obs_statistic,
    group_obs_update,
    group_permutation,
    magnitude_statistic,
    obs_statistic,
    obs_update,
    woodtaylor_statistic,
    woodtaylor_update,
    zero_update,
)
from pruning.schedule import PruneEvent, agp_schedule, one_shot_schedule, recompute_steps
from trainers.registry import register_trainer

FISHER_STREAM = 0x5F  # sampler stream of the Fisher mini-batches (independent of the training streams)


# ---------------------------------------------------------------------------------------------
# prune methods: a registry, one entry per criterion


@dataclass(frozen=True)
class PruneMethod:
    """One pruning criterion.

    fisher: which curvature it needs: ``empirical`` (the block inverse of the damped empirical
        Fisher), ``diagonal`` (its diagonal) or ``None`` (no gradients are collected).
    statistic / update: per-weight functions with the signature of ``pruning.obs`` (weight,
        fisher_inverse, mask, grad / prune, scale_prune_update).
    group_statistic / group_update: per-group versions for filter/channel masks (group OBS).
    additive: the per-weight statistic adds up over a group (a group is scored by the sum), so
        filter/channel masks work without a group version and the update only zeroes.
    scope: a fixed selection scope, or ``None`` for --woodburry-joint-sparsify (global) / per layer.
    needs_grad_mean: the statistic and update take the mean gradient (WoodTaylor).
    default_damp: lambda when --fisher-damp is not given.
    """

    name: str
    fisher: str | None
    statistic: Callable[..., torch.Tensor]
    update: Callable[..., torch.Tensor]
    group_statistic: Callable[..., torch.Tensor] | None = None
    group_update: Callable[..., torch.Tensor] | None = None
    additive: bool = False
    scope: str | None = None
    needs_grad_mean: bool = False
    default_damp: float = 1e-5
    help: str = ""

    @property
    def granularities(self) -> tuple[str, ...]:
        grouped = self.group_statistic is not None or self.additive
        return ("unstructured", "filter", "channel") if grouped else ("unstructured",)


PRUNE_METHODS: dict[str, PruneMethod] = {}


def register_prune_method(method: PruneMethod) -> PruneMethod:
    if method.name in PRUNE_METHODS:
        raise ValueError(f"prune method {method.name!r} registered twice")
    PRUNE_METHODS[method.name] = method
    return method


register_prune_method(PruneMethod(
    "woodfisher", "empirical", obs_statistic, obs_update, group_obs_statistic, group_obs_update,
    help="OBS statistic w^2/[F^-1]_qq and update -F^-1 s (group OBS for filters/channels)"))
# WoodTaylor applies the Newton step -F^-1 g at every event. g is the mean of the m gradient rows, so
# it lies in their span, but along the rows' small singular directions F^-1 g grows like 1/lambda:
# with a small lambda the step leaves the region where the quadratic model holds. Measured on the
# Digits config (90 % sparsity, m = 64): lambda 1e-5 -> 12 % test top-1 (chance), 0.01 -> 49 %,
# 0.1 (the public code's MNIST sweep, with m = 8000) -> 61 %, 1 -> 97.8 %. Hence its own default.
register_prune_method(PruneMethod(
    "woodtaylor", "empirical", woodtaylor_statistic, woodtaylor_update, needs_grad_mean=True, default_damp=1.0,
    help="OBS with the first-order term: (w - F^-1 g)^2/[F^-1]_qq, update -F^-1 (g + s)"))
register_prune_method(PruneMethod(
    "diagfisher", "diagonal", diagonal_fisher_statistic, diagonal_fisher_update, additive=True,
    help="w^2 F_qq (diagonal Fisher), no compensation"))
register_prune_method(PruneMethod(
    "magnitude", None, magnitude_statistic, zero_update, additive=True, scope="layer",
    help="|w| per layer (same sparsity in every layer)"))
register_prune_method(PruneMethod(
    "globalmagnitude", None, magnitude_statistic, zero_update, additive=True, scope="global",
    help="|w| over all layers at once"))


def granularity_note() -> str:
    """Which --layer-type each --prune-method supports (for errors and docs)."""
    return "; ".join(f"{m.name}: {', '.join(m.granularities)}" for m in PRUNE_METHODS.values())


# ---------------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class WoodFisherOptions:
    prune_method: str = "woodfisher"
    target: float = 0.9  # final sparsity: of units, or of FLOPs when flops_target is set
    init_sparsity: float = 0.05
    prune_start: int = 0
    prune_freq: int = 1
    prune_end: int = 0
    agp_power: float = 3.0
    one_shot: bool = False
    fisher_subsample_size: int = 100
    fisher_mini_bsz: int = 1
    max_mini_bsz: int | None = None
    fisher_damp: float = 1e-5
    fittable_params: int = 2000
    fisher_blocks: str = "chunk"
    true_fisher: bool = False
    offload_grads: bool = False
    woodburry_joint_sparsify: bool = True
    scale_prune_update: float = 1.0
    recompute_num: int = 1
    recompute_schedule: str = "linear"
    disable_wdecay_after_prune: bool = False
    flops_power: float = 0.0
    flops_target: float | None = None  # kept FLOPs fraction at the end (then target = 1 - flops_target)
    seed: int = 0

    def schedule(self) -> list[PruneEvent]:
        if self.one_shot:
            return one_shot_schedule(target=self.target, epoch=0)
        return agp_schedule(start=self.prune_start, freq=self.prune_freq, end=self.prune_end,
                            initial=self.init_sparsity, target=self.target, power=self.agp_power)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_woodfisher_options(*, mode: str, layer_type: str, k: float, scope: str, epochs: int,
                             prune_method: str = "woodfisher", target_sparsity: float | None = None,
                             init_sparsity: float = 0.05, prune_start: int = 0, prune_freq: int = 1,
                             prune_end: int = 0, agp_power: float = 3, one_shot: bool = False,
                             fisher_subsample_size: int = 100, fisher_mini_bsz: int = 1,
                             max_mini_bsz: int | None = None, fisher_damp: float | None = None,
                             fittable_params: int = 2000, fisher_blocks: str = "chunk",
                             true_fisher: bool = False, offload_grads: bool = False,
                             woodburry_joint_sparsify: bool = True, scale_prune_update: float = 1.0,
                             recompute_num: int = 1, recompute_schedule: str = "linear",
                             disable_wdecay_after_prune: bool = False, flops_power: float = 0.0,
                             flops_target: float | None = None, seed: int = 0) -> WoodFisherOptions:
    """Validate the WoodFisher options of a run (UserError naming the fix) and return them typed."""
    if mode != "prune":
        raise UserError(f"the woodfisher trainer prunes: use --exp-mode prune (got {mode})")
    if prune_method not in PRUNE_METHODS:
        match = difflib.get_close_matches(prune_method, PRUNE_METHODS, n=1)
        hint = f"; did you mean '{match[0]}'?" if match else ""
        raise UserError(f"unknown --prune-method '{prune_method}'{hint} (choose from {', '.join(PRUNE_METHODS)})")
    method = PRUNE_METHODS[prune_method]
    if layer_type not in method.granularities:
        raise UserError(f"--prune-method {prune_method} does not support --layer-type {layer_type}; "
                        f"supported: {granularity_note()}")
    if layer_type != "unstructured" and fisher_blocks == "all" and method.group_statistic is not None:
        raise UserError(f"--layer-type {layer_type} with --prune-method {prune_method} needs blocks aligned to "
                        "whole filters/channels of one layer: use --fisher-blocks chunk or layer, not all")
    if not (flops_power >= 0 and math.isfinite(flops_power)):
        raise UserError(f"--flops-power must be >= 0 (0 = off; p > 0 prunes FLOP-heavy layers more), got {flops_power}")
    if flops_target is None:
        target = _weight_target(k=k, target_sparsity=target_sparsity)
    else:
        target = _flops_sparsity_target(flops_target=flops_target, k=k, target_sparsity=target_sparsity,
                                        method=method, scope=scope, woodburry_joint_sparsify=woodburry_joint_sparsify)
    if not one_shot:
        if not 0.0 <= init_sparsity <= target:
            what = "FLOPs sparsity 1 - --flops-target" if flops_target is not None else "sparsity"
            raise UserError(f"--init-sparsity must be in [0, target {what} {target:g}], got {init_sparsity:g}")
        if prune_start < 0 or prune_freq < 1:
            raise UserError(f"--prune-start must be >= 0 and --prune-freq >= 1, got {prune_start} and {prune_freq}")
        if prune_end < prune_start:
            raise UserError(f"--prune-end ({prune_end}) must be >= --prune-start ({prune_start})")
        if epochs <= prune_end:
            raise UserError(f"the last pruning event runs at the start of epoch {prune_end} (0-based, --prune-end), "
                            f"but --epochs {epochs} stops before it: pass --epochs {prune_end + 1} or more")
        if not agp_power > 0:
            raise UserError(f"--agp-power must be > 0, got {agp_power}")
    elif epochs != 1:
        raise UserError(f"--one-shot prunes once and evaluates without training: pass --epochs 1 (got {epochs})")
    for name, value in (("fisher_subsample_size", fisher_subsample_size), ("fisher_mini_bsz", fisher_mini_bsz),
                        ("fittable_params", fittable_params), ("recompute_num", recompute_num)):
        if value < 1:
            raise UserError(f"{_flag(name)} must be >= 1, got {value}")
    if max_mini_bsz is not None and max_mini_bsz < 1:
        raise UserError(f"--max-mini-bsz must be >= 1, got {max_mini_bsz}")
    if fisher_damp is None:
        fisher_damp = method.default_damp
    if not fisher_damp > 0 or math.isinf(fisher_damp):
        raise UserError(f"--fisher-damp (lambda) must be > 0, got {fisher_damp}")
    if not scale_prune_update >= 0:
        raise UserError(f"--scale-prune-update must be >= 0, got {scale_prune_update}")
    if fisher_blocks not in ("chunk", "layer", "all"):
        raise UserError(f"--fisher-blocks must be chunk, layer or all, got {fisher_blocks!r}")
    if recompute_schedule not in ("linear", "poly"):
        raise UserError(f"--recompute-schedule must be linear or poly, got {recompute_schedule!r}")
    if scope == "layer" and woodburry_joint_sparsify and method.scope is None:
        raise UserError("--scope layer asks for per-layer selection but --woodburry-joint-sparsify (the default) "
                        "selects globally: pass --no-woodburry-joint-sparsify (or --scope global)")
    return WoodFisherOptions(
        prune_method=prune_method, target=target, init_sparsity=init_sparsity, prune_start=prune_start,
        prune_freq=prune_freq, prune_end=prune_end, agp_power=agp_power, one_shot=one_shot,
        fisher_subsample_size=fisher_subsample_size, fisher_mini_bsz=fisher_mini_bsz, max_mini_bsz=max_mini_bsz,
        fisher_damp=fisher_damp, fittable_params=fittable_params, fisher_blocks=fisher_blocks,
        true_fisher=true_fisher, offload_grads=offload_grads, woodburry_joint_sparsify=woodburry_joint_sparsify,
        scale_prune_update=scale_prune_update, recompute_num=recompute_num, recompute_schedule=recompute_schedule,
        disable_wdecay_after_prune=disable_wdecay_after_prune, flops_power=flops_power, flops_target=flops_target,
        seed=seed)


def _weight_target(*, k: float, target_sparsity: float | None) -> float:
    """The final sparsity of units: 1 - k (--target-sparsity, if given, must agree)."""
    default_target = 1.0 - k
    target = default_target
    if target_sparsity is not None:
        if abs(target_sparsity - default_target) > 1e-9:
            raise UserError(f"--target-sparsity {target_sparsity:g} disagrees with --k {k:g} (sparsity = 1 - k = "
                            f"{default_target:g}); drop --target-sparsity or pass --k {1 - target_sparsity:g}")
        target = target_sparsity
    if not 0.0 < target < 1.0:
        raise UserError(f"--k {k:g} leaves nothing to prune: pass a density --k < 1 (the weights kept at the end)")
    return target


def _flops_sparsity_target(*, flops_target: float, k: float, target_sparsity: float | None, method: PruneMethod,
                           scope: str, woodburry_joint_sparsify: bool) -> float:
    """The final FLOPs sparsity 1 - flops_target, after checking that nothing else sets a target and
    that the selection is global (the FLOPs search ranks the units of all layers together)."""
    if flops_target == 1.0:
        raise UserError("--flops-target 1 keeps every FLOP: nothing to prune; pass a fraction in (0, 1)")
    if not 0.0 < flops_target < 1.0:
        raise UserError(f"--flops-target is the fraction of the dense FLOPs kept, in (0, 1); got {flops_target:g}")
    if k != 1.0:
        raise UserError(f"--flops-target replaces the weight-count target --k: leave --k at 1 (got --k {k:g}); "
                        "the weight sparsity the FLOPs budget leads to is reported at the end")
    if target_sparsity is not None:
        raise UserError("--target-sparsity is a weight-count target and --flops-target a FLOPs one: pass only "
                        "--flops-target")
    if method.scope == "layer":
        raise UserError(f"--flops-target ranks the units of all layers together, but --prune-method {method.name} "
                        "selects per layer: use --prune-method globalmagnitude")
    if scope == "layer":
        raise UserError("--flops-target ranks the units of all layers together: pass --scope global")
    if method.scope is None and not woodburry_joint_sparsify:
        raise UserError("--flops-target ranks the units of all layers together: drop --no-woodburry-joint-sparsify")
    return 1.0 - flops_target


# ---------------------------------------------------------------------------------------------
# the trainer


def _mib(n: int) -> float:
    return n / 2**20


@dataclass
class _Unit:
    """Weights that share one Fisher inverse: one layer, or all layers (--fisher-blocks all)."""

    names: list[str]
    start: int  # first column of the unit in G
    size: int


@register_trainer("woodfisher")
class WoodFisherTrainer(BaseTrainer):
    """Gradual OBS pruning (see the module docstring)."""

    option_names = ("seed", "prune_method", "target_sparsity", "init_sparsity", "prune_start", "prune_freq",
                    "prune_end", "agp_power", "one_shot", "fisher_subsample_size", "fisher_mini_bsz",
                    "max_mini_bsz", "fisher_damp", "fittable_params", "fisher_blocks", "true_fisher",
                    "offload_grads", "woodburry_joint_sparsify", "scale_prune_update", "recompute_num",
                    "recompute_schedule", "disable_wdecay_after_prune", "flops_power", "flops_target")

    @classmethod
    def check_options(cls, **settings) -> None:
        check_woodfisher_options(**settings)

    @classmethod
    def memory_needs(cls, *, per_sample_bytes: int, batch_size: int, model_bytes: int, masked_weights: int,
                     on_gpu: bool, **options) -> list[MemoryNeed]:
        """Training's needs plus the m x D gradient matrix and one Fisher mini-batch chunk's activations."""
        needs = super().memory_needs(per_sample_bytes=per_sample_bytes, batch_size=batch_size,
                                     model_bytes=model_bytes, masked_weights=masked_weights, on_gpu=on_gpu)
        if PRUNE_METHODS.get(options.get("prune_method", "woodfisher"), PRUNE_METHODS["woodfisher"]).fisher is None:
            return needs
        m = options.get("fisher_subsample_size", 100)
        offload = bool(options.get("offload_grads")) and on_gpu
        hint = "" if offload or not on_gpu else ", or pass --offload-grads to keep them in host memory"
        needs.append(MemoryNeed(f"the {m} x {masked_weights:,} Fisher gradients", m * masked_weights * 4, offload,
                                f"lower --fisher-subsample-size{hint}"))
        mini = options.get("fisher_mini_bsz", 1)
        chunk = min(mini, options.get("max_mini_bsz") or mini)
        needs.append(MemoryNeed(f"the activations of a Fisher mini-batch chunk of {chunk}", per_sample_bytes * chunk,
                                False, "pass --max-mini-bsz to split each --fisher-mini-bsz batch into smaller chunks"))
        return needs

    def setup(self, *, weights: OptimSettings, masks: OptimSettings | None, freeze_bn: bool, **options) -> None:
        if self.mode != "prune" or self.maskset is None:
            raise ValueError("the woodfisher trainer prunes: it needs mode 'prune' and masked layers")
        ms = self.maskset
        self.opts = check_woodfisher_options(mode=self.mode, layer_type=ms.granularity, k=ms.k, scope=ms.scope,
                                             epochs=weights.epochs, **options)
        self.method = PRUNE_METHODS[self.opts.prune_method]
        self.k = ms.k
        self.granularity = ms.granularity
        self.scope = self.method.scope or ("global" if self.opts.woodburry_joint_sparsify else "layer")
        self.events = self.opts.schedule()
        self.history: list[dict] = []  # one record per pruning sub-step
        self._notes: list[str] = []
        # FLOPs per weight by layer: measured at the first event that has data (architecture and
        # input size only, so never re-measured; a resumed run measures the same values).
        self.flops: dict[str, int] | None = None
        scores, bn, other = split_parameters(self.model)
        params = other + ([] if freeze_bn else bn)
        own_only(self.model, params)  # scores are unused and frozen
        self.add_optimizer("optimizer", params, weights)
        # A fresh run starts dense; a resumed one (masks frozen, restored from its checkpoint) keeps its masks.
        if not ms.frozen:
            ms.set_masks({name: torch.ones_like(layer.mask) for name, layer in ms.layers.items()})
        self.apply_masks()

    # -- hooks used by the epoch loop ------------------------------------------------------------
    def set_epoch(self, epoch: int) -> dict[str, float]:
        lrs = super().set_epoch(epoch)
        last = self.events[-1].epoch if self.events else 0
        if self.opts.disable_wdecay_after_prune and epoch >= last:
            for opt in self.optimizers.values():
                for group in opt.param_groups:
                    group["weight_decay"] = 0.0
        return lrs

    def train_epoch(self, epoch: int, loaders) -> dict[str, float]:
        for event in self.events:
            if event.epoch == epoch:
                self.prune_to(event.sparsity, epoch=epoch, loaders=loaders)
        if self.opts.one_shot:  # no training: the loop evaluates the pruned model
            nan = float("nan")
            return {"loss": nan, "top1": nan, "top5": nan}
        return super().train_epoch(epoch, loaders)

    def step(self, batch):
        out = super().step(batch)
        self.apply_masks()  # pruned weights stay exactly zero (momentum, weight decay, Adam, ...)
        return out

    def final_masks(self, epoch: int) -> bool:
        """Only epochs from the last pruning event on compete for model_best."""
        return not self.events or epoch >= self.events[-1].epoch

    def pop_notes(self) -> list[str]:
        notes, self._notes = self._notes, []
        return notes

    # -- masks and optimizer state ---------------------------------------------------------------
    @torch.no_grad()
    def apply_masks(self) -> None:
        for layer in self.maskset.layers.values():
            layer.weight.mul_(layer.mask)

    @torch.no_grad()
    def clear_pruned_state(self) -> None:
        """Zero the pruned coordinates of every weight-shaped optimizer state (SGD momentum, Adam moments)."""
        for opt in self.optimizers.values():
            for layer in self.maskset.layers.values():
                for value in opt.state.get(layer.weight, {}).values():
                    if torch.is_tensor(value) and value.shape == layer.weight.shape:
                        value.mul_(layer.mask)

    def _alive_units(self, mask: torch.Tensor) -> torch.Tensor:
        """One bool per unit of the granularity (a whole filter/channel is alive if any weight is)."""
        if self.granularity == "unstructured":
            return mask.reshape(-1)
        if self.granularity == "filter":
            return mask.flatten(1).any(1)
        return mask.transpose(0, 1).flatten(1).any(1)

    def current_sparsity(self) -> float:
        """Fraction of units (weights, filters or channels) pruned now, over all masked layers."""
        layers = list(self.maskset.layers.values())
        total = sum(unit_counts([l.mask.shape for l in layers], self.granularity))
        alive = sum(int(self._alive_units(l.mask).sum()) for l in layers)
        return 1.0 - alive / total

    # -- FLOPs -----------------------------------------------------------------------------------
    def _needs_flops(self) -> bool:
        return self.opts.flops_power != 0 or self.opts.flops_target is not None

    def measure_flops(self, loaders) -> None:
        """FLOPs per weight of every masked layer, from one training input (once). Without data it
        stays unknown, which only FLOPs-aware pruning cannot do without."""
        if self.flops is not None:
            return
        if loaders is None:
            if self._needs_flops():
                raise ValueError("FLOPs-aware pruning needs training data to measure FLOPs per weight (loaders)")
            return
        example = self._probe_input(loaders.train)
        self.flops = flops_per_weight(self.model, example=example, layers=self.maskset.layers)

    def _probe_input(self, train: DataLoader) -> torch.Tensor:
        """One training input as a batch of one, on the device. Read under a forked RNG (and with the
        sampler's key type, so a seeded augmentation is used where the dataset has one): measuring
        FLOPs must not shift the random streams of training, or a resumed run would differ."""
        sampler = train.sampler
        key = (int(sampler.indices[0]), 0) if isinstance(sampler, EpochSampler) else 0
        with torch.random.fork_rng(devices=[]):
            x, _ = train.collate_fn([train.dataset[key]])
        return x.to(self.device)

    def dense_flops(self) -> int:
        return sum(layer.weight.numel() * self.flops[name] for name, layer in self.maskset.layers.items())

    def kept_flops_fraction(self) -> float | None:
        """Kept FLOPs of the masked layers over their dense FLOPs (None while FLOPs are unmeasured)."""
        if self.flops is None:
            return None
        kept = sum(int(layer.mask.sum()) * self.flops[name] for name, layer in self.maskset.layers.items())
        return kept / self.dense_flops()

    def schedule_sparsity(self) -> float:
        """Where the schedule stands now: FLOPs sparsity with --flops-target, unit sparsity otherwise."""
        if self.opts.flops_target is not None:
            return 1.0 - self.kept_flops_fraction()
        return self.current_sparsity()

    def _weight_by_flops(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scores whose statistic is divided by flops_per_weight[layer]^flops_power.

        The selector ranks |score| per weight but the L2 norm of a filter's/channel's scores, and
        group scores are sqrt(statistic)-valued (see ``_score``): dividing each score of a group by
        f^(p/2) divides the group's statistic by f^p."""
        p = self.opts.flops_power if self.granularity == "unstructured" else self.opts.flops_power / 2
        out = {}
        for name, s in scores.items():
            weighted = s.abs() / float(self.flops[name]) ** p
            # An alive weight must still outrank a pruned one (score 0): no underflow to 0.
            tiny = torch.finfo(weighted.dtype).tiny
            out[name] = torch.where(s != 0, weighted.clamp_min(tiny), torch.zeros((), dtype=s.dtype, device=s.device))
        return out

    def _ranked_units(self, scores: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(order, unit FLOPs, forced): all layers' units best first, ranked exactly as the shared
        selector ranks them (its unit scores, each layer's best ``min_units`` first, ties to the
        higher flat index: a stable ascending sort, reversed), the FLOPs of every unit (its weights times
        its layer's FLOPs per weight), and how many units the floor forces in."""
        layers = self.maskset.layers
        units = [UNIT_SCORES[self.granularity](scores[n].detach()) for n in layers]
        flat = global_ranking(units, min_units=self.maskset.min_units)  # the selector's own ranking
        forced = sum(min(self.maskset.min_units, u.numel()) for u in units)
        costs = torch.cat([torch.full((u.numel(),), (layer.weight.numel() // u.numel()) * self.flops[n],
                                      dtype=torch.int64, device=flat.device)
                           for (n, layer), u in zip(layers.items(), units)])
        order = torch.sort(flat, stable=True).indices.flip(0)
        return order, costs, forced

    def _select_within_flops(self, scores: dict[str, torch.Tensor], *, fraction: float) -> tuple[dict, dict]:
        """Masks keeping the largest prefix of the ranked units whose FLOPs fit ``fraction`` of the
        dense FLOPs, and a record of the search. Only FLOPs are summed here (a binary search over the
        cumulative sums); no weight is touched: the step applies ONE update for the chosen set."""
        layers = self.maskset.layers
        order, costs, forced = self._ranked_units(scores)
        ranked = costs[order]
        budget = flops_budget(fraction, self.dense_flops())
        n = largest_prefix_within(ranked, budget)
        alive = sum(int(self._alive_units(layer.mask).sum()) for layer in layers.values())
        # Never revive (alive units rank first: pruned ones score 0); the floor and one unit win over
        # the budget, as n_keep keeps at least one unit.
        n = min(max(n, 1, forced), alive)
        keep = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
        keep[order[:n]] = True
        counts = unit_counts([l.weight.shape for l in layers.values()], self.granularity)
        new = {name: expand_units(part, layer.weight.shape, self.granularity)
               for (name, layer), part in zip(layers.items(), keep.split(counts))}
        search = {"flops_budget": budget, "flops_dense": self.dense_flops(), "kept_units": n,
                  "flops_next": int(ranked[n]) if n < alive else None}
        return new, search

    # -- a pruning event -------------------------------------------------------------------------
    def prune_to(self, sparsity: float, *, epoch: int, loaders) -> None:
        """Prune from the current sparsity to ``sparsity`` in ``recompute_num`` sub-steps (sparsity of
        FLOPs with --flops-target, of units otherwise)."""
        self.measure_flops(loaders)
        steps = recompute_steps(current=self.schedule_sparsity(), target=sparsity, num=self.opts.recompute_num,
                                kind=self.opts.recompute_schedule)
        for i, s in enumerate(steps):
            self.prune_step(s, epoch=epoch, substep=i, substeps=len(steps), loaders=loaders)

    def _units(self) -> list[_Unit]:
        units, start = [], 0
        for name, layer in self.maskset.layers.items():
            units.append(_Unit([name], start, layer.weight.numel()))
            start += layer.weight.numel()
        if self.method.fisher == "empirical" and self.opts.fisher_blocks == "all":
            return [_Unit([u.names[0] for u in units], 0, start)]
        return units

    def prune_step(self, sparsity: float, *, epoch: int, substep: int = 0, substeps: int = 1, loaders=None) -> dict:
        """One OBS step to ``sparsity``: gradients, inverse, statistic, selection, update, masks."""
        t0 = time.perf_counter()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            cuda_base = torch.cuda.memory_allocated(self.device)
        self.measure_flops(loaders)
        before = self.current_sparsity()
        flops_before = self.kept_flops_fraction()
        # The final target is the run's --k (or --flops-target) exactly: 1 - (1 - k) can land one
        # ulp off and change a count.
        final = sparsity == self.opts.target
        flops_fraction = None
        if self.opts.flops_target is not None:
            flops_fraction = self.opts.flops_target if final else 1.0 - sparsity
        density = self.k if final else 1.0 - sparsity
        layers = self.maskset.layers
        G = None
        if self.method.fisher is not None:
            if loaders is None:
                raise ValueError(f"prune method {self.method.name} needs training data for its Fisher (loaders)")
            G = self.collect_gradients(loaders, epoch=epoch, substep=substep)
        t_grads = time.perf_counter() - t0
        grads_bytes = G.numel() * G.element_size() if G is not None else 0
        budget = 0 if (G is None or self.opts.offload_grads) else grads_bytes  # inverses kept for the update
        units = self._units()
        scores: dict[str, torch.Tensor] = {}
        kept: dict[int, tuple] = {}
        kept_bytes, peak = 0, 0
        with torch.no_grad():
            for i, unit in enumerate(units):
                ctx = self._unit_context(unit, G)
                inv = self._inverse(ctx)
                scores.update(self._score(unit, ctx, inv))
                inv_peak = inv.peak_memory_bytes() if inv is not None else 0
                inv_kept = inv.kept_memory_bytes() if inv is not None else 0
                peak = max(peak, kept_bytes + inv_peak + ctx["staged_bytes"])
                cost = inv_kept + ctx["staged_bytes"]  # a permuted/staged copy of G stays with it
                if inv is not None and kept_bytes + cost <= budget:
                    kept[i] = (ctx, inv, cost)
                    kept_bytes += cost
                del ctx, inv
            names = list(layers)
            if self.opts.flops_power:
                scores = self._weight_by_flops(scores)
            search: dict = {}
            if flops_fraction is not None:
                new, search = self._select_within_flops(scores, fraction=flops_fraction)
                goal = f"kept FLOPs fraction {flops_fraction}"
            else:
                new_masks = select_masks([scores[n] for n in names], k=density, granularity=self.granularity,
                                         scope=self.scope, min_units=self.maskset.min_units)
                new = dict(zip(names, new_masks))
                goal = f"density {density}"
            for name in names:
                if bool((new[name] & ~layers[name].mask).any()):
                    raise RuntimeError(f"selection at {goal} would revive pruned weights of {name}")
            for i, unit in enumerate(units):
                if i in kept:
                    ctx, inv, cost = kept.pop(i)
                    kept_bytes -= cost
                else:
                    ctx = self._unit_context(unit, G)
                    inv = self._inverse(ctx)
                    if inv is not None:
                        peak = max(peak, kept_bytes + inv.peak_memory_bytes() + ctx["staged_bytes"])
                self._update(unit, ctx, inv, new)
                del ctx, inv
            del G, kept
            self.maskset.set_masks(new)
            self.apply_masks()
            self.clear_pruned_state()
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch, "substep": substep, "target": sparsity, "before": before,
                  "sparsity": self.current_sparsity(), "seconds": seconds, "grad_seconds": t_grads,
                  "grads_bytes": grads_bytes, "inverse_peak_bytes": peak, "peak_bytes": grads_bytes + peak,
                  "flops_before": flops_before, "flops_kept": self.kept_flops_fraction(), **search}
        if cuda:
            torch.cuda.synchronize(self.device)
            record["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(self.device) - cuda_base
        self.history.append(record)
        o = self.opts
        fisher = (f", m {o.fisher_subsample_size} x {o.fisher_mini_bsz} samples, blocks {o.fisher_blocks}"
                  + (f" {o.fittable_params}" if o.fisher_blocks == "chunk" else "") + f", damp {o.fisher_damp:g}"
                  if self.method.fisher else "")
        cuda_text = f", CUDA peak {_mib(record['cuda_peak_bytes']):.1f} MiB" if cuda else ""
        line = (f"prune epoch {epoch} step {substep + 1}/{substeps}: {self.method.name} ({self.scope}{fisher}"
                + (f", flops power {o.flops_power:g}" if o.flops_power else "") + ") "
                + self._progress_text(record, sparsity=sparsity, flops_fraction=flops_fraction)
                + f" in {seconds:.2f}s (gradients {t_grads:.2f}s); peak memory {_mib(record['peak_bytes']):.1f} MiB "
                f"(gradients {_mib(grads_bytes):.1f} + inverse {_mib(peak):.1f}){cuda_text}")
        self._notes.append(line)  # the epoch loop prints it (console and run.log): see pop_notes
        return record

    def _progress_text(self, record: dict, *, sparsity: float, flops_fraction: float | None) -> str:
        """'sparsity a% -> b% (target t%), FLOPs kept x% -> y%', the FLOPs first and as the target
        with --flops-target."""
        units = f"sparsity {100 * record['before']:.2f}% -> {100 * record['sparsity']:.2f}%"
        if record["flops_kept"] is None:
            return f"{units} (target {100 * sparsity:.2f}%)"
        flops = f"FLOPs kept {100 * record['flops_before']:.2f}% -> {100 * record['flops_kept']:.2f}%"
        if flops_fraction is None:
            return f"{units} (target {100 * sparsity:.2f}%), {flops}"
        return f"{flops} (target {100 * flops_fraction:.2f}%), {units}"

    # -- the pieces of a step --------------------------------------------------------------------
    def _unit_context(self, unit: _Unit, G: torch.Tensor | None) -> dict:
        """Flat weights, alive mask and (device) gradient columns of a unit; for filter/channel masks
        the coordinates are permuted so that each unit is a contiguous group of ``group`` weights."""
        layers = [self.maskset.layers[n] for n in unit.names]
        w = torch.cat([l.weight.detach().reshape(-1) for l in layers])
        alive = torch.cat([l.mask.reshape(-1) for l in layers])
        ctx = {"w": w, "alive": alive, "perm": None, "group": 1, "G": None, "staged_bytes": 0}
        if G is not None:
            Gu = G[:, unit.start:unit.start + unit.size]
            if Gu.device != self.device:
                Gu = Gu.to(self.device)
                ctx["staged_bytes"] = Gu.numel() * Gu.element_size()
            ctx["G"] = Gu
        if self.granularity != "unstructured":
            perm, group = group_permutation(shape=layers[0].weight.shape, granularity=self.granularity)
            ctx["group"] = group
            if perm is not None:
                perm = perm.to(self.device)
                ctx["perm"] = perm
                ctx["w"], ctx["alive"] = w[perm], alive[perm]
                if ctx["G"] is not None:
                    ctx["G"] = ctx["G"][:, perm]
                    ctx["staged_bytes"] += ctx["G"].numel() * ctx["G"].element_size()
        return ctx

    def _inverse(self, ctx: dict):
        kind = self.method.fisher
        if kind is None:
            return None
        if kind == "diagonal":
            return DiagonalFisher(ctx["G"], damp=self.opts.fisher_damp)
        block = None
        if self.opts.fisher_blocks == "chunk":
            g = ctx["group"]
            block = max(1, self.opts.fittable_params // g) * g  # whole groups per block
        return EmpiricalFisherInverse(ctx["G"], block_size=block, damp=self.opts.fisher_damp)

    def _grouped(self) -> bool:
        return self.granularity != "unstructured" and self.method.group_statistic is not None

    def _score(self, unit: _Unit, ctx: dict, inv) -> dict[str, torch.Tensor]:
        """Weight-shaped scores for the selector (it ranks |s| per weight, ||s||_2 per filter/channel)."""
        if self._grouped():
            g = ctx["group"]
            n_groups = ctx["w"].numel() // g
            alive_groups = ctx["alive"].view(n_groups, g).any(1)
            rho = self.method.group_statistic(weight=ctx["w"], fisher_inverse=inv, group_size=g, mask=alive_groups)
            # sqrt(rho / g) in each of the g weights: the group's L2 norm is sqrt(rho), whatever g.
            layer = self.maskset.layers[unit.names[0]]
            return {unit.names[0]: expand_units((rho / g).sqrt(), layer.weight.shape, self.granularity)}
        grad = ctx["G"].mean(0) if self.method.needs_grad_mean else None
        stat = self.method.statistic(weight=ctx["w"], fisher_inverse=inv, mask=ctx["alive"], grad=grad)
        if self.granularity != "unstructured":
            stat = stat.sqrt()  # additive: a group's L2 norm of sqrt(stat) is sqrt(sum of stat)
        return self._split(unit, ctx, stat.reshape(-1))

    def _update(self, unit: _Unit, ctx: dict, inv, new: dict[str, torch.Tensor]) -> None:
        layers = [self.maskset.layers[n] for n in unit.names]
        keep = torch.cat([new[n].reshape(-1) for n in unit.names])
        if ctx["perm"] is not None:
            keep = keep[ctx["perm"]]
        prune = ctx["alive"] & ~keep
        scale = self.opts.scale_prune_update
        if self._grouped():
            g = ctx["group"]
            n_groups = ctx["w"].numel() // g
            w_new = self.method.group_update(weight=ctx["w"], fisher_inverse=inv, group_size=g,
                                             prune=prune.view(n_groups, g).any(1),
                                             mask=ctx["alive"].view(n_groups, g).any(1), scale_prune_update=scale)
        else:
            grad = ctx["G"].mean(0) if self.method.needs_grad_mean else None
            w_new = self.method.update(weight=ctx["w"], fisher_inverse=inv, prune=prune, mask=ctx["alive"],
                                       scale_prune_update=scale, grad=grad)
        for layer, part in zip(layers, self._split(unit, ctx, w_new.reshape(-1)).values()):
            layer.weight.copy_(part)

    def _split(self, unit: _Unit, ctx: dict, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A unit's flat vector (in its possibly permuted order) back to weight-shaped tensors by layer."""
        if ctx["perm"] is not None:
            out = torch.empty_like(flat)
            out[ctx["perm"]] = flat
            flat = out
        layers = [self.maskset.layers[n] for n in unit.names]
        parts = flat.split([l.weight.numel() for l in layers])
        return {n: p.view_as(l.weight) for n, l, p in zip(unit.names, layers, parts)}

    # -- gradients ---------------------------------------------------------------------------------
    def _fisher_loader(self, loaders, *, epoch: int, substep: int) -> DataLoader:
        """Batches of training samples for the m gradients: for each gradient, fisher_mini_bsz samples
        in chunks of at most max_mini_bsz, drawn by a seeded sampler of their own (a function of the
        seed, the epoch and the sub-step, so a resumed run draws the same samples)."""
        o = self.opts
        train = loaders.train
        sampler = train.sampler
        if isinstance(sampler, EpochSampler):
            source = EpochSampler(sampler.indices.tolist(), seed=o.seed, stream=FISHER_STREAM)
            source.set_epoch(epoch * 1000 + substep)
        else:  # any other dataset: plain shuffled indices
            gen = torch.Generator().manual_seed(derive_seed(o.seed, FISHER_STREAM, epoch, substep))
            size = len(train.dataset)

            class _Shuffled:
                def __iter__(self):
                    return iter(torch.randperm(size, generator=gen).tolist())

            source = _Shuffled()

        def keys():
            while True:
                empty = True
                for key in source:
                    empty = False
                    yield key
                if empty:
                    raise ValueError("the training set is empty")

        chunk = min(o.fisher_mini_bsz, o.max_mini_bsz or o.fisher_mini_bsz)
        stream, batches = keys(), []
        for _ in range(o.fisher_subsample_size):
            left = o.fisher_mini_bsz
            while left:
                take = min(chunk, left)
                batches.append([next(stream) for _ in range(take)])
                left -= take
        return DataLoader(train.dataset, batch_sampler=batches, num_workers=train.num_workers,
                          pin_memory=train.pin_memory, collate_fn=train.collate_fn,
                          generator=torch.Generator().manual_seed(derive_seed(o.seed, FISHER_STREAM, epoch, substep)))

    def collect_gradients(self, loaders, *, epoch: int, substep: int = 0) -> torch.Tensor:
        """G (m x D): row i the mean loss gradient of the masked weights over one Fisher mini-batch,
        pruned coordinates 0. Preallocated once, filled in place (on the model's device, or in CPU
        memory with offload_grads)."""
        o = self.opts
        layers = list(self.maskset.layers.values())
        weights = [l.weight for l in layers]
        sizes = [w.numel() for w in weights]
        D, m, B = sum(sizes), o.fisher_subsample_size, o.fisher_mini_bsz
        dtype = weights[0].dtype
        offload = o.offload_grads and self.device.type != "cpu"
        G = torch.empty((m, D), dtype=dtype, device="cpu" if offload else self.device,
                        pin_memory=offload and torch.cuda.is_available())
        row_buf = torch.empty(D, dtype=dtype, device=self.device) if offload else None
        alive = torch.cat([l.mask.reshape(-1) for l in layers])
        criterion = nn.CrossEntropyLoss(reduction="sum", label_smoothing=self.criterion.label_smoothing)
        sampler_gen = None
        if o.true_fisher:
            sampler_gen = torch.Generator(device=self.device)
            sampler_gen.manual_seed(derive_seed(o.seed, FISHER_STREAM, epoch, substep, 1))
        was_training = self.model.training
        self.model.eval()
        batches = iter(self._fisher_loader(loaders, epoch=epoch, substep=substep))
        requires = [w.requires_grad for w in weights]
        try:
            for w in weights:
                w.requires_grad_(True)
            for i in range(m):
                row = row_buf if offload else G[i]
                parts = row.split(sizes)
                filled = 0
                while filled < B:
                    x, y = self._to_device(next(batches))
                    with torch.enable_grad():
                        logits = self.model(x)
                        if o.true_fisher:
                            probs = torch.softmax(logits.detach().float(), dim=1)
                            y = torch.multinomial(probs, 1, generator=sampler_gen).squeeze(1)
                        loss = criterion(logits, y) / B
                        grads = torch.autograd.grad(loss, weights)
                    for part, g in zip(parts, grads):
                        if filled == 0:
                            part.copy_(g.reshape(-1))
                        else:
                            part.add_(g.reshape(-1))
                    filled += y.shape[0]
                row.mul_(alive)  # pruned coordinates exactly 0 (they are already, through weight * mask)
                if offload:
                    G[i].copy_(row)
        finally:
            for w, r in zip(weights, requires):
                w.requires_grad_(r)
            self.model.train(was_training)
        return G
