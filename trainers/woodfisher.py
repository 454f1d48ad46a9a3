"""WoodFisher: gradual second-order (OBS) pruning of a trained network (Singh & Alistarh, NeurIPS 2020).

``--trainer woodfisher`` trains the weights (every parameter but the scores, which are unused and
frozen) and, at each pruning epoch of the schedule, before that epoch's training, takes one OBS
step with the shared solver (``pruning.solver.OBSSolver``): m gradients from a sample stream of
its own, the block inverse of the damped empirical Fisher, the method's statistic, the shared
selector (global with ``--woodburry-joint-sparsify``, else per layer; exactly n_keep(k, N) units,
and exactly the run's ``--k`` at the final target), the OBS update (joint or summed, ``--obs-solve``)
and the new masks. Then it clears the pruned coordinates of the optimizer state and logs the event.
This file runs the plan around that step (``pruning.plan``: the target, lambda and the events):

- AGP events from ``--prune-start`` to ``--prune-end`` every ``--prune-freq`` epochs, from
  ``--init-sparsity`` to 1 - k; ``--recompute-num`` sub-steps per event from the CURRENT sparsity,
  each with a fresh Fisher; ``--one-shot``: one event at epoch 0 and no training; N:M masks: one
  event at ``--prune-end``.
- between events the base trainer's loop fine-tunes the weights, with the masks re-applied after
  every optimizer step, so pruned weights stay exactly zero (momentum, weight decay, Adam).
- FLOPs-aware pruning (``pruning.flops``; FLOPs measured once, and only when asked for):
  ``--flops-power p`` divides every statistic by (FLOPs per weight of its layer)^p before a global
  selection; ``--flops-target f --k 1`` runs AGP over FLOPs sparsity and keeps, per step, the
  largest ranked prefix of units within the FLOPs budget, then applies ONE update for that set.

The weight steps between events train on ``--objective`` (the base trainer's step). The Fisher's
gradients stay natural (the cross-entropy on clean inputs): a robust Fisher would need an attack
per gradient row (m of them per event), and the OBS statistic only ranks weights by the curvature
around the current ones; the robust fine-tuning between events then adapts the survivors.

Supported granularities per method: see ``pruning.methods`` (filter/channel: group OBS on
whole-layer blocks; the unit criteria fpgm and taylorfo score each filter/channel with no inverse, and
taylorfo reads the same m gradient rows as the Fisher). With ``--coupled`` a unit is a dependency group
of filters across layers (``layers.coupling``): it ranks by its group OBS statistic summed over its
layers (a unit criterion: its filters' scores summed), the selector keeps whole units, and the schedule
counts units.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch

from configs.capabilities import Capabilities, RunSpec
from configs.errors import UserError
from configs.options import OptionSection, WoodFisherOptions
from data.sampling import derive_seed, shard
from engine.memory import MemoryNeed, fisher_memory_needs
from engine.optim import OptimSettings
from layers import MaskSet
from layers.selector import STRUCTURED, alive_units, unit_counts
from pruning.cost import kept_flops
from pruning.flops import flops_per_weight, select_within_flops, weight_by_flops
from pruning.methods import PRUNE_METHODS, PruneMethod
from pruning.plan import plan
from pruning.schedule import layer_densities, recompute_steps
from pruning.solver import FisherSettings, OBSSolver, StepRecord, collect_rows
from trainers.fixed_masks import FixedMaskTrainer
from trainers.registry import register_trainer

if TYPE_CHECKING:  # annotations only
    from data.loaders import Loaders

FISHER_STREAM = 0x5F  # sample stream of the Fisher mini-batches (independent of the training streams)
FLOPS_STREAM = 0x5E   # the one input FLOPs are measured on


def _mib(n: int) -> float:
    return n / 2**20


@register_trainer("woodfisher")
class WoodFisherTrainer(FixedMaskTrainer):
    """Gradual OBS pruning (see the module docstring)."""

    capabilities = Capabilities(label="woodfisher", fisher_rows=True,
                                obs_update="applies the OBS update at every pruning event already",
                                k_schedule="prunes on its own schedule (--prune-start, --prune-end, --prune-schedule)")
    Options = WoodFisherOptions
    maskset: MaskSet  # never None here: setup() refuses a run without masked layers

    @classmethod
    def check_options(cls, options: OptionSection | None, *, run: RunSpec) -> None:
        plan(cast(WoodFisherOptions, options), run=run)  # train.py passes this trainer's Options

    @classmethod
    def memory_needs(cls, *, per_sample_bytes: int, batch_size: int, model_bytes: int, masked_weights: int,
                     on_gpu: bool, options: OptionSection | None = None) -> list[MemoryNeed]:
        """Training's needs plus the m x D gradient matrix."""
        needs = super().memory_needs(per_sample_bytes=per_sample_bytes, batch_size=batch_size,
                                     model_bytes=model_bytes, masked_weights=masked_weights, on_gpu=on_gpu)
        opts = cast(WoodFisherOptions, options or WoodFisherOptions())  # this trainer's Options
        if opts.prune_method in PRUNE_METHODS and PRUNE_METHODS[opts.prune_method].fisher is None:
            return needs
        return needs + fisher_memory_needs(opts, masked_weights=masked_weights, on_gpu=on_gpu,
                                           per_sample_bytes=per_sample_bytes)

    def setup(self, *, weight_optim: OptimSettings, score_optim: OptimSettings | None, freeze_bn: bool) -> None:
        if self.mode != "prune" or self.maskset is None:
            raise ValueError("the woodfisher trainer prunes: it needs mode 'prune' and masked layers")
        ms = self.maskset
        self.opts = cast(WoodFisherOptions, self.options)  # this trainer's Options (train.py, or the defaults)
        self.plan = plan(self.opts, run=RunSpec(mode=self.mode, layer_type=ms.granularity, k=ms.k, scope=ms.scope,
                                                epochs=weight_optim.epochs, coupled=ms.coupling is not None))
        self.method: PruneMethod = PRUNE_METHODS.get(self.opts.prune_method)
        self.k = ms.k
        self.granularity = ms.granularity
        self.scope = self.method.scope or ("global" if self.opts.woodbury_joint_sparsify else "layer")
        if ms.coupling is not None and self.method.group_statistic is not None:
            unequal = [n for n in ms.layers if ms.coupling.filters_per_unit(n) is None]
            if unequal:
                raise UserError(f"--coupled with --prune-method {self.method.name}: the coupled units of {unequal[0]} "
                                "hold unequal numbers of its filters, so no one group OBS statistic ranks them; "
                                f"keep it dense with --exclude-layers {unequal[0]} or drop --coupled")
        self.events = list(self.plan.events)
        self.history: list[dict] = []  # one record per pruning sub-step
        self._notes: list[str] = []
        if ms.nm is not None and not self.opts.one_shot:
            self._notes.append(f"N:M {ms.nm[0]}:{ms.nm[1]}: one pruning event at epoch {self.events[0].epoch} "
                               "(--prune-end); --prune-start, --prune-freq, --init-sparsity and --agp-power do not "
                               "apply")
        # FLOPs per weight by layer, measured at the first event, and only for FLOPs-aware pruning
        # (architecture and input size only, so never re-measured; a resumed run measures the same).
        self.flops: dict[str, int] | None = None
        self.fisher = FisherSettings.of(self.opts, damp=self.plan.damp, hessian_probes=self.opts.hessian_probes)
        self.setup_weights(weight_optim=weight_optim, freeze_bn=freeze_bn)

    # -- hooks used by the epoch loop ------------------------------------------------------------
    def set_epoch(self, epoch: int) -> dict[str, float]:
        lrs = super().set_epoch(epoch)
        last = self.events[-1].epoch if self.events else 0
        if self.opts.disable_wdecay_after_prune and epoch >= last:
            for opt in self.optimizers.values():
                for group in opt.param_groups:
                    group["weight_decay"] = 0.0
        return lrs

    def train_epoch(self, epoch: int, loaders: Loaders) -> dict[str, float]:
        for event in self.events:
            if event.epoch == epoch:
                self.prune_to(event.sparsity, epoch=epoch, loaders=loaders)
        if self.opts.one_shot:  # no training: the loop evaluates the pruned model
            nan = float("nan")
            return {"loss": nan, "top1": nan, "top5": nan}
        return super().train_epoch(epoch, loaders)

    def final_masks(self, epoch: int) -> bool:
        """Only epochs from the last pruning event on compete for model_best."""
        return not self.events or epoch >= self.events[-1].epoch

    def summary_fields(self) -> dict[str, Any]:
        """The report names a WoodFisher run by its criterion (woodfisher, globalmagnitude, ...)."""
        return {"prune_method": self.method.name, "method": self.method.name}

    def pop_notes(self) -> list[str]:
        notes, self._notes = self._notes, []
        return notes

    # -- masks ----------------------------------------------------------------------------------
    def alive_units(self) -> int:
        """Units (weights, filters, channels, or coupled dependency groups) alive now, over all masked layers."""
        coupling = self.maskset.coupling
        if coupling is not None:
            return int(coupling.alive_units({n: layer.mask for n, layer in self.maskset.layers.items()}))
        layers = self.maskset.layers.values()
        return int(sum(alive_units(layer.mask, self.granularity).sum() for layer in layers))

    def current_sparsity(self) -> float:
        """Fraction of units (weights, filters, channels, or coupled groups) pruned now, over all masked layers."""
        if self.maskset.coupling is not None:
            total = self.maskset.coupling.units
        else:
            total = sum(unit_counts([layer.mask.shape for layer in self.maskset.layers.values()], self.granularity))
        return 1.0 - self.alive_units() / total

    # -- FLOPs -----------------------------------------------------------------------------------
    def _needs_flops(self) -> bool:
        return self.opts.flops_power != 0 or self.opts.flops_target is not None

    def measure_flops(self, loaders: Loaders | None) -> None:
        """FLOPs per weight of every masked layer, from one training input, once; only for FLOPs-aware
        pruning. The input comes from a sample stream of its own, so training's streams do not move."""
        if self.flops is not None or not self._needs_flops():
            return
        if loaders is None:
            raise ValueError("FLOPs-aware pruning needs training data to measure FLOPs per weight (loaders)")
        x, _ = next(loaders.stream(FLOPS_STREAM, epoch=0, batch_size=1))
        self.flops = flops_per_weight(self.model, example=x.to(self.device), layers=self.maskset.layers)

    def kept_flops_fraction(self) -> float | None:
        """Kept FLOPs of the masked layers over their dense FLOPs (None without FLOPs-aware pruning)."""
        if self.flops is None:
            return None
        kept, dense = kept_flops(self.maskset.layers, self.flops)
        return kept / dense

    def schedule_sparsity(self) -> float:
        """Where the schedule stands now: FLOPs sparsity with --flops-target, unit sparsity otherwise."""
        if self.opts.flops_target is not None:
            kept = self.kept_flops_fraction()
            assert kept is not None  # --flops-target is FLOPs-aware: measured by prune_to/prune_step first
            return 1.0 - kept
        return self.current_sparsity()

    # -- a pruning event -------------------------------------------------------------------------
    def prune_to(self, sparsity: float, *, epoch: int, loaders: Loaders | None) -> None:
        """Prune from the current sparsity to ``sparsity`` in ``recompute_num`` sub-steps (sparsity of
        FLOPs with --flops-target, of units otherwise)."""
        self.measure_flops(loaders)
        steps = recompute_steps(current=self.schedule_sparsity(), target=sparsity, num=self.opts.recompute_num,
                                kind=self.opts.recompute_schedule)
        for i, s in enumerate(steps):
            self.prune_step(s, epoch=epoch, substep=i, substeps=len(steps), loaders=loaders)

    def fisher_batches(self, loaders: Loaders | None, *, epoch: int, substep: int,
                       skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The Fisher's sample stream of one (sub-)step: a function of (seed, epoch, substep) only;
        ``skip``: from that sample on (a distributed rank's block of rows)."""
        if loaders is None:
            raise ValueError(f"prune method {self.method.name} needs training data for its Fisher (loaders)")
        return loaders.stream(FISHER_STREAM, epoch=epoch * 1000 + substep, skip=skip,
                              batch_size=min(256, self.opts.fisher_subsample_size * self.opts.fisher_mini_bsz))

    def collect_gradients(self, loaders: Loaders | None, *, epoch: int, substep: int = 0) -> torch.Tensor:
        """G (m x D) of one (sub-)step, labels from the data or, with --true-fisher, from the model.
        Distributed: each rank computes its block of the m rows (the same samples one process would
        use for them) and the blocks are gathered, so every rank holds the same m global rows."""
        start, stop = shard(self.fisher.m, self.group.rank, self.group.world)
        generator = None
        if self.opts.true_fisher:  # a rank's labels are drawn from its own seed (+ its first row)
            generator = torch.Generator(device=self.device)
            generator.manual_seed(derive_label_seed(self.seed, epoch, substep) + start)
        batches = self.fisher_batches(loaders, epoch=epoch, substep=substep, skip=start * self.fisher.samples_per_grad)
        G = collect_rows(self.model, self.maskset.layers, batches, fisher=self.fisher, device=self.device,
                         rows=stop - start, label_smoothing=self.criterion.label_smoothing,
                         label_generator=generator)
        return self.group.gather_rows(G, self.fisher.m)

    def solver(self) -> OBSSolver:
        return OBSSolver(self.maskset.layers, granularity=self.granularity, method=self.method, nm=self.maskset.nm,
                         fisher=self.fisher, device=self.device, coupling=self.maskset.coupling)

    def prune_step(self, sparsity: float, *, epoch: int, substep: int = 0, substeps: int = 1,
                   loaders: Loaders | None = None) -> dict:
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
        final = sparsity == self.plan.target
        flops_fraction = None
        if self.opts.flops_target is not None:
            flops_fraction = self.opts.flops_target if final else 1.0 - sparsity
        density = self.k if final else 1.0 - sparsity
        # --layer-k: every layer at the run's fraction of its own removals (its own density at the last event)
        per_layer = self.maskset.layer_k
        layer_k = None if per_layer is None else layer_densities(per_layer, k=self.k, density=density)
        solver = self.solver()
        if self.method.fisher is not None:
            t_grads = time.perf_counter()
            solver.add_gradients(self.collect_gradients(loaders, epoch=epoch, substep=substep),
                                 seconds=time.perf_counter() - t_grads)
        if self.method.probe is not None:  # apoz/meanact/naivehess/kfac: the Fisher's samples; slimming: gammas
            calibration = self.fisher_batches(loaders, epoch=epoch, substep=substep) \
                if self.method.reads_samples else None
            solver.probe(self.model, calibration, samples=self.fisher.m * self.fisher.samples_per_grad)
        scale, joint = self.opts.scale_prune_update, self.opts.obs_solve == "joint"
        search: dict = {}
        if self.flops is not None:
            ranking = solver.scores()  # the OBS statistic, weight-shaped for the selector
            if self.opts.flops_power:
                ranking = weight_by_flops(ranking, flops=self.flops, power=self.opts.flops_power,
                                         granularity=self.granularity)
            if flops_fraction is not None:
                shapes = {n: layer.weight.shape for n, layer in self.maskset.layers.items()}
                new, search = select_within_flops(ranking, shapes=shapes, alive_units=self.alive_units(),
                                                  flops=self.flops, granularity=self.granularity,
                                                  min_units=self.maskset.min_units, fraction=flops_fraction)
                record = solver.compensate(new, scale=scale, joint=joint)
            else:
                solver.prune_to(density, scope=self.scope, min_units=self.maskset.min_units, scale=scale,
                                joint=joint, scores=ranking, layer_k=layer_k)
                record = solver.record
        else:
            solver.prune_to(density, scope=self.scope, min_units=self.maskset.min_units, scale=scale, joint=joint,
                            layer_k=layer_k)
            record = solver.record
        solver.release()
        self.group.broadcast_state(self.model)  # rank 0's result on every rank, bit for bit
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
        blocks = ("whole layer" if self.granularity in STRUCTURED and self.method.group_statistic is not None
                  else o.fisher_blocks + (f" {o.fittable_params}" if o.fisher_blocks == "chunk" else ""))
        rows = f", m {o.fisher_subsample_size} x {o.fisher_mini_bsz} samples"
        if self.method.fisher is None:
            fisher = ""
        elif self.method.builds_inverse:
            fisher = f"{rows}, blocks {blocks}, damp {self.plan.damp:g}, update {record.solve}"
        else:  # the gradient rows only (taylorfo): no blocks, no lambda
            fisher = f"{rows}, no inverse, update {record.solve}"
        # without an inverse, what the step holds beyond G is copies of its columns (channel order, host staging)
        work = "column copies" if self.method.fisher is not None and not self.method.builds_inverse else "inverse"
        cuda_text = f", CUDA peak {_mib(out['cuda_peak_bytes']):.1f} MiB" if "cuda_peak_bytes" in out else ""
        notes = "".join(f"; {n}" for n in record.notes)
        return (f"prune epoch {epoch} step {substep + 1}/{substeps}: {self.method.name} ({self.scope}{fisher}"
                + (f", flops power {o.flops_power:g}" if o.flops_power else "") + ") "
                + self._progress_text(out, sparsity=sparsity, flops_fraction=flops_fraction)
                + f" in {out['seconds']:.2f}s (gradients {out['grad_seconds']:.2f}s); peak memory "
                f"{_mib(out['peak_bytes']):.1f} MiB (gradients {_mib(out['grads_bytes']):.1f} + {work} "
                f"{_mib(out['inverse_peak_bytes']):.1f}){cuda_text}{notes}")

    def _progress_text(self, record: dict, *, sparsity: float, flops_fraction: float | None) -> str:
        """'sparsity a% -> b% (target t%), FLOPs kept x% -> y%', the FLOPs first and as the target
        with --flops-target."""
        # Unit sparsity: of weights, or of whole filters/channels (the run's summary reports weights).
        kind = self.granularity if self.granularity in STRUCTURED else "weight"
        if self.maskset.coupling is not None:
            kind = "coupled unit"
        units = f"{kind} sparsity {100 * record['before']:.2f}% -> {100 * record['sparsity']:.2f}%"
        if record["flops_kept"] is None:
            return f"{units} (target {100 * sparsity:.2f}%)"
        flops = f"FLOPs kept {100 * record['flops_before']:.2f}% -> {100 * record['flops_kept']:.2f}%"
        if flops_fraction is None:
            return f"{units} (target {100 * sparsity:.2f}%), {flops}"
        return f"{flops} (target {100 * flops_fraction:.2f}%), {units}"


def derive_label_seed(seed: int, epoch: int, substep: int) -> int:
    return derive_seed(seed, FISHER_STREAM, epoch, substep, 1)
