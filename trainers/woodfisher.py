"""WoodFisher: gradual second-order (OBS) pruning of a trained network (Singh & Alistarh, NeurIPS 2020).

``--trainer woodfisher`` trains the weights (every parameter but the scores, which are unused and
frozen) and, at each pruning epoch of the schedule, before that epoch's training, takes one OBS
step with the shared solver (``pruning.solver.OBSSolver``): m gradients from a sample stream of
its own, the block inverse of the damped empirical Fisher, the method's statistic, the shared
selector (global with ``--woodburry-joint-sparsify``, else per layer; exactly n_keep(k, N) units,
and exactly the run's ``--k`` at the final target), the OBS update (joint or summed, ``--obs-solve``)
and the new masks. Then it clears the pruned coordinates of the optimizer state and logs the event.
This file is the schedule around that step:

- AGP events from ``--prune-start`` to ``--prune-end`` every ``--prune-freq`` epochs, from
  ``--init-sparsity`` to 1 - k; ``--recompute-num`` sub-steps per event from the CURRENT sparsity,
  each with a fresh Fisher; ``--one-shot``: one event at epoch 0 and no training.
- between events the base trainer's loop fine-tunes the weights, with the masks re-applied after
  every optimizer step, so pruned weights stay exactly zero (momentum, weight decay, Adam).
- FLOPs-aware pruning (``pruning.flops``; FLOPs measured once, and only when asked for):
  ``--flops-power p`` divides every statistic by (FLOPs per weight of its layer)^p before a global
  selection; ``--flops-target f --k 1`` runs AGP over FLOPs sparsity and keeps, per step, the
  largest ranked prefix of units within the FLOPs budget, then applies ONE update for that set.

Supported granularities per method: see ``pruning.methods`` (filter/channel: group OBS on
whole-layer blocks).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from configs.errors import UserError
from engine.memory import MemoryNeed
from engine.optim import OptimSettings, own_only, split_parameters
from layers.selector import unit_counts
from pruning.flops import flops_per_weight, select_within_flops, weight_by_flops
from pruning.methods import PRUNE_METHODS, PruneMethod, granularity_note
from pruning.schedule import PruneEvent, agp_schedule, one_shot_schedule, recompute_steps
from pruning.solver import FisherSettings, OBSSolver, StepRecord
from trainers.base import BaseTrainer
from trainers.registry import register_trainer

OBS_SOLVES = ("joint", "sum")
FISHER_STREAM = 0x5F  # sample stream of the Fisher mini-batches (independent of the training streams)
FLOPS_STREAM = 0x5E   # the one input FLOPs are measured on


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
    fisher_damp: float | None = None  # None: the method's default_damp
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
    obs_solve: str = "joint"
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
                             flops_target: float | None = None, obs_solve: str = "joint",
                             seed: int = 0) -> WoodFisherOptions:
    """Validate the WoodFisher options of a run (UserError naming the fix) and return them typed."""
    if mode != "prune":
        raise UserError(f"the woodfisher trainer prunes: use --exp-mode prune (got {mode})")
    prune_method = PRUNE_METHODS.resolve(prune_method)
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
    if obs_solve not in OBS_SOLVES:
        raise UserError(f"--obs-solve must be one of {', '.join(OBS_SOLVES)}, got {obs_solve!r}")
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
        obs_solve=obs_solve, seed=seed)


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


@register_trainer("woodfisher")
class WoodFisherTrainer(BaseTrainer):
    """Gradual OBS pruning (see the module docstring)."""

    option_names = ("seed", "prune_method", "target_sparsity", "init_sparsity", "prune_start", "prune_freq",
                    "prune_end", "agp_power", "one_shot", "fisher_subsample_size", "fisher_mini_bsz",
                    "max_mini_bsz", "fisher_damp", "fittable_params", "fisher_blocks", "true_fisher",
                    "offload_grads", "woodburry_joint_sparsify", "scale_prune_update", "recompute_num",
                    "recompute_schedule", "disable_wdecay_after_prune", "flops_power", "flops_target", "obs_solve")

    @classmethod
    def check_options(cls, **settings) -> None:
        check_woodfisher_options(**settings)

    @classmethod
    def memory_needs(cls, *, per_sample_bytes: int, batch_size: int, model_bytes: int, masked_weights: int,
                     on_gpu: bool, **options) -> list[MemoryNeed]:
        """Training's needs plus the m x D gradient matrix."""
        needs = super().memory_needs(per_sample_bytes=per_sample_bytes, batch_size=batch_size,
                                     model_bytes=model_bytes, masked_weights=masked_weights, on_gpu=on_gpu)
        method = options.get("prune_method", "woodfisher")
        if method in PRUNE_METHODS and PRUNE_METHODS[method].fisher is None:
            return needs
        return needs + fisher_memory_needs(masked_weights=masked_weights, on_gpu=on_gpu,
                                           per_sample_bytes=per_sample_bytes, **options)

    def setup(self, *, weights: OptimSettings, masks: OptimSettings | None, freeze_bn: bool, **options) -> None:
        if self.mode != "prune" or self.maskset is None:
            raise ValueError("the woodfisher trainer prunes: it needs mode 'prune' and masked layers")
        ms = self.maskset
        self.opts = check_woodfisher_options(mode=self.mode, layer_type=ms.granularity, k=ms.k, scope=ms.scope,
                                             epochs=weights.epochs, **options)
        self.method: PruneMethod = PRUNE_METHODS[self.opts.prune_method]
        self.k = ms.k
        self.granularity = ms.granularity
        self.scope = self.method.scope or ("global" if self.opts.woodburry_joint_sparsify else "layer")
        self.events = self.opts.schedule()
        self.history: list[dict] = []  # one record per pruning sub-step
        self._notes: list[str] = []
        # FLOPs per weight by layer, measured at the first event, and only for FLOPs-aware pruning
        # (architecture and input size only, so never re-measured; a resumed run measures the same).
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

    def alive_units(self) -> int:
        return int(sum(self._alive_units(layer.mask).sum() for layer in self.maskset.layers.values()))

    def current_sparsity(self) -> float:
        """Fraction of units (weights, filters or channels) pruned now, over all masked layers."""
        total = sum(unit_counts([layer.mask.shape for layer in self.maskset.layers.values()], self.granularity))
        return 1.0 - self.alive_units() / total

    # -- FLOPs -----------------------------------------------------------------------------------
    def _needs_flops(self) -> bool:
        return self.opts.flops_power != 0 or self.opts.flops_target is not None

    def measure_flops(self, loaders) -> None:
        """FLOPs per weight of every masked layer, from one training input, once; only for FLOPs-aware
        pruning. The input comes from a sample stream of its own, so training's streams do not move."""
        if self.flops is not None or not self._needs_flops():
            return
        if loaders is None:
            raise ValueError("FLOPs-aware pruning needs training data to measure FLOPs per weight (loaders)")
        x, _ = next(loaders.stream(FLOPS_STREAM, epoch=0, batch_size=1))
        self.flops = flops_per_weight(self.model, example=x.to(self.device), layers=self.maskset.layers)

    def dense_flops(self) -> int:
        return sum(layer.weight.numel() * self.flops[name] for name, layer in self.maskset.layers.items())

    def kept_flops_fraction(self) -> float | None:
        """Kept FLOPs of the masked layers over their dense FLOPs (None without FLOPs-aware pruning)."""
        if self.flops is None:
            return None
        kept = sum(int(layer.mask.sum()) * self.flops[name] for name, layer in self.maskset.layers.items())
        return kept / self.dense_flops()

    def schedule_sparsity(self) -> float:
        """Where the schedule stands now: FLOPs sparsity with --flops-target, unit sparsity otherwise."""
        if self.opts.flops_target is not None:
            return 1.0 - self.kept_flops_fraction()
        return self.current_sparsity()

    # -- a pruning event -------------------------------------------------------------------------
    def prune_to(self, sparsity: float, *, epoch: int, loaders) -> None:
        """Prune from the current sparsity to ``sparsity`` in ``recompute_num`` sub-steps (sparsity of
        FLOPs with --flops-target, of units otherwise)."""
        self.measure_flops(loaders)
        steps = recompute_steps(current=self.schedule_sparsity(), target=sparsity, num=self.opts.recompute_num,
                                kind=self.opts.recompute_schedule)
        for i, s in enumerate(steps):
            self.prune_step(s, epoch=epoch, substep=i, substeps=len(steps), loaders=loaders)

    def fisher_batches(self, loaders, *, epoch: int, substep: int):
        """The Fisher's sample stream of one (sub-)step: a function of (seed, epoch, substep) only."""
        if loaders is None:
            raise ValueError(f"prune method {self.method.name} needs training data for its Fisher (loaders)")
        return loaders.stream(FISHER_STREAM, epoch=epoch * 1000 + substep,
                              batch_size=min(256, self.opts.fisher_subsample_size * self.opts.fisher_mini_bsz))

    def collect_gradients(self, loaders, *, epoch: int, substep: int = 0) -> torch.Tensor:
        """G (m x D) of one (sub-)step, labels from the data or, with --true-fisher, from the model."""
        generator = None
        if self.opts.true_fisher:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(derive_label_seed(self.opts.seed, epoch, substep))
        solver = self.solver()
        solver.collect(self.model, self.fisher_batches(loaders, epoch=epoch, substep=substep),
                       label_smoothing=self.criterion.label_smoothing, label_generator=generator)
        return solver.G

    def solver(self) -> OBSSolver:
        return OBSSolver(self.maskset.layers, granularity=self.granularity, method=self.method,
                         fisher=fisher_settings(self.opts), device=self.device)

    def prune_step(self, sparsity: float, *, epoch: int, substep: int = 0, substeps: int = 1, loaders=None) -> dict:
        """One OBS step to ``sparsity``: gradients, inverse, statistic, selection, update, masks."""
        t0 = time.perf_counter()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
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
        solver = self.solver()
        if self.method.fisher is not None:
            t_grads = time.perf_counter()
            solver.add_gradients(self.collect_gradients(loaders, epoch=epoch, substep=substep),
                                 seconds=time.perf_counter() - t_grads)
        scale, joint = self.opts.scale_prune_update, self.opts.obs_solve == "joint"
        search: dict = {}
        if self.flops is not None:
            scores = solver.scores()
            if self.opts.flops_power:
                scores = weight_by_flops(scores, flops=self.flops, power=self.opts.flops_power,
                                         granularity=self.granularity)
            if flops_fraction is not None:
                shapes = {n: layer.weight.shape for n, layer in self.maskset.layers.items()}
                new, search = select_within_flops(scores, shapes=shapes, alive_units=self.alive_units(),
                                                  flops=self.flops, granularity=self.granularity,
                                                  min_units=self.maskset.min_units, fraction=flops_fraction)
                record = solver.compensate(new, scale=scale, joint=joint)
            else:
                solver.prune_to(density, scope=self.scope, min_units=self.maskset.min_units, scale=scale,
                                joint=joint, scores=scores)
                record = solver.record
        else:
            solver.prune_to(density, scope=self.scope, min_units=self.maskset.min_units, scale=scale, joint=joint)
            record = solver.record
        solver.release()
        self.maskset.set_masks({name: layer.mask for name, layer in self.maskset.layers.items()})
        self.clear_pruned_state()
        seconds = time.perf_counter() - t0
        out = {"epoch": epoch, "substep": substep, "target": sparsity, "before": before,
               "sparsity": self.current_sparsity(), "seconds": seconds, "grad_seconds": record.grad_seconds,
               "grads_bytes": record.grads_bytes, "inverse_peak_bytes": record.inverse_peak_bytes,
               "peak_bytes": record.grads_bytes + record.inverse_peak_bytes, "solve": record.solve,
               "flops_before": flops_before, "flops_kept": self.kept_flops_fraction(), **search}
        if cuda:
            out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
        self.history.append(out)
        self._notes.append(self._event_line(out, record, epoch=epoch, substep=substep, substeps=substeps,
                                            sparsity=sparsity, flops_fraction=flops_fraction))
        return out

    def _event_line(self, out: dict, record: StepRecord, *, epoch: int, substep: int, substeps: int,
                    sparsity: float, flops_fraction: float | None) -> str:
        o = self.opts
        blocks = ("whole layer" if self.granularity != "unstructured" and self.method.group_statistic is not None
                  else o.fisher_blocks + (f" {o.fittable_params}" if o.fisher_blocks == "chunk" else ""))
        fisher = (f", m {o.fisher_subsample_size} x {o.fisher_mini_bsz} samples, blocks {blocks}, damp "
                  f"{fisher_settings(o).damp:g}, update {record.solve}" if self.method.fisher else "")
        cuda_text = f", CUDA peak {_mib(out['cuda_peak_bytes']):.1f} MiB" if "cuda_peak_bytes" in out else ""
        notes = "".join(f"; {n}" for n in record.notes)
        return (f"prune epoch {epoch} step {substep + 1}/{substeps}: {self.method.name} ({self.scope}{fisher}"
                + (f", flops power {o.flops_power:g}" if o.flops_power else "") + ") "
                + self._progress_text(out, sparsity=sparsity, flops_fraction=flops_fraction)
                + f" in {out['seconds']:.2f}s (gradients {out['grad_seconds']:.2f}s); peak memory "
                f"{_mib(out['peak_bytes']):.1f} MiB (gradients {_mib(out['grads_bytes']):.1f} + inverse "
                f"{_mib(out['inverse_peak_bytes']):.1f}){cuda_text}{notes}")

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


