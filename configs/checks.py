"""Every check across options, in one place: what no single option's own check can see.

Each option's own type, choices and range are checked where it is declared (``configs.options.opt``,
``Config.validate``). What is checked here needs several options, or the trainer's record
(``configs.capabilities``), or how many processes run:

- ``check_run``: before anything is built (train.py calls it once the run's config is settled):
  the general rules of modes, masks and sources, the trainer's record (its modes, --amp fp16,
  --obs-update, --rewind-epoch), its own option section's check, and what a run of several
  processes cannot honour;
- ``check_data``: once the training split's size is known.

A failed check is a ``UserError`` naming the problem and the fix.
"""
from __future__ import annotations

from collections.abc import Callable, Collection

from configs.capabilities import Capabilities, RunSpec, TrainerSpec
from configs.errors import UserError
from configs.options import RobustOptions, parse_nm, section_of
from configs.schema import Config


def uses_fisher(cfg: Config, capabilities: Capabilities) -> bool:
    """Whether the run collects Fisher gradient rows (a trainer that does, or --obs-update)."""
    return capabilities.fisher_rows or cfg.obs_update


Trainers = Collection[tuple[str, type[TrainerSpec]]]  # every registered trainer: (name, class)


def check_run(cfg: Config, *, trainer: type[TrainerSpec], registry: Trainers, world: int = 1,
              backend: str = "") -> None:
    """The checks of a run before anything is built (see the module docstring): ``trainer`` is the run's,
    ``registry`` every trainer (the errors name those that do what the run's cannot); ``world`` processes
    on ``backend`` (``engine.distributed``)."""
    _check_options(cfg, trainer, registry)
    if world > 1:
        _check_processes(cfg, trainer.capabilities, world=world, backend=backend)
    trainer.check_options(section_of(trainer.Options, cfg), run=RunSpec(mode=cfg.exp_mode, layer_type=cfg.layer_type,
                                                                         k=cfg.k, scope=cfg.scope, epochs=cfg.epochs,
                                                                         coupled=cfg.coupled))


def check_data(cfg: Config, *, capabilities: Capabilities, train_samples: int) -> None:
    """The checks that need the size of the training split."""
    if uses_fisher(cfg, capabilities) and cfg.fisher_mini_bsz > train_samples:
        raise UserError(f"--fisher-mini-bsz {cfg.fisher_mini_bsz} asks each Fisher gradient to average more samples "
                        f"than the {train_samples} of the training split: lower --fisher-mini-bsz")


