"""Prune image classifiers with HYDRA (--trainer base), BiP (--trainer bilevel) and WoodFisher.

    python train.py --configs configs/CIFAR10/bip.yml --exp-mode prune --k 0.05 --source-net PRETRAINED.pth.tar

Options: defaults < YAML (--configs) < command line; see ``python train.py --help`` and README.md.
Bad input exits with status 2 and a one-line ``error:`` naming the fix; nothing is written then.
A run that cannot go on (a full disk) exits with status 1, an interrupted one (SIGINT, SIGTERM) with
130; both keep the last complete checkpoint, and ``--resume`` continues from it.

``run`` is the sequence of a run; each step is a function of the package its concept lives in.
"""
from __future__ import annotations

import functools
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, NoReturn

import torch
import yaml
from torch import nn

from configs.checks import check_data, check_run
from configs.errors import RunStopped, UserError, one_line
from configs.options import FisherOptions, ObsUpdateOptions, RobustOptions, SpeedOptions, section_of
from configs.schema import Config, Options, read_options
from data import DatasetSplits, Loaders, build_dataset, build_loaders, dataset_names
from deploy.slim import coupled_groups
from engine.checkpoint import is_storage_error, load_checkpoint
from engine.distributed import Dist, check_launch, launched, lost_peer, run_device, sharded_evaluation, sync_batchnorm
from engine.evaluate import Evaluation, build_evaluation
from engine.exits import interrupted_line, lost_peer_line
from engine.loop import RunState, fit, seed_everything, start_point
from engine.memory import check_run_fits
from engine.obs_update import ObsUpdate
from engine.precision import Precision, check_speed
from engine.run_folder import (
    Start,
    check_output,
    claim_run_folder,
    release,
    resumed_folder,
    settle_config,
    stopped_message,
)
from engine.run_log import RunLog, SilentLog
from engine.source import load_source, resume_into, resumed_state
from engine.summary import evaluation_report, finish, header
from layers import MaskSet, build_maskset, read_layer_k
from layers.convert import MASKED_TYPES
from models import build_model, model_names
from models import torchvision_zoo as tv
from pruning.methods import PRUNE_METHODS
from trainers import TRAINERS, get_trainer
from trainers.base import BaseTrainer
from trainers.build import build_trainer


def registry_names() -> dict[str, list[str]]:
    """The names --help lists for the options the registries fill."""
    return {"arch": [*model_names(), tv.HELP_NAME], "dataset": dataset_names(), "trainer": TRAINERS.names(),
            "prune_method": PRUNE_METHODS.names()}


