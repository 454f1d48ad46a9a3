"""Prune image classifiers with HYDRA (--trainer base), BiP (--trainer bilevel) and WoodFisher.

    python train.py --configs configs/CIFAR10/bip.yml --exp-mode prune --k 0.05 --source-net PRETRAINED.pth.tar

Options: defaults < YAML (--configs) < command line; see ``python train.py --help`` and README.md.
Bad input exits with status 2 and a one-line ``error:`` naming the fix; nothing is written then.
A run that cannot go on (a full disk) exits with status 1, an interrupted one (SIGINT, SIGTERM) with
130; both keep the last complete checkpoint, and ``--resume`` continues from it.
"""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import NoReturn, cast

import numpy as np
import torch
import yaml

from configs.errors import RunStopped, UserError, one_line
from configs.options import FisherOptions, OptionSection, RobustOptions, SpeedOptions, parse_nm
from configs.schema import Config, Options, read_options, resumed_config
from data import DatasetSplits, Loaders, build_dataset, build_loaders
from engine.checkpoint import (
    check_resumable,
    is_storage_error,
    load_checkpoint,
    remove_stale_temps,
    save_checkpoint,
    set_rng_state,
    write_text,
)
from engine.distributed import Dist, check_launch, launched, lost_peer, sharded_evaluation, sync_batchnorm
from engine.evaluate import Evaluation, build_evaluation
from engine.loop import RunState, checkpoint_state, fit, write_summary
from engine.lr_schedules import MASK_MILESTONES
from engine.memory import activation_bytes_per_sample, check_fits, meta_model, model_bytes
from engine.optim import OptimSettings
from engine.precision import Precision, check_speed
from engine.run_folder import (
    abandoned_run_dir,
    check_writable,
    hold,
    new_run_dir,
    release,
    resumed_folder,
    unfinished_checkpoint,
)
from engine.run_log import RunLog, SilentLog, csv_history, sparsity_table
from engine.source import load_source, load_trainer_state, resume_into
from layers import MaskSet, NMShapeError, SelectionError, to_masked
from layers.convert import MASKED_TYPES, exclusion_patterns
from models import build_model
from pruning.cost import model_cost
from pruning.methods import PRUNE_METHODS
from pruning.solver import FisherSettings
from trainers import get_trainer
from trainers.base import BaseTrainer, RunSpec
from trainers.compensation import compensate_fixed_mask
from trainers.woodfisher import fisher_settings

INTERRUPTED = "interrupted; the last checkpoint.pth.tar is complete (writes are atomic); continue with --resume"
# Under torchrun a process is stopped by a signal when another one failed (torchrun ends them all).
STOPPED_BY_TORCHRUN = ("stopped: torchrun ends every process when one fails (its error is above) or the job is "
                       "stopped; the last checkpoint.pth.tar is complete; the same command with --resume auto "
                       "continues the run")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but no CUDA device is available; use --device cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 to "
                            f"cuda:{torch.cuda.device_count() - 1}); pass one of them")
    return torch.device(name)  # the schema admits only auto, cpu, cuda and cuda:N


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_memory(cfg: Config, *, trainer_cls: type[BaseTrainer], splits: DatasetSplits, loaders: Loaders,
                 device: torch.device) -> None:
    """Refuse a run that cannot fit in memory before anything is allocated (engine.memory): the
    architecture is measured on the meta device, so a huge --image-dim costs nothing here."""
    shapes = meta_model(lambda: build_model(cfg.arch, num_classes=splits.num_classes, in_channels=splits.in_channels,
                                            image_size=splits.image_size))
    per_sample = activation_bytes_per_sample(shapes, in_channels=splits.in_channels, image_size=splits.image_size)
    masked_types = MASKED_TYPES.get(cfg.layer_type, ()) if cfg.exp_mode != "pretrain" else ()
    masked = sum(cast(torch.Tensor, m.weight).numel() for m in shapes.modules() if type(m) in masked_types)
    needs = trainer_cls.memory_needs(per_sample_bytes=per_sample, batch_size=cfg.batch_size,
                                     model_bytes=model_bytes(shapes), masked_weights=masked,
                                     on_gpu=device.type == "cuda",
                                     options=trainer_options(cfg, trainer_cls))
    check_fits(needs, device=device)
    if uses_fisher(cfg) and cfg.fisher_mini_bsz > len(loaders.train_indices):
        raise UserError(f"--fisher-mini-bsz {cfg.fisher_mini_bsz} asks each Fisher gradient to average more samples "
                        f"than the {len(loaders.train_indices)} of the training split: lower --fisher-mini-bsz")