def _check_options(cfg: Config, trainer: type[TrainerSpec], registry: Trainers) -> None:
    """Modes, masks, sources, and what the trainer's record says it runs and accepts."""
    caps, name = trainer.capabilities, trainer.name
    if cfg.exp_mode == "pretrain" and cfg.k != 1.0:
        raise UserError(f"pretrain trains every weight: --k must be 1.0 (got {cfg.k}); use --exp-mode prune to prune")
    if cfg.exp_mode in ("prune", "finetune") and cfg.layer_type == "dense":
        raise UserError(f"--exp-mode {cfg.exp_mode} needs a masked layer: pass --layer-type unstructured, filter, "
                        "channel or nm")
    if cfg.exp_mode in ("prune", "finetune") and not cfg.source_net and not cfg.resume:
        what = "a pretrained checkpoint" if cfg.exp_mode == "prune" else "a pruned checkpoint"
        raise UserError(f"--exp-mode {cfg.exp_mode} needs --source-net: pass {what} (.pth.tar)")
    if cfg.reset_head and not cfg.source_net:
        raise UserError("--reset-head replaces the classifier of --source-net; pass --source-net or drop --reset-head")
    if cfg.exp_mode == "pretrain" and cfg.exp_mode not in caps.modes:
        raise UserError(f"pretrain uses {_who(registry, lambda c: 'pretrain' in c.modes)}; drop --trainer {name} or "
                        "use --exp-mode prune")
    tuned = [flag for flag, changed in (("--obs-update-solver", cfg.obs_update_solver != "fisher"),
                                         ("--obs-update-steps", cfg.obs_update_steps != 1),
                                         ("--obs-update-samples", cfg.obs_update_samples is not None),
                                         ("--obs-update-percdamp", cfg.obs_update_percdamp != 0.01)) if changed]
    if tuned and not cfg.obs_update:
        raise UserError(f"{', '.join(tuned)} tune --obs-update, which this run does not do: pass --obs-update or drop "
                        f"{tuned[0]}")
    if cfg.obs_update_solver == "layerwise" and cfg.obs_update_steps != 1:
        raise UserError("--obs-update-steps splits the fisher solver's update; the layerwise solver is exact per "
                        "layer in one step: drop --obs-update-steps")
    if cfg.obs_update:
        if caps.obs_update is not None:
            raise UserError(f"--obs-update compensates a learned HYDRA/BiP mask; the {name} trainer {caps.obs_update}: "
                            "drop --obs-update")
        if cfg.exp_mode == "pretrain" or cfg.evaluate:
            what = "--evaluate changes no weight" if cfg.evaluate else "pretrain has no mask"
            raise UserError(f"--obs-update applies when a learned mask becomes fixed (prune, finetune); {what}: "
                            "drop --obs-update")
    if cfg.exp_mode not in caps.modes:
        hint = " (the mask comes from --source-net)" if cfg.exp_mode == "finetune" else ""
        raise UserError(f"{cfg.exp_mode} uses {_who(registry, lambda c: cfg.exp_mode in c.modes)}; drop --trainer "
                        f"{name}{hint}")
    if cfg.rewind_epoch is not None and cfg.exp_mode == "pretrain" and cfg.rewind_epoch >= cfg.epochs:
        raise UserError(f"--rewind-epoch {cfg.rewind_epoch} saves the weights after that many epochs, but pretrain "
                        f"runs {cfg.epochs}: pass a smaller --rewind-epoch (LTH rewinds to an early epoch, e.g. 2)")
    if cfg.rewind_epoch is not None and not (cfg.exp_mode == "pretrain" or caps.rewind_point):
        rewinding = " or ".join(f"--trainer {n}" for n, t in registry if t.capabilities.rewind_point)
        raise UserError(f"--rewind-epoch is for pretrain (which saves the weights) and {rewinding} (which rewinds to "
                        f"them); {cfg.exp_mode} with --trainer {name} does not rewind: drop --rewind-epoch")
    if cfg.amp == "fp16" and not caps.fp16:
        raise UserError(f"--amp fp16 needs loss scaling, which --trainer {name} does not implement: use --amp bf16 "
                        "(same speed on recent GPUs, no scaling needed)")
    if cfg.layer_type == "nm" and cfg.exp_mode in ("prune", "finetune"):
        _check_nm(cfg)
    if cfg.coupled:
        _check_coupled(cfg, caps, name)
    if cfg.k_schedule != "none":
        _check_k_schedule(cfg, caps, name)
    if cfg.layer_k is not None:
        _check_layer_k(cfg, caps, name)
    RobustOptions.of(cfg).check_combination(normalize=cfg.normalize)


def _who(registry: Trainers, does: Callable[[Capabilities], bool]) -> str:
    """'the base trainer' (or 'the a or b trainer'): the registered trainers whose record ``does``."""
    return "the " + " or ".join(n for n, t in registry if does(t.capabilities)) + " trainer"


def _check_coupled(cfg: Config, caps: Capabilities, name: str) -> None:
    if cfg.layer_type not in ("filter", "channel"):
        raise UserError(f"--coupled ties filters or channels across layers: it needs --layer-type filter or channel "
                        f"(got {cfg.layer_type}); drop --coupled or pass --layer-type filter")
    if caps.coupled is not None:
        raise UserError(f"--coupled applies to filters ranked per unit (HYDRA, BiP, WoodFisher); the {name} trainer "
                        f"{caps.coupled}: drop --coupled")
    if cfg.layer_floor is not None:
        raise UserError("--layer-floor does not apply with --coupled (units are dependency groups, not a layer's "
                        "filters): drop --layer-floor")