def run(options: Options, group: Dist, *, began: threading.Event) -> int:
    started = time.monotonic()
    notices: list[str] = []
    start = settle_config(options, group=group, notice=notices.append)
    cfg = start.config
    run_cfg = cfg.as_dict()  # into config.yml and every checkpoint
    trainer_cls = get_trainer(cfg.trainer)
    check_run(cfg, trainer=trainer_cls, registry=TRAINERS.items(), world=group.world, backend=group.backend)
    device = run_device(cfg.device, group=group)
    check_speed(SpeedOptions.of(cfg), device=device)
    run_dir = resumed_folder(cfg.resume) if start.resume is not None and cfg.resume else None
    if not cfg.evaluate and group.main:  # evaluating writes nothing; rank 0 alone writes
        check_output(result_dir=cfg.result_dir, exp_name=cfg.exp_name, run_dir=run_dir)
    seed_everything(cfg.seed)
    # Everything that can fail on bad input happens before the run folder exists.
    splits, loaders, evaluate = build_data(cfg, trainer_cls, device=device, group=group)
    model, maskset = build_network(cfg, trainer_cls, start, splits=splits, device=device, group=group,
                                   notice=notices.append, run_cfg=run_cfg)
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size, device=device)  # for FLOPs
    if cfg.evaluate:
        say = print if group.main else (lambda line: None)
        for line in notices:
            say(line)
        for line in evaluation_report(model=model, maskset=maskset, loaders=loaders, evaluation=evaluate,
                                      device=device, example=example):
            say(line)
        return 0
    log = RunLog() if group.main else SilentLog()
    trainer = build_trainer(cfg, trainer_cls, model=model, maskset=maskset, device=device, group=group, log=log)
    hooks = [ObsUpdate.of(FisherOptions.of(cfg), mode=cfg.exp_mode, label_smoothing=cfg.label_smoothing,
                          update=ObsUpdateOptions.of(cfg))] if cfg.obs_update else []
    if start.resume is not None:
        state = resumed_state(trainer, start.resume, source=str(cfg.resume), run_dir=run_dir, notice=notices.append)
    else:  # after the trainer's set-up (WoodFisher starts dense): --obs-update, the source's accuracy
        state = RunState(source_top1=start_point(model=model, maskset=maskset, loaders=loaders, device=device,
                                                 evaluate=evaluate, group=group, hooks=hooks,
                                                 source=bool(cfg.source_net), notice=notices.append))
    # Everything is validated: from here on the run writes its folder.
    try:
        run_dir = claim_run_folder(cfg, run_dir=run_dir, config_text=yaml.safe_dump(run_cfg, sort_keys=False),
                                   auto=start.auto, main=group.main, changed=start.changed,
                                   start_epoch=state.start_epoch, notice=notices.append)
        began.set()
        log.open(run_dir)
        if start.resume is not None:
            log.rewrite_csv(state.history)  # exactly the checkpoint's epochs: none twice, none lost
        resumed_after = state.start_epoch if start.resume is not None else None
        for line in [f"run folder: {run_dir}", *notices, header(cfg, masked=maskset is not None, device=device,
                                                                group=group, resumed_after=resumed_after)]:
            log.info(line)
        state = fit(model=model, maskset=maskset, trainer=trainer, loaders=loaders, device=device, epochs=cfg.epochs,
                    seed=cfg.seed, arch=cfg.arch, config=run_cfg, run_dir=run_dir, log=log, state=state,
                    save_dense=cfg.save_dense, num_classes=splits.num_classes, evaluate=evaluate,
                    rewind_epoch=cfg.rewind_epoch if cfg.exp_mode == "pretrain" else None, group=group, hooks=hooks)
        extra = {**trainer.summary_fields(), **{k: v for hook in hooks for k, v in hook.summary_fields().items()}}
        finish(cfg, run_dir=run_dir, model=model, maskset=maskset, state=state, evaluation=evaluate, example=example,
               group=group, log=log, wall_seconds=time.monotonic() - started, extra=extra)
    except OSError as exc:
        log.close(after_error=True)
        if is_storage_error(exc):
            raise RunStopped(stopped_message(exc, run_dir or cfg.result_dir)) from None
        raise
    except BaseException:
        log.close(after_error=True)
        raise
    log.close()
    return 0


def build_data(cfg: Config, trainer_cls: type[BaseTrainer], *, device: torch.device,
               group: Dist) -> tuple[DatasetSplits, Loaders, Evaluation]:
    """The dataset, its loaders (this process's slice of every batch) and the run's evaluation."""
    splits = build_dataset(cfg.dataset, data_dir=cfg.data_dir, normalize=cfg.normalize, image_dim=cfg.image_dim,
                           num_classes=cfg.num_classes, skip_bad_records=cfg.skip_bad_records,
                           decode=cfg.decode, device=device)
    loaders = build_loaders(splits, batch_size=cfg.batch_size, test_batch_size=cfg.test_batch_size, seed=cfg.seed,
                            num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                            val_fraction=cfg.val_fraction, data_fraction=cfg.data_fraction, rank=group.rank,
                            world=group.world)
    check_data(cfg, capabilities=trainer_cls.capabilities, train_samples=len(loaders.train_indices))
    evaluate = build_evaluation(RobustOptions.of(cfg), seed=cfg.seed)  # --val-method
    evaluate = Precision(options=SpeedOptions.of(cfg), device=device).evaluation(evaluate)  # --amp, --channels-last
    return splits, loaders, sharded_evaluation(evaluate, loaders=loaders, group=group)