def derive_label_seed(seed: int, epoch: int, substep: int) -> int:
    from data.sampling import derive_seed
    return derive_seed(seed, FISHER_STREAM, epoch, substep, 1)


def fisher_settings(opts) -> FisherSettings:
    """The solver's Fisher settings from the run's options (the WoodFisher flags)."""
    damp = opts.fisher_damp if opts.fisher_damp is not None else PRUNE_METHODS[opts.prune_method].default_damp
    return FisherSettings(m=opts.fisher_subsample_size, samples_per_grad=opts.fisher_mini_bsz,
                          max_samples=opts.max_mini_bsz, damp=damp, block_size=opts.fittable_params,
                          blocks=opts.fisher_blocks, offload=opts.offload_grads)


def fisher_memory_needs(*, masked_weights: int, on_gpu: bool, per_sample_bytes: int, **options) -> list[MemoryNeed]:
    """The m x D gradient matrix and one Fisher forward's activations (``engine.memory``)."""
    m = options.get("fisher_subsample_size", 100)
    offload = bool(options.get("offload_grads")) and on_gpu
    hint = "" if offload or not on_gpu else ", or pass --offload-grads to keep them in host memory"
    mini = options.get("fisher_mini_bsz", 1)
    chunk = min(mini, options.get("max_mini_bsz") or mini)
    return [MemoryNeed(f"the {m} x {masked_weights:,} Fisher gradients", m * masked_weights * 4, offload,
                       f"lower --fisher-subsample-size{hint}"),
            MemoryNeed(f"the activations of a Fisher mini-batch chunk of {chunk}", per_sample_bytes * chunk, False,
                       "pass --max-mini-bsz to split each --fisher-mini-bsz batch into smaller chunks")]
