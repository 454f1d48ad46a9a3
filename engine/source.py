"""Bringing a checkpoint into a run: the source network of pretrain/prune/finetune, or a run to resume.

The rules, per mode:
- pretrain: a dense checkpoint to continue training from (e.g. a torchvision ImageNet model).
- prune: weights (and scores, if the checkpoint has them) load into the masked model; missing
  scores get the configured init; ``scaled_score_init`` always re-derives them from the weights.
- finetune: the checkpoint must be pruned (scores or masks). Its stored masks are used as they
  are; a HYDRA/BiP checkpoint has none, so the selector derives them from its scores with this
  run's k, layer type and scope (the same rule the public code applies). A dense checkpoint is
  taken only with ``scaled_score_init``: HYDRA's magnitude baseline (``hydra_baseline_masks``).
- ``reset_head`` (any of the three): the source's classifier (the model's last Linear) is dropped
  and the freshly initialised one kept, so a checkpoint trained on another class count can be
  used. In finetune the new classifier stays dense: it has no learned mask to keep.
- resume: the checkpoint's config is the run's config (``configs.schema.resumed_config``), so
  everything it holds fits the model built from it; what does not is a damaged file.
Stored masks or optimizer state that do not fit are a UserError naming the file.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from configs.errors import UserError
from engine.checkpoint import classifier_name, load_model_state, set_rng_state
from engine.loop import RunState
from engine.protocols import Trainer
from engine.run_log import csv_history
from layers import MaskSet, init_scores
from layers.selector import STRUCTURED
from pruning.methods import magnitude_masks

FINETUNE_MUST_MATCH = ("arch", "layer_type", "k")  # + scope and coupled when the masks must be re-derived
HEAD_KEYS = ("weight", "bias", "popup_scores", "mask")  # what a (masked) classifier stores


def check_matches(ckpt: dict[str, Any], *, run: dict[str, Any], keys: tuple[str, ...], source: str) -> None:
    saved = ckpt.get("config") or {}
    if "arch" in ckpt and "arch" in keys and ckpt["arch"] != run["arch"]:
        raise UserError(f"{source} holds a '{ckpt['arch']}' but this run builds '{run['arch']}'; "
                        f"pass --arch {ckpt['arch']}")
    for key in keys:
        if key in saved and saved[key] != run.get(key):
            flag = "--" + key.replace("_", "-")
            if saved[key] is None or saved[key] is False:  # an option left out, or a switch left off
                fix = f"drop {flag}"
            else:
                fix = f"pass {flag}" if saved[key] is True else f"pass {flag} {saved[key]}"
            raise UserError(f"{source} was written with {key}={saved[key]!r} but this run has {key}={run.get(key)!r}; "
                            f"{fix} (or use a matching checkpoint)")


def _is_score_or_mask(key: str) -> bool:
    return key.endswith((".popup_scores", ".mask"))


def set_stored_masks(maskset: MaskSet, masks: dict[str, torch.Tensor], source: str) -> None:
    try:
        maskset.set_masks(masks)
    except ValueError as exc:
        raise UserError(f"{source}: its stored masks do not fit this model ({exc}); check --arch and "
                        "--layer-type against the run that wrote it") from None


def drop_classifier(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> tuple[dict, str, str]:
    """``state`` without the classifier entries; returns (state, classifier name, notice)."""
    head = classifier_name(model)
    if head is None:
        raise UserError("--reset-head: this --arch has no Linear classifier to reset; drop --reset-head")
    if f"{head}.weight" not in state:
        raise UserError(f"--reset-head: {source} has no {head}.weight (this model's classifier); "
                        "check --arch against the network it holds")
    theirs = state[f"{head}.weight"].shape[0]
    ours = model.get_submodule(head).out_features
    kept = {k: v for k, v in state.items() if k not in {f"{head}.{name}" for name in HEAD_KEYS}}
    return kept, head, (f"{source}: --reset-head: dropped its classifier {head} ({theirs} classes); "
                        f"{head} is freshly initialised for {ours} classes")


def load_source(model: nn.Module, maskset: MaskSet | None, ckpt: dict[str, Any], *, mode: str,
                run: dict[str, Any], source: str, scores_init_type: str, scaled_score_init: bool,
                notice: Callable[[str], None], reset_head: bool = False) -> None:
    """Load ``ckpt`` (from ``load_checkpoint``) as the source network of a ``mode`` run."""
    state = ckpt["state_dict"]
    check_matches(ckpt, run=run, keys=("arch",), source=source)
    head = None
    if reset_head:
        state, head, line = drop_classifier(model, state, source)
        notice(line + ("; in finetune it stays dense (it has no learned mask)" if mode == "finetune" else ""))
    is_head = (lambda k: k.rsplit(".", 1)[0] == head) if head else (lambda k: False)
    if maskset is not None and any(_is_score_or_mask(k) for k in state):
        # a masked source has scores exactly for its non-excluded layers: the same layers must be masked here
        check_matches(ckpt, run=run, keys=("exclude_layers",), source=source)
    if maskset is None:  # a dense model (pretrain, or evaluating one)
        if any(_is_score_or_mask(k) for k in state):
            raise UserError(f"{source} is a pruned (masked) checkpoint; evaluate or fine-tune it with "
                            "--exp-mode finetune --layer-type <its layer type> --k <its k>")
        load_model_state(model, state, source=source, notice=notice, may_lack=is_head)
        return
    has_scores = any(k.endswith(".popup_scores") for k in state)
    masks = ckpt.get("masks")
    dense = not has_scores and not masks
    if mode == "finetune":
        if dense and not scaled_score_init:
            raise UserError(f"{source} has no scores or masks: finetune needs the output of --exp-mode prune, or "
                            "pass --scaled-score-init for HYDRA's magnitude baseline (the mask is the top-k of |w|)")
        if not dense:
            keys: tuple[str, ...] = FINETUNE_MUST_MATCH if masks else FINETUNE_MUST_MATCH + ("scope", "coupled")
            if run.get("layer_type") == "nm":  # 2:4 and 4:8 share k = 0.5: the pattern itself must match
                keys += ("nm",)
            if masks and set(masks) - set(maskset.layers):  # coupling masked layers a plain run does not (ConvNeXt)
                keys += ("coupled",)
            check_matches(ckpt, run=run, keys=keys, source=source)
    lacks = load_model_state(model, state, source=source, notice=notice,
                             may_lack=lambda k: k.endswith(".mask") or is_head(k)
                             or ((mode == "prune" or dense) and k.endswith(".popup_scores")))
    if mode == "prune":
        if scaled_score_init:
            init_scores(maskset.layers, kind="scaled")
        else:  # only the layers whose scores the checkpoint lacks (all of them for a dense source)
            fresh = {name: layer for name, layer in maskset.layers.items() if f"{name}.popup_scores" in lacks}
            init_scores(fresh, kind=scores_init_type)
        maskset.step(force=True)
        return
    dense_head = {head: torch.ones_like(maskset.layers[head].mask)} if head in maskset.layers else {}
    if dense:
        set_stored_masks(maskset, {**hydra_baseline_masks(maskset), **dense_head}, source)
        notice(f"{source} is dense: HYDRA's magnitude baseline, the mask is the top-k of |w| at k={maskset.k:g} "
               f"({maskset.granularity}, scope {maskset.scope}); no score training")
        return
    if masks:
        set_stored_masks(maskset, {**{n: m for n, m in masks.items() if n != head}, **dense_head}, source)
        return
    if not ckpt.get("config") and maskset.granularity in STRUCTURED and maskset.scope == "global":
        # BiP selects filters/channels layer by layer (HYDRA has no structured masks): a global
        # selection would give another mask than the one the checkpoint was trained with.
        raise UserError(f"{source} is a public BiP {maskset.granularity} checkpoint, whose masks are chosen per "
                        f"layer: pass --scope layer")
    if not ckpt.get("config"):  # a public HYDRA/BiP checkpoint: its scope is not recorded
        notice(f"{source}: masks derived from its scores with k={maskset.k:g}, {maskset.granularity}, "
               f"scope {maskset.scope} (HYDRA prunes per layer: pass --scope layer for its checkpoints)")
    maskset.step(force=True)
    maskset.freeze()
    if dense_head:
        set_stored_masks(maskset, {**maskset.masks(), **dense_head}, source)


def hydra_baseline_masks(maskset: MaskSet) -> dict[str, torch.Tensor]:
    """HYDRA's magnitude baseline: the magnitude criterion's top-k (``pruning.methods``) with the run's k,
    granularity and scope (filters/channels ranked by their weights' L2 norm). The scores are set to
    HYDRA's scaled init s = sqrt(6/fan_in) * w / max|w| (what its ``--scaled-score-init`` finetune
    holds). Per layer the top-k of those scores is this mask (a positive factor per layer changes no
    ranking); over all layers it is not, so the mask is taken from the weights themselves, the global
    magnitude ranking."""
    init_scores(maskset.layers, kind="scaled")
    return magnitude_masks(maskset.layers, k=maskset.k, granularity=maskset.granularity, scope=maskset.scope,
                           min_units=maskset.min_units, nm=maskset.nm)


def resume_into(model: nn.Module, maskset: MaskSet | None, ckpt: dict[str, Any], *, source: str,
                notice: Callable[[str], None]) -> None:
    """Load a checkpoint checked by ``check_resumable`` into the model built from its own config."""
    load_model_state(model, ckpt["state_dict"], source=source, notice=notice)
    if maskset is None:
        return
    # Frozen masks (finetune, OBS steps) are data; learned masks are a function of the scores.
    if ckpt.get("masks_frozen"):
        set_stored_masks(maskset, ckpt["masks"], source)
    else:
        maskset.step(force=True)


def load_trainer_state(trainer: Trainer, state: dict[str, Any], source: str) -> None:
    """Optimizer state from a checkpoint; one that does not fit the trainer is a damaged file."""
    try:
        trainer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
        raise UserError(f"{source}: its optimizer state does not fit this run ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else 'no detail'}); the file is damaged "
                        "or was edited; resume from another checkpoint of the run") from None


def resumed_state(trainer: Trainer, ckpt: dict[str, Any], *, source: str, run_dir: str | None,
                  notice: Callable[[str], None]) -> RunState:
    """Where a resumed run continues: the trainer's optimizer state, the epochs done and their history
    (from metrics.csv for a checkpoint written before checkpoints held it), and the RNG state."""
    load_trainer_state(trainer, ckpt["trainer_state"], source)
    history = ckpt.get("history")
    if history is None:  # written before checkpoints held it: take metrics.csv up to the checkpoint
        history = csv_history(run_dir, ckpt["epoch"]) if run_dir else []
        notice(f"{source} holds no per-epoch history (an older train.py): metrics.csv "
               + (f"keeps its rows up to epoch {ckpt['epoch']}" if run_dir else f"starts at epoch {ckpt['epoch'] + 1}"))
    set_rng_state(ckpt["rng"])
    return RunState(start_epoch=ckpt["epoch"], best_prec1=float(ckpt["best_prec1"]), history=list(history))