def uses_fisher(cfg: Config) -> bool:
    """Whether the run collects Fisher gradient rows (the WoodFisher trainer, or --obs-update)."""
    return cfg.trainer == "woodfisher" or cfg.obs_update


def trainer_options(cfg: Config, trainer_cls: type[BaseTrainer]) -> OptionSection | None:
    """The trainer's own options (its section of configs.options), read off the run's config."""
    return trainer_cls.Options.of(cfg) if trainer_cls.Options is not None else None


def obs_fisher(cfg: Config) -> FisherSettings:
    """The Fisher of --obs-update, from the same flags as the WoodFisher trainer's (its OBS method's damp)."""
    options = FisherOptions.of(cfg)
    default = PRUNE_METHODS.get("woodfisher").default_damp
    return fisher_settings(options, damp=options.fisher_damp if options.fisher_damp is not None else default)


def optim_settings(cfg: Config) -> tuple[OptimSettings, OptimSettings]:
    """(weight optimizer, score optimizer): the scores' lr and schedule are --mask-lr's (BiP's upper level)."""
    weight_optim = OptimSettings(optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, wd=cfg.wd,
                                 schedule=cfg.lr_schedule, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                 warmup_lr=cfg.warmup_lr)
    score_optim = OptimSettings(optimizer=cfg.optimizer, lr=cfg.mask_lr, momentum=cfg.momentum, wd=cfg.wd,
                                schedule=cfg.mask_lr_schedule, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                warmup_lr=cfg.warmup_lr, milestones=MASK_MILESTONES)
    return weight_optim, score_optim


def resolve_auto_resume(options: Options, notice: Callable[[str], None], group: Dist) -> Options:
    """``--resume auto`` (the same command for a first start and every restart, as torchrun's
    --max-restarts needs): continue the newest unfinished run of the experiment, or start a new one.
    Rank 0 looks, so that every rank of a distributed run continues the same one."""
    cfg = options.config()
    found = group.broadcast_object(unfinished_checkpoint(cfg) if group.main else None)
    where = os.path.join(cfg.result_dir, cfg.exp_name, cfg.exp_mode)
    notice(f"--resume auto: continuing {found}" if found else
           f"--resume auto: no unfinished run under {where}; starting a new one")
    return dataclasses.replace(options, values={**options.values, "resume": found})


def join_group(options: Options) -> Dist:
    """The processes of a ``torchrun`` launch as one group (``engine.distributed``), or a group of one."""
    # The raw values: the run's whole configuration is checked later (a resumed run's comes from its checkpoint).
    device, timeout = str(options.values["device"]), options.values["dist_timeout"]
    check_launch(device_flag=device)
    return Dist.from_env(cuda=device != "cpu" and torch.cuda.is_available(), timeout_s=max(1, int(timeout)))


def check_distributed(cfg: Config, group: Dist) -> None:
    """Settings a run of several processes cannot honour (train.py refuses them before any work)."""
    if not group.enabled:
        return
    if cfg.val_method == "smooth":
        raise UserError("--val-method smooth certifies the first --certify-subset test samples in one process: run "
                        "it with python train.py (one process), or use --val-method base|adv under torchrun")
    if uses_fisher(cfg) and cfg.offload_grads and group.backend == "nccl":
        raise UserError("--offload-grads keeps the Fisher rows in host memory, which NCCL cannot gather across "
                        "processes: drop --offload-grads (each process holds only its block of rows while computing "
                        "them) or lower --fisher-subsample-size")
    if uses_fisher(cfg) and cfg.fisher_subsample_size < group.world:
        raise UserError(f"--fisher-subsample-size {cfg.fisher_subsample_size} rows cannot be shared by {group.world} "
                        f"processes: use at least {group.world}")


