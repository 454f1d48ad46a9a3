"""Bringing a checkpoint into a run: the source network of prune/finetune, or a run to resume.

The rules, per mode:
- prune: weights (and scores, if the checkpoint has them) load into the masked model; missing
  scores get the configured init; ``scaled_score_init`` always re-derives them from the weights.
- finetune: the checkpoint must be pruned (scores or masks). Its stored masks are used as they
  are; a HYDRA/BiP checkpoint has none, so the selector derives them from its scores with this
  run's k, layer type and scope (the same rule the public code applies).
- resume: the checkpoint must come from a run with the same arch, dataset, mode, trainer, layer
  type, k and scope.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from configs.errors import UserError
from layers import MaskSet, init_scores

# Settings a resumed or fine-tuned checkpoint must share with the run (config key -> flag).
# seed, batch size and data fractions fix each epoch's batches: a resumed run repeats the rest exactly.
RESUME_MUST_MATCH = ("arch", "dataset", "exp_mode", "trainer", "layer_type", "k", "scope", "seed", "batch_size",
                     "data_fraction", "val_fraction")
# What to do instead of matching, where changing the flag is not the fix.
HINTS = {"exp_mode": "to start the next stage from it, pass it to --source-net instead of --resume"}
FINETUNE_MUST_MATCH = ("arch", "layer_type", "k")  # + scope when the masks must be re-derived


def check_matches(ckpt: dict[str, Any], *, run: dict[str, Any], keys: tuple[str, ...], source: str) -> None:
    saved = ckpt.get("config") or {}
    if "arch" in ckpt and "arch" in keys and ckpt["arch"] != run["arch"]:
        raise UserError(f"{source} holds a '{ckpt['arch']}' but this run builds '{run['arch']}'; pass --arch {ckpt['arch']}")
    for key in keys:
        if key in saved and saved[key] != run[key]:
            flag = "--" + key.replace("_", "-")
            fix = HINTS.get(key, f"pass {flag} {saved[key]} (or use a matching checkpoint)")
            raise UserError(f"{source} was written with {key}={saved[key]!r} but this run has {key}={run[key]!r}; {fix}")


def _is_score_or_mask(key: str) -> bool:
    return key.endswith(".popup_scores") or key.endswith(".mask")


def load_source(model: nn.Module, maskset: MaskSet | None, ckpt: dict[str, Any], *, mode: str,
                run: dict[str, Any], source: str, scores_init_type: str, scaled_score_init: bool,
                notice: Callable[[str], None]) -> None:
    """Load ``ckpt`` (from ``load_checkpoint``) as the source network of a ``mode`` run."""
    from trainers.checkpoint import load_model_state

    state = ckpt["state_dict"]
    check_matches(ckpt, run=run, keys=("arch",), source=source)
    if maskset is None:  # a dense model (pretrain, or evaluating one)
        if any(_is_score_or_mask(k) for k in state):
            raise UserError(f"{source} is a pruned (masked) checkpoint; evaluate or fine-tune it with "
                            "--exp-mode finetune --layer-type <its layer type> --k <its k>")
        load_model_state(model, state, source=source, notice=notice)
        return
    has_scores = any(k.endswith(".popup_scores") for k in state)
    masks = ckpt.get("masks")
    if mode == "finetune":
        if not has_scores and not masks:
            raise UserError(f"{source} has no scores or masks: finetune needs the output of --exp-mode prune")
        keys = FINETUNE_MUST_MATCH if masks else FINETUNE_MUST_MATCH + ("scope",)
        check_matches(ckpt, run=run, keys=keys, source=source)
    lacks = load_model_state(model, state, source=source, notice=notice,
                             may_lack=lambda k: k.endswith(".mask") or (mode == "prune" and k.endswith(".popup_scores")))
    if mode == "prune":
        if scaled_score_init:
            init_scores(maskset.layers, kind="scaled")
        elif any(k.endswith(".popup_scores") for k in lacks):
            init_scores(maskset.layers, kind=scores_init_type)
        maskset.step(force=True)
    elif masks:
        maskset.set_masks({name: m for name, m in masks.items()})
    else:
        if not ckpt.get("config") and maskset.granularity != "unstructured" and maskset.scope == "global":
            # BiP selects filters/channels layer by layer (HYDRA has no structured masks): a global
            # selection would give another mask than the one the checkpoint was trained with.
            raise UserError(f"{source} is a public BiP {maskset.granularity} checkpoint, whose masks are chosen per "
                            f"layer: pass --scope layer")
        if not ckpt.get("config"):  # a public HYDRA/BiP checkpoint: its scope is not recorded
            notice(f"{source}: masks derived from its scores with k={maskset.k:g}, {maskset.granularity}, "
                   f"scope {maskset.scope} (HYDRA prunes per layer: pass --scope layer for its checkpoints)")
        maskset.step(force=True)
        maskset.freeze()


def resume_into(model: nn.Module, maskset: MaskSet | None, ckpt: dict[str, Any], *, run: dict[str, Any],
                source: str, notice: Callable[[str], None]) -> None:
    from trainers.checkpoint import load_model_state

    if not ckpt.get("config"):
        raise UserError(f"{source} was not written by this train.py (no config in it); "
                        "use --source-net to start from it instead of --resume")
    check_matches(ckpt, run=run, keys=RESUME_MUST_MATCH, source=source)
    load_model_state(model, ckpt["state_dict"], source=source, notice=notice)
    if maskset is None:
        return
    # Frozen masks (finetune, OBS steps) are data; learned masks are a function of the scores.
    if ckpt.get("masks_frozen"):
        maskset.set_masks(ckpt["masks"])
    else:
        maskset.step(force=True)