def _check_k_schedule(cfg: Config, caps: Capabilities, name: str) -> None:
    """--k-schedule anneals the density of learned masks (its name is checked where the schedule is built)."""
    if cfg.exp_mode != "prune":
        raise UserError(f"--k-schedule anneals the density while a mask is learned (--exp-mode prune); {cfg.exp_mode} "
                        "keeps its masks: drop --k-schedule")
    if caps.k_schedule is not None:
        raise UserError(f"--k-schedule anneals the k of learned masks (HYDRA, BiP); the {name} trainer "
                        f"{caps.k_schedule}: drop --k-schedule")
    if cfg.layer_type == "nm":
        raise UserError("--k-schedule anneals the density, which N:M masks fix at N/M: drop --k-schedule")
    if not cfg.k <= cfg.init_density <= 1.0:
        raise UserError(f"--init-density {cfg.init_density:g} must lie in [--k {cfg.k:g}, 1]: the schedule goes from "
                        "it down to --k")
    if cfg.schedule_epochs is not None and cfg.schedule_epochs > cfg.epochs:
        raise UserError(f"--schedule-epochs {cfg.schedule_epochs} exceeds --epochs {cfg.epochs}: the run would end "
                        f"before reaching --k; pass --schedule-epochs {cfg.epochs} or fewer")


def _check_layer_k(cfg: Config, caps: Capabilities, name: str) -> None:
    """--layer-k sets each layer's density of learned masks (the file itself is read when the masks are built)."""
    if cfg.exp_mode != "prune":
        raise UserError(f"--layer-k chooses the density of each layer while a mask is learned (--exp-mode prune); "
                        f"{cfg.exp_mode} keeps its masks: drop --layer-k")
    if caps.layer_k is not None:
        raise UserError(f"--layer-k applies to masks the selector learns (HYDRA, BiP); the {name} trainer "
                        f"{caps.layer_k}: drop --layer-k")
    for flag, used in (("--coupled", cfg.coupled), ("--layer-type nm", cfg.layer_type == "nm"),
                       ("--k-schedule", cfg.k_schedule != "none"), ("--flops-target", cfg.flops_target is not None)):
        if used:
            raise UserError(f"--layer-k sets one density per layer, which {flag} does not take: drop one of them")


def _check_nm(cfg: Config) -> None:
    """N:M fixes the density (k = N/M in every group): a different --k is refused rather than
    silently overridden, and the per-layer floor has nothing to do (every layer keeps N/M)."""
    n, m = parse_nm(cfg.nm)
    if abs(cfg.k - n / m) > 1e-9:
        raise UserError(f"--layer-type nm --nm {n}:{m} keeps {n} of every {m} weights, a density of {n / m!r}: "
                        f"pass --k {n / m!r} (got --k {cfg.k!r})")
    if cfg.layer_floor is not None:
        raise UserError(f"--layer-floor does not apply to --layer-type nm (every layer keeps {n} of every {m} "
                        "weights): drop --layer-floor")


def _check_processes(cfg: Config, capabilities: Capabilities, *, world: int, backend: str) -> None:
    """Settings a run of several processes cannot honour."""
    if cfg.val_method == "smooth":
        raise UserError("--val-method smooth certifies the first --certify-subset test samples in one process: run "
                        "it with python train.py (one process), or use --val-method base|adv under torchrun")
    fisher = uses_fisher(cfg, capabilities)
    if fisher and cfg.offload_grads and backend == "nccl":
        raise UserError("--offload-grads keeps the Fisher rows in host memory, which NCCL cannot gather across "
                        "processes: drop --offload-grads (each process holds only its block of rows while computing "
                        "them) or lower --fisher-subsample-size")
    if fisher and cfg.fisher_subsample_size < world:
        raise UserError(f"--fisher-subsample-size {cfg.fisher_subsample_size} rows cannot be shared by {world} "
                        f"processes: use at least {world}")