def run(options: Options, group: Dist) -> int:
    started = time.monotonic()
    notices: list[str] = []
    resume, changed = None, {}
    auto = options.values["resume"] == "auto"
    if auto:
        options = resolve_auto_resume(options, notices.append, group)
    if options.values["resume"]:
        source = options.values["resume"]
        resume = load_checkpoint(source)
        check_resumable(resume, source)
        resumed = resumed_config(resume["config"], options, source=source)
        cfg, changed = resumed.config, resumed.changed
        if resumed.defaulted:
            notices.append(f"{source}: its config predates {', '.join(resumed.defaulted)}: they take their defaults")
    else:
        cfg = options.config()
    evaluate = build_evaluation(RobustOptions.of(cfg), seed=cfg.seed)  # --val-method: every evaluation of the run
    device = resolve_device(cfg.device)
    if group.enabled and device.type == "cuda":
        device = torch.device("cuda", group.local_rank)  # one GPU per process, as torchrun numbers them
    check_distributed(cfg, group)
    speed = SpeedOptions.of(cfg)
    check_speed(speed, device=device)
    evaluate = Precision(options=speed, device=device).evaluation(evaluate)  # --amp, --channels-last
    trainer_cls = get_trainer(cfg.trainer)
    trainer_cls.check_options(trainer_options(cfg, trainer_cls),
                              run=RunSpec(mode=cfg.exp_mode, layer_type=cfg.layer_type, k=cfg.k, scope=cfg.scope,
                                          epochs=cfg.epochs))
    run_dir = None
    if resume is not None:
        assert cfg.resume is not None  # the resumed config keeps --resume
        run_dir = resumed_folder(cfg.resume)
    if not cfg.evaluate and group.main:  # evaluating writes nothing; rank 0 alone writes
        if run_dir is not None:
            check_writable(run_dir, "--resume: the run folder")
        else:
            check_writable(cfg.result_dir, "--result-dir")
    seed_everything(cfg.seed)
    run_cfg = cfg.as_dict()

    # Everything that can fail on bad input happens before the run folder exists.
    splits = build_dataset(cfg.dataset, data_dir=cfg.data_dir, normalize=cfg.normalize, image_dim=cfg.image_dim,
                           num_classes=cfg.num_classes, skip_bad_records=cfg.skip_bad_records,
                           decode=cfg.decode, device=device)
    loaders = build_loaders(splits, batch_size=cfg.batch_size, test_batch_size=cfg.test_batch_size, seed=cfg.seed,
                            num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                            val_fraction=cfg.val_fraction, data_fraction=cfg.data_fraction, rank=group.rank,
                            world=group.world)
    evaluate = sharded_evaluation(evaluate, loaders=loaders, group=group)
    check_memory(cfg, trainer_cls=trainer_cls, splits=splits, loaders=loaders, device=device)
    model = build_model(cfg.arch, num_classes=splits.num_classes, in_channels=splits.in_channels,
                        image_size=splits.image_size)
    maskset = None
    if cfg.exp_mode != "pretrain":
        try:
            to_masked(model, granularity=cfg.layer_type, exclude=exclusion_patterns(cfg.exclude_layers))
        except ValueError as exc:
            raise UserError(f"--exclude-layers: {exc}") from None
        try:
            maskset = MaskSet(model, k=cfg.k, granularity=cfg.layer_type, scope=cfg.scope, min_units=cfg.layer_floor,
                              nm=parse_nm(cfg.nm) if cfg.layer_type == "nm" else None)
        except NMShapeError as exc:
            # The fix is one flag: the user's own exclusions plus these layers.
            keep = ",".join(exclusion_patterns(cfg.exclude_layers) + exc.names)
            raise UserError(f"--layer-type nm: {exc}; keep them dense with --exclude-layers {keep}") from None
        except SelectionError as exc:
            raise UserError(str(exc)) from None
        if not maskset.layers and cfg.exclude_layers:
            raise UserError(f"--exclude-layers {cfg.exclude_layers} excludes every layer --layer-type {cfg.layer_type} "
                            "would mask: nothing is left to prune; exclude fewer layers")
        if not maskset.layers:
            raise UserError(f"--layer-type {cfg.layer_type} masks convolutions only (linear layers stay dense, as in "
                            f"BiP) and {cfg.arch} has none: use --layer-type unstructured")
        if maskset.nm is not None:
            kept, size = maskset.nm
            notices.append(f"N:M masks: every group of {size} consecutive input channels/features keeps its {kept} "
                           f"highest-scoring weights (--scope {cfg.scope} does not apply)")
        if cfg.scope == "global" and maskset.min_units:
            unit = {"filter": "filter", "channel": "channel"}.get(cfg.layer_type, "weight")
            notices.append(f"every masked layer keeps at least {maskset.min_units} {unit}(s) "
                           f"(--layer-floor {maskset.min_units}), so no layer is emptied")
    state = RunState()
    if resume is not None:
        assert cfg.resume is not None
        resume_into(model, maskset, resume, source=cfg.resume, notice=notices.append)
    elif cfg.source_net:
        load_source(model, maskset, load_checkpoint(cfg.source_net), mode=cfg.exp_mode, run=run_cfg,
                    source=cfg.source_net, scores_init_type=cfg.scores_init_type,
                    scaled_score_init=cfg.scaled_score_init, notice=notices.append, reset_head=cfg.reset_head)
    elif maskset is not None:
        maskset.step(force=True)
    model.to(device)
    model = sync_batchnorm(model, group=group, device=device)
    say = print if group.main else (lambda *args, **kwargs: None)

    if cfg.evaluate:
        for line in notices:
            say(line)
        for split, loader in (("val", loaders.val), ("test", loaders.test)):
            if loader is not None:
                m = evaluate(model, loader, device=device)
                say(f"{split}: " + "  ".join(f"{key} {value:.4f}" if "loss" in key else f"{key} {value:.2f}"
                                               for key, value in m.items()))
        if maskset is not None:
            say(sparsity_table(maskset.report()))
        say(model_cost(model, example=example_input(splits, device)).line())
        return 0

    weight_optim, score_optim = optim_settings(cfg)
    log = RunLog() if group.main else SilentLog()
    # A bar redraws ~190 bytes per step: into a redirected stderr (a cluster log) that is noise, so
    # without a terminal the per-batch lines at --print-freq go to the console instead.
    bar = (sys.stderr.isatty() if cfg.progress is None else cfg.progress) and group.main
    trainer = trainer_cls(model=model, maskset=maskset, mode=cfg.exp_mode, device=device, weight_optim=weight_optim,
                          score_optim=score_optim, freeze_bn=cfg.freeze_bn, label_smoothing=cfg.label_smoothing,
                          progress=bar, log=log.debug if bar else log.info, print_freq=cfg.print_freq, seed=cfg.seed,
                          options=trainer_options(cfg, trainer_cls), robust=RobustOptions.of(cfg),
                          source=cfg.source_net, speed=speed, group=group)
    if resume is not None:
        assert cfg.resume is not None
        load_trainer_state(trainer, resume["trainer_state"], cfg.resume)
        history = resume.get("history")
        if history is None:  # written before checkpoints held it: take metrics.csv up to the checkpoint
            history = csv_history(run_dir, resume["epoch"]) if run_dir else []
            notices.append(f"{cfg.resume} holds no per-epoch history (an older train.py): metrics.csv "
                           + (f"keeps its rows up to epoch {resume['epoch']}" if run_dir else
                              f"starts at epoch {resume['epoch'] + 1}"))
        state = RunState(start_epoch=resume["epoch"], best_prec1=float(resume["best_prec1"]), history=list(history))
        set_rng_state(resume["rng"])
    obs: dict[str, dict] = {}
    if resume is None and cfg.obs_update and cfg.exp_mode == "finetune":
        assert maskset is not None  # finetune runs on masked layers
        fisher = obs_fisher(cfg)
        done = compensate_fixed_mask(model=model, maskset=maskset, loaders=loaders, device=device, fisher=fisher,
                                     joint=cfg.obs_solve == "joint", label_smoothing=cfg.label_smoothing)
        group.broadcast_state(model)  # every rank solved the same system; rank 0's result, bit for bit
        notices.append(done.line(when="the source's mask, before fine-tuning", fisher=fisher))
        obs["finetune_start"] = done.as_dict()
    if resume is None and cfg.source_net:
        # What the run starts from (after the trainer's set-up: WoodFisher starts dense), and the
        # reference of the first epoch's collapse check.
        start = evaluate(model, loaders.val if loaders.val is not None else loaders.test, device=device)
        state.source_top1 = start["top1"]
        notices.append("source network before the first epoch: "
                       + "  ".join(f"val {key} {start[key]:.2f}" for key in ("top1", *evaluate.shown)))

    # Everything is validated: from here on the run writes its folder.
    fresh = run_dir is None
    config_text = yaml.safe_dump(run_cfg, sort_keys=False)
    if run_dir is None and auto and group.main:  # a start of this command killed before its first checkpoint
        run_dir = abandoned_run_dir(cfg, config_text)
        if run_dir is not None:
            hold(run_dir)  # before anything in it is removed
            notices.append(f"--resume auto: starting again in {run_dir}, left by a start of this command "
                           "before its first checkpoint")
            for folder in (run_dir, os.path.join(run_dir, "checkpoint")):
                remove_stale_temps(folder)
            if os.path.exists(os.path.join(run_dir, "metrics.csv")):  # rows of epochs no checkpoint holds
                os.remove(os.path.join(run_dir, "metrics.csv"))
    if run_dir is None:  # fresh
        run_dir = new_run_dir(cfg) if group.main else ""
    if group.main:
        hold(run_dir)  # one live process per run folder (a second --resume of a live run is refused)
    try:
        if fresh and group.main:  # before the log: a folder without config.yml could not be started again
            write_text(os.path.join(run_dir, "config.yml"), config_text)
        log.open(run_dir)
        if not fresh and group.main:
            for folder in (run_dir, os.path.join(run_dir, "checkpoint")):
                for name in remove_stale_temps(folder):
                    notices.append(f"removed {os.path.join(folder, name)}, left by an interrupted write")
            record_changes(run_dir, changed, epoch=state.start_epoch, notice=notices.append)
        if resume is not None:
            log.rewrite_csv(state.history)  # exactly the checkpoint's epochs: none twice, none lost
        log.info(f"run folder: {run_dir}")
        for line in notices:
            log.info(line)
        layer_type = cfg.layer_type + (f" {cfg.nm}" if cfg.layer_type == "nm" else "") if maskset else "dense"
        processes = f" x {group.world} processes ({group.backend})" if group.enabled else ""
        log.info(f"{cfg.exp_mode} {cfg.arch} on {cfg.dataset} with trainer {cfg.trainer}, layer type {layer_type}, "
                 f"k {cfg.k:g} ({cfg.scope}), {cfg.epochs} epochs, device {device}{processes}"
                 + (f", resuming after epoch {state.start_epoch}" if resume is not None else ""))
        state = fit(model=model, maskset=maskset, trainer=trainer, loaders=loaders, device=device, epochs=cfg.epochs,
                    seed=cfg.seed, arch=cfg.arch, config=run_cfg, run_dir=run_dir, log=log, state=state,
                    save_dense=cfg.save_dense, num_classes=splits.num_classes, evaluate=evaluate,
                    rewind_epoch=cfg.rewind_epoch if cfg.exp_mode == "pretrain" else None, group=group)
        final = evaluate(model, loaders.test, device=device)  # the model of checkpoint.pth.tar
        if cfg.obs_update and cfg.exp_mode == "prune":
            assert maskset is not None  # prune runs on masked layers
            fisher = obs_fisher(cfg)
            done = compensate_fixed_mask(model=model, maskset=maskset, loaders=loaders, device=device, fisher=fisher,
                                         joint=cfg.obs_solve == "joint", label_smoothing=cfg.label_smoothing,
                                         test_top1_before=final["top1"])  # measured just above, same masks
            group.broadcast_state(model)
            path = os.path.join(run_dir, "checkpoint", "model_obs.pth.tar")
            ckpt = checkpoint_state(epoch=cfg.epochs, arch=cfg.arch, model=model, maskset=maskset, trainer=trainer,
                                    best_prec1=state.best_prec1, config=run_cfg, history=state.history)
            ckpt["obs_update"] = done.as_dict()
            if group.main:
                save_checkpoint(ckpt, path)
            log.info(done.line(when="the learned mask, at the end of pruning", fisher=fisher)
                     + f"; written to {path} (pass it to --source-net to fine-tune)")
            obs["prune_end"] = {**done.as_dict(), "checkpoint": path}
        density = maskset.density() if maskset is not None else 1.0
        if maskset is not None:
            log.info("per-layer sparsity:\n" + sparsity_table(maskset.report()))
        robust = "".join(f"  test {key} {final[key]:.2f}" for key in evaluate.shown)
        log.info(f"done: {cfg.exp_mode} k {cfg.k:g}  test top1 {final['top1']:.2f}{robust}  best val {evaluate.metric} "
                 f"{state.best_prec1:.2f}  sparsity {100 * (1 - density):.2f}%  checkpoints in "
                 f"{os.path.join(run_dir, 'checkpoint')}")
        fallen = [row["epoch"] for row in state.history if row.get("collapsed")]
        if fallen:
            log.info(f"WARNING: accuracy collapsed to about chance in epoch(s) {', '.join(map(str, fallen))} "
                     "(see the warnings above); this run's results are not a fair measure of the method")
        cost = model_cost(model, example=example_input(splits, device))
        log.info(cost.line())
        if not group.main:
            return 0
        write_summary(run_dir, {**summary(cfg, run_dir=run_dir, masked=maskset is not None, final=final,
                                          state=state, density=density, wall_seconds=time.monotonic() - started,
                                          evaluation=evaluate),
                                **cost.as_dict(), **trainer.summary_fields(),
                                **({"obs_update": obs} if obs else {})}, maskset)
    except OSError as exc:
        log.close(after_error=True)
        if is_storage_error(exc):
            raise RunStopped(stopped_message(exc, run_dir)) from None
        raise
    except BaseException:
        log.close(after_error=True)
        raise
    log.close()
    return 0


