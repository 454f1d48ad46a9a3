"""Prune image classifiers with HYDRA (--trainer base), BiP (--trainer bilevel) and WoodFisher.

    python train.py --configs configs/CIFAR10/bip.yml --exp-mode prune --k 0.05 --source-net PRETRAINED.pth.tar

Options: defaults < YAML (--configs) < command line; see ``python train.py --help`` and README.md.
Bad input exits with status 2 and a one-line ``error:`` naming the fix; nothing is written then.
"""
from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch
import yaml

from configs.errors import UserError, one_line
from configs.schema import Config, load_config
from data import build_dataset, build_loaders
from layers import MaskSet, to_masked
from models import build_model
from trainers import get_trainer
from trainers.base import OptimSettings, evaluate
from trainers.checkpoint import load_checkpoint, set_rng_state
from trainers.loop import RunState, fit, write_summary
from trainers.run_log import RunLog, sparsity_table
from trainers.schedules import MASK_MILESTONES
from trainers.source import load_source, resume_into


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA device is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device '{name}'; use auto, cpu, cuda or cuda:N") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def new_run_dir(cfg: Config) -> str:
    """RESULT_DIR/EXP_NAME/EXP_MODE/<n>--k-<k>_trainer-<t>_epochs-<E>_arch-<a>, n one past the largest."""
    parent = os.path.join(cfg.result_dir, cfg.exp_name, cfg.exp_mode)
    os.makedirs(parent, exist_ok=True)
    taken = [int(d.split("--", 1)[0]) for d in os.listdir(parent) if d.split("--", 1)[0].isdigit()]
    n = max(taken, default=0) + 1
    path = os.path.join(parent, f"{n}--k-{cfg.k:g}_trainer-{cfg.trainer}_epochs-{cfg.epochs}_arch-{cfg.arch}")
    os.makedirs(path)
    return path


def optim_settings(cfg: Config) -> tuple[OptimSettings, OptimSettings]:
    weights = OptimSettings(optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, wd=cfg.wd,
                            schedule=cfg.lr_schedule, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                            warmup_lr=cfg.warmup_lr)
    masks = OptimSettings(optimizer=cfg.optimizer, lr=cfg.mask_lr, momentum=cfg.momentum, wd=cfg.wd,
                          schedule=cfg.mask_lr_schedule, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                          warmup_lr=cfg.warmup_lr, milestones=MASK_MILESTONES)
    return weights, masks