def build_network(cfg: Config, trainer_cls: type[BaseTrainer], start: Start, *, splits: DatasetSplits,
                  device: torch.device, group: Dist, notice: Callable[[str], None],
                  run_cfg: dict[str, Any]) -> tuple[nn.Module, MaskSet | None]:
    """The model (once it is known to fit in memory), its mask set, and the weights of the run's source
    or of the checkpoint it resumes, on the run's device."""
    build = functools.partial(build_model, cfg.arch, num_classes=splits.num_classes, in_channels=splits.in_channels,
                              image_size=splits.image_size)
    section = section_of(trainer_cls.Options, cfg)
    check_run_fits(build=build, in_channels=splits.in_channels, image_size=splits.image_size, device=device,
                   masked_types=MASKED_TYPES.get(cfg.layer_type, ()) if cfg.exp_mode != "pretrain" else (),
                   batch_size=cfg.batch_size, needs=functools.partial(trainer_cls.memory_needs, options=section))
    model, maskset = build(), None
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    if cfg.exp_mode != "pretrain":
        maskset, lines = build_maskset(model, granularity=cfg.layer_type, k=cfg.k, scope=cfg.scope,
                                       layer_floor=cfg.layer_floor, nm=cfg.nm, exclude=cfg.exclude_layers,
                                       arch=cfg.arch, example=example,
                                       coupled=coupled_groups(model, example=example, granularity=cfg.layer_type)
                                       if cfg.coupled else None, layer_k=read_layer_k(cfg.layer_k))
        for line in lines:
            notice(line)
    if start.resume is not None:
        resume_into(model, maskset, start.resume, source=str(cfg.resume), notice=notice)
    elif cfg.source_net:
        load_source(model, maskset, load_checkpoint(cfg.source_net), mode=cfg.exp_mode, run=run_cfg,
                    source=cfg.source_net, scores_init_type=cfg.scores_init_type,
                    scaled_score_init=cfg.scaled_score_init, notice=notice, reset_head=cfg.reset_head)
    return sync_batchnorm(model.to(device), group=group, device=device), maskset


def join_group(options: Options) -> Dist:
    """The processes of a ``torchrun`` launch as one group (``engine.distributed``), or a group of one."""
    # The raw values: the run's whole configuration is checked later (a resumed run's comes from its checkpoint).
    device, timeout = str(options.values["device"]), options.values["dist_timeout"]
    check_launch(device_flag=device)
    return Dist.from_env(cuda=device != "cpu" and torch.cuda.is_available(), timeout_s=max(1, int(timeout)))


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
    began = threading.Event()  # set once the run folder is claimed: from then on there is a run to resume

    def error(text: str) -> None:
        # Every process says its own error (one may fail alone: its data, its GPU's memory); under
        # torchrun the others name their rank, so bad input shared by all reads as one line per process.
        where = f" (rank {rank})" if rank else ""
        say_line(f"error{where}: {text}")
    try:
        options = read_options(sys.argv[1:] if argv is None else argv, names=registry_names())
        group = join_group(options)
        code = run(options, group, began=began)
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
        say_line(lost_peer_line(began=began.is_set(), rank=rank, cause=one_line(exc)))
        return 1
    except OSError as exc:  # a full disk while closing the log, after the last checkpoint
        if not is_storage_error(exc):
            raise
        error(f"could not write {exc.filename} ({exc.strerror}); completed checkpoints are kept: "
              "free space and continue with --resume")
        return 1
    except KeyboardInterrupt:
        say_line(interrupted_line(began=began.is_set(), rank=rank, distributed=distributed))
        return 130
    finally:
        release()  # the run folder's lock
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