def summary(cfg: Config, *, run_dir: str, masked: bool, final: dict, state: RunState, density: float,
            wall_seconds: float, evaluation: Evaluation) -> dict:
    """summary.json: one row of a results table. ``wall_seconds`` is this invocation; ``train_seconds``
    sums the epochs of the whole run, across resumes. Every metric of the final test evaluation is a
    ``test_<key>``; ``best_val_<metric>`` is the best validation value of the metric that chose
    model_best (``model_best_by``)."""
    return {"stage": cfg.exp_mode, "exp_name": cfg.exp_name, "exp_mode": cfg.exp_mode, "dataset": cfg.dataset,
            "arch": cfg.arch, "layer_type": cfg.layer_type if masked else "dense", "scope": cfg.scope, "k": cfg.k,
            "trainer": cfg.trainer, "prune_method": None,  # the woodfisher trainer's summary_fields set it
            "seed": cfg.seed, "epochs": cfg.epochs,
            "source_net": os.path.abspath(cfg.source_net) if cfg.source_net else None,
            "objective": cfg.objective, "val_method": cfg.val_method,
            **{f"test_{key}": value for key, value in final.items() if key != "certified"},
            f"best_val_{evaluation.metric}": state.best_prec1, "model_best_by": f"val_{evaluation.metric}",
            "sparsity": 1 - density, "run_dir": run_dir, "wall_seconds": round(wall_seconds, 3),
            "collapsed_epochs": [row["epoch"] for row in state.history if row.get("collapsed")],
            "train_seconds": round(sum(float(row.get("seconds") or 0) for row in state.history), 3)}