def run(cfg: Config) -> int:
    device = resolve_device(cfg.device)
    trainer_cls = get_trainer(cfg.trainer)
    trainer_cls.check_options(mode=cfg.exp_mode, layer_type=cfg.layer_type, k=cfg.k, scope=cfg.scope, epochs=cfg.epochs,
                              **{name: getattr(cfg, name) for name in trainer_cls.option_names})
    seed_everything(cfg.seed)
    run_cfg = cfg.as_dict()

    # Everything that can fail on bad input happens before the run folder exists.
    splits = build_dataset(cfg.dataset, data_dir=cfg.data_dir, normalize=cfg.normalize, image_dim=cfg.image_dim,
                           num_classes=cfg.num_classes, skip_bad_records=cfg.skip_bad_records)
    loaders = build_loaders(splits, batch_size=cfg.batch_size, test_batch_size=cfg.test_batch_size, seed=cfg.seed,
                            num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                            val_fraction=cfg.val_fraction, data_fraction=cfg.data_fraction)
    model = build_model(cfg.arch, num_classes=splits.num_classes, in_channels=splits.in_channels,
                        image_size=splits.image_size)
    maskset = None
    if cfg.exp_mode != "pretrain":
        to_masked(model, granularity=cfg.layer_type)
        maskset = MaskSet(model, k=cfg.k, granularity=cfg.layer_type, scope=cfg.scope, min_units=cfg.layer_floor)
    notices: list[str] = []
    state = RunState()
    resume = load_checkpoint(cfg.resume) if cfg.resume else None
    if resume is not None:
        resume_into(model, maskset, resume, run=run_cfg, source=cfg.resume, notice=notices.append)
    elif cfg.source_net:
        load_source(model, maskset, load_checkpoint(cfg.source_net), mode=cfg.exp_mode, run=run_cfg,
                    source=cfg.source_net, scores_init_type=cfg.scores_init_type,
                    scaled_score_init=cfg.scaled_score_init, notice=notices.append)
    elif maskset is not None:
        maskset.step(force=True)
    model.to(device)

    if cfg.evaluate:
        for line in notices:
            print(line)
        for split, loader in (("val", loaders.val), ("test", loaders.test)):
            if loader is not None:
                m = evaluate(model, loader, device=device)
                print(f"{split}: loss {m['loss']:.4f}  top1 {m['top1']:.2f}  top5 {m['top5']:.2f}")
        if maskset is not None:
            print(sparsity_table(maskset.report()))
        return 0

    weights, masks = optim_settings(cfg)
    log = RunLog()
    trainer = trainer_cls(model=model, maskset=maskset, mode=cfg.exp_mode, device=device, weights=weights,
                          masks=masks, freeze_bn=cfg.freeze_bn, label_smoothing=cfg.label_smoothing,
                          progress=cfg.progress, log=log.debug, print_freq=cfg.print_freq,
                          **{name: getattr(cfg, name) for name in trainer_cls.option_names})
    if resume is not None:
        trainer.load_state_dict(resume["trainer_state"])
        state = RunState(start_epoch=int(resume["epoch"]), best_prec1=float(resume["best_prec1"]))
        set_rng_state(resume["rng"])

    # Everything is validated: from here on the run writes its folder.
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(cfg.resume))) if resume is not None else None
    if run_dir is None or not os.path.isfile(os.path.join(run_dir, "config.yml")):
        run_dir = new_run_dir(cfg)
    log.open(run_dir)
    try:
        with open(os.path.join(run_dir, "config.yml"), "w", encoding="utf-8") as fh:
            yaml.safe_dump(run_cfg, fh, sort_keys=False)
        log.info(f"run folder: {run_dir}")
        for line in notices:
            log.info(line)
        log.info(f"{cfg.exp_mode} {cfg.arch} on {cfg.dataset} with trainer {cfg.trainer}, layer type {cfg.layer_type if maskset else 'dense'}, "
                 f"k {cfg.k:g} ({cfg.scope}), {cfg.epochs} epochs, device {device}"
                 + (f", resuming after epoch {state.start_epoch}" if resume is not None else ""))
        state = fit(model=model, maskset=maskset, trainer=trainer, loaders=loaders, device=device, epochs=cfg.epochs,
                    seed=cfg.seed, arch=cfg.arch, config=run_cfg, run_dir=run_dir, log=log, state=state,
                    save_dense=cfg.save_dense)
        final = evaluate(model, loaders.test, device=device)
        density = maskset.density() if maskset is not None else 1.0
        if maskset is not None:
            log.info("per-layer sparsity:\n" + sparsity_table(maskset.report()))
        log.info(f"done: {cfg.exp_mode} k {cfg.k:g}  test top1 {final['top1']:.2f}  best val top1 "
                 f"{state.best_prec1:.2f}  sparsity {100 * (1 - density):.2f}%  checkpoints in "
                 f"{os.path.join(run_dir, 'checkpoint')}")
        write_summary(run_dir, {"stage": cfg.exp_mode, "trainer": cfg.trainer, "arch": cfg.arch, "k": cfg.k,
                                "test_top1": final["top1"], "best_val_top1": state.best_prec1,
                                "sparsity": 1 - density, "run_dir": run_dir}, maskset)
    finally:
        log.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(load_config(sys.argv[1:] if argv is None else argv))
    except UserError as exc:  # also one raised in a DataLoader worker: one_line drops the worker's traceback
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint.pth.tar is complete (writes are atomic); continue with --resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
