"""The plan of a gradual OBS pruning run: its final target, its lambda and its pruning events.

``plan`` validates the WoodFisher options against the run (a ``UserError`` naming the fix for what
no single option's own check can see) and settles them:

- the target: a sparsity of units, 1 - k (``--target-sparsity`` must agree), or of FLOPs,
  1 - ``--flops-target`` (with ``--k 1`` and a global selection);
- lambda: ``--fisher-damp``, else the prune method's default;
- the events (``pruning.schedule``): AGP from ``--prune-start`` to ``--prune-end`` every
  ``--prune-freq`` epochs, from ``--init-sparsity`` to the target; ``--one-shot``: one event at epoch
  0 and ``--epochs 1``. N:M masks: ONE event, at ``--prune-end`` (or epoch 0 with ``--one-shot``),
  straight to N:M: an AGP schedule's intermediate sparsities have no N:M mask (2:4 is the first and
  only step of a 4-group), so the event is where AGP would reach its target; options that change how
  many weights a layer keeps are refused, since N:M fixes N/M in every group.
"""
from __future__ import annotations

from dataclasses import dataclass

from configs.capabilities import RunSpec
from configs.errors import UserError
from configs.options import WoodFisherOptions
from layers.selector import STRUCTURED
from pruning.hessian import read_hessian_diagonal
from pruning.methods import PRUNE_METHODS, PruneMethod, granularity_note
from pruning.schedule import DensitySchedule, PruneEvent, agp_schedule, gradual_events, one_shot_schedule


@dataclass(frozen=True)
class Plan:
    """What the typed options and the run settle: the final target (a sparsity of units, or of FLOPs
    with --flops-target), lambda (the method's default unless given) and the schedule."""

    target: float
    damp: float
    events: tuple[PruneEvent, ...]


def plan(options: WoodFisherOptions, *, run: RunSpec) -> Plan:
    """Validate the WoodFisher options against the run (UserError naming the fix) and settle them.
    Each option's own range is checked where it is declared (configs.options)."""
    o = options
    o.check_values()
    if run.mode != "prune":
        raise UserError(f"the woodfisher trainer prunes: use --exp-mode prune (got {run.mode})")
    method = PRUNE_METHODS.get(o.prune_method)
    if run.layer_type not in method.granularities:
        raise UserError(f"--prune-method {method.name} does not support --layer-type {run.layer_type}; "
                        f"supported: {granularity_note()}")
    if o.hessian_probes and method.curvature is not read_hessian_diagonal:
        raise UserError(f"--hessian-probes estimates the Hessian diagonal of --prune-method naivehess, and "
                        f"{method.name} reads none: drop --hessian-probes or use --prune-method naivehess")
    nm = run.layer_type == "nm"
    if run.coupled and (o.flops_target is not None or o.flops_power):
        raise UserError("--flops-target/--flops-power rank single filters by their layer's FLOPs, not coupled units "
                        "spanning layers: drop --coupled or the FLOPs option")
    if nm:
        _check_nm(o)
    if run.layer_type in STRUCTURED and o.fisher_blocks == "all" and method.group_statistic is not None:
        raise UserError(f"--layer-type {run.layer_type} with --prune-method {method.name} uses whole-layer Fisher "
                        "blocks (a filter/channel's update must reach the other groups of its layer): drop "
                        "--fisher-blocks all")
    if o.flops_target is None:
        target = _weight_target(k=run.k, target_sparsity=o.target_sparsity)
    else:
        target = _flops_sparsity_target(flops_target=o.flops_target, k=run.k, target_sparsity=o.target_sparsity,
                                        method=method, scope=run.scope, joint_sparsify=o.woodbury_joint_sparsify)
    if o.one_shot:
        if run.epochs != 1:
            raise UserError("--one-shot prunes once and evaluates without training: pass --epochs 1 "
                            f"(got {run.epochs})")
        events = one_shot_schedule(target=target, epoch=0)
    elif nm:
        if run.epochs <= o.prune_end:
            raise UserError(f"--layer-type nm prunes once, at the start of epoch {o.prune_end} (0-based, --prune-end), "
                            f"but --epochs {run.epochs} stops before it: pass --epochs {o.prune_end + 1} or more")
        events = [PruneEvent(o.prune_end, target)]
    else:
        if not 0.0 <= o.init_sparsity <= target:
            what = "FLOPs sparsity 1 - --flops-target" if o.flops_target is not None else "sparsity"
            raise UserError(f"--init-sparsity must be in [0, target {what} {target:g}], got {o.init_sparsity:g}")
        if o.prune_end < o.prune_start:
            raise UserError(f"--prune-end ({o.prune_end}) must be >= --prune-start ({o.prune_start})")
        if run.epochs <= o.prune_end:
            raise UserError(f"the last pruning event runs at the start of epoch {o.prune_end} (0-based, --prune-end), "
                            f"but --epochs {run.epochs} stops before it: pass --epochs {o.prune_end + 1} or more")
        events = _gradual_events(o, target=target)
    if not nm and run.scope == "layer" and o.woodbury_joint_sparsify and method.scope is None:
        raise UserError("--scope layer asks for per-layer selection but --woodbury-joint-sparsify (the default) "
                        "selects globally: pass --no-woodbury-joint-sparsify (or --scope global)")
    return Plan(target=target, damp=method.damp(o.fisher_damp), events=tuple(events))


def _gradual_events(o: WoodFisherOptions, *, target: float) -> list[PruneEvent]:
    """The events from --prune-start to --prune-end under --prune-schedule (AGP with --agp-power by default)."""
    if o.prune_schedule == "agp":  # the public code's formula, float for float
        return agp_schedule(start=o.prune_start, freq=o.prune_freq, end=o.prune_end, initial=o.init_sparsity,
                            target=target, power=o.agp_power)
    try:
        shape = DensitySchedule.parse(o.prune_schedule)
    except ValueError as exc:
        raise UserError(f"--prune-schedule {o.prune_schedule}: {exc}") from None
    if shape.name == "agp":
        raise UserError("--prune-schedule agp takes its exponent from --agp-power: pass --prune-schedule agp "
                        f"--agp-power {int(shape.param or 3)}")
    return gradual_events(start=o.prune_start, freq=o.prune_freq, end=o.prune_end, initial=o.init_sparsity,
                          target=target, schedule=shape)


def _check_nm(o: WoodFisherOptions) -> None:
    """What N:M masks refuse: options that change how many weights a layer keeps."""
    if o.flops_target is not None:
        raise UserError("--flops-target chooses how many weights each layer keeps, but --layer-type nm keeps N/M of "
                        "every layer: drop --flops-target")
    if o.flops_power:
        raise UserError("--flops-power weighs layers against each other, but an N:M selection compares weights of "
                        "one group of one layer only: drop --flops-power")
    if o.recompute_num > 1:
        raise UserError("--recompute-num splits an event into intermediate sparsities, which N:M masks do not have "
                        "(--layer-type nm prunes to N:M in one event): drop --recompute-num")


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
                           scope: str, joint_sparsify: bool) -> float:
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
    if method.scope is None and not joint_sparsify:
        raise UserError("--flops-target ranks the units of all layers together: drop --no-woodbury-joint-sparsify")
    return 1.0 - flops_target