def example_input(splits: DatasetSplits, device: torch.device) -> torch.Tensor:
    """One input of the run's shape, for counting FLOPs."""
    return torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size, device=device)


def record_changes(run_dir: str, changed: dict, *, epoch: int, notice: Callable[[str], None]) -> None:
    """Run-control options a resume changed: a line in run.log and a comment at the end of config.yml
    (its settings stay those the run started with; comments keep it valid YAML)."""
    if not changed:
        return
    text = "; ".join(f"{key}: {new!r} (was {old!r})" for key, (old, new) in changed.items())
    notice(f"resumed after epoch {epoch} with {text}")
    path = os.path.join(run_dir, "config.yml")
    with open(path, encoding="utf-8") as fh:
        original = fh.read()
    write_text(path, original.rstrip("\n") + f"\n# resumed after epoch {epoch} with {text}\n")


def stopped_message(exc: OSError, run_dir: str) -> str:
    ckpt = os.path.join(run_dir, "checkpoint", "checkpoint.pth.tar")
    kept = (f"the last complete checkpoint is kept: free space (or fix the disk) and continue with --resume {ckpt}"
            if os.path.isfile(ckpt) else "no checkpoint was written yet: free space (or fix the disk) and start again")
    return f"could not write {exc.filename} ({exc.strerror}); {kept}"


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt  # SIGTERM (what clusters send) ends a run like Ctrl-C


def say_line(line: str) -> None:
    """One line on stderr in ONE write: print() writes the text and the newline apart, and the lines of
    processes sharing a stderr (torchrun's ranks) then run into each other."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    rank, world = launched()  # under torchrun: which process this is
    distributed = world > 1

    def error(text: str) -> None:
        # Every process says its own error (one may fail alone: its data, its GPU's memory); under
        # torchrun the others name their rank, so bad input shared by all reads as one line per process.
        where = f" (rank {rank})" if rank else ""
        say_line(f"error{where}: {text}")
    try:
        options = read_options(sys.argv[1:] if argv is None else argv)
        group = join_group(options)
        code = run(options, group)
        group.close()
        return code
    except UserError as exc:  # also one raised in a DataLoader worker: one_line drops the worker's traceback
        error(one_line(exc))
        return 2
    except (RunStopped, FloatingPointError) as exc:
        error(str(exc))
        return 1
    except RuntimeError as exc:  # a collective failed: another process died or hangs
        if not (distributed and lost_peer(exc)):
            raise
        say_line(f"error: rank {rank} lost the other processes ({one_line(exc)[:200]}); the last checkpoint.pth.tar "
                 "is complete; the same command with --resume auto continues the run")
        return 1
    except OSError as exc:  # a full disk while closing the log, after the last checkpoint
        if not is_storage_error(exc):
            raise
        error(f"could not write {exc.filename} ({exc.strerror}); completed checkpoints are kept: "
              "free space and continue with --resume")
        return 1
    except KeyboardInterrupt:
        if rank == 0:
            say_line(STOPPED_BY_TORCHRUN if distributed else INTERRUPTED)
        return 130
    finally:
        release()  # the run folder's lock
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
