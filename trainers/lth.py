"""Iterative magnitude pruning with rewinding (IMP), the lottery-ticket baseline BiP compares with.

From a dense trained network (``--source-net``), the run goes through n rounds of ``--epochs / n``
epochs each. At the start of round r it prunes by weight magnitude (global over all masked layers, or
per layer with ``--scope layer``) to density (1 - p)^r, p = ``--imp-rate`` (0.2: 20 % of the remaining
weights per round, Frankle & Carbin 2019), and the last round to ``--k`` exactly; n is the first round
whose density (1 - p)^n is within 1 % of ``--k`` or below it, so the lottery series k = 0.8, 0.64,
0.512, 0.41, ... 0.0092 (rounded to a few digits) takes exactly 1, 2, 3, 4, ... 21 rounds.

Rewinding (``--rewind-epoch R``, Frankle et al. 2020): after each pruning step every parameter and
BatchNorm statistic is reset to the source run's weights after R epochs of its training
(``checkpoint/rewind_epoch_R.pth.tar``, saved by a pretrain run given the same flag; R = 0 is the
initialisation, the original lottery ticket), the pruned weights stay zero, and the optimizer and the
learning-rate schedule start again: each round is a full training of the subnetwork. Without
``--rewind-epoch`` the weights carry over from round to round (IMP with fine-tuning).

Round r's last epoch is the IMP result at density (1 - p)^r: the results report
(``study.report``) reads every round from ``metrics.csv``. Only the last round competes for model_best.
"""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, cast

import torch

from configs.capabilities import Capabilities, RunSpec
from configs.errors import UserError
from configs.options import LthOptions, OptionSection
from engine.checkpoint import load_checkpoint, rewind_checkpoint
from engine.optim import OptimSettings
from pruning.methods import magnitude_masks
from pruning.schedule import layer_densities
from trainers.fixed_masks import FixedMaskTrainer
from trainers.registry import register_trainer

if TYPE_CHECKING:  # annotations only
    from data.loaders import Loaders

# A round's density (1 - p)^r counts as reaching k when it is at most 1 % above it: the published
# lottery series rounds 0.8^r to 3-4 digits (0.035 for 0.8^15 = 0.035184).
ROUND_TOLERANCE = 0.01


def imp_densities(k: float, rate: float) -> list[float]:
    """Density after each round: (1 - rate)^r, the last one replaced by k."""
    if not 0.0 < k < 1.0:
        raise ValueError(f"k must be in (0, 1), got {k}")
    densities = []
    d = 1.0
    while True:
        d *= 1.0 - rate
        if d <= k * (1.0 + ROUND_TOLERANCE):
            densities.append(k)
            return densities
        densities.append(round(d, 12))  # 0.64, not 0.6400000000000001: densities name results


def round_plan(*, k: float, rate: float, epochs: int) -> tuple[list[float], int]:
    """(density after each round, epochs per round); the run's epochs must split into equal rounds."""
    if not 0.0 < k < 1.0:
        raise UserError(f"--trainer lth needs a density below 1: pass --k in (0, 1), e.g. --k 0.1 (got {k:g})")
    densities = imp_densities(k, rate)
    rounds = len(densities)
    if epochs % rounds:
        low = max(1, epochs // rounds)
        raise UserError(f"--trainer lth at --k {k:g} with --imp-rate {rate:g} runs {rounds} rounds of equal length: "
                        f"pass --epochs a multiple of {rounds} (e.g. {low * rounds} or {(low + 1) * rounds})")
    return densities, epochs // rounds


def rewind_path(source: str, epoch: int) -> str:
    return rewind_checkpoint(os.path.dirname(os.path.abspath(source)), epoch)


@register_trainer("lth")
class LotteryTicketTrainer(FixedMaskTrainer):
    """IMP: prune by magnitude, rewind, retrain; one round per ``--epochs / rounds`` epochs."""

    capabilities = Capabilities(label="lth", rewind_point=True, coupled="prunes weights by magnitude, not filters",
                                k_schedule="prunes in rounds of --imp-rate")
    Options = LthOptions

    @classmethod
    def check_options(cls, options: OptionSection | None, *, run: RunSpec) -> None:
        o = cast(LthOptions, options)
        if run.mode != "prune":
            raise UserError(f"--trainer lth prunes: use --exp-mode prune (got {run.mode})")
        if run.layer_type != "unstructured":
            raise UserError(f"--trainer lth prunes single weights by magnitude: use --layer-type unstructured "
                            f"(got {run.layer_type}); for filters/channels use --trainer woodfisher --prune-method "
                            "magnitude")
        round_plan(k=run.k, rate=o.imp_rate, epochs=run.epochs)

    def setup(self, *, weight_optim: OptimSettings, score_optim: OptimSettings | None, freeze_bn: bool) -> None:
        if self.mode != "prune" or self.maskset is None:
            raise ValueError("the lth trainer prunes: it needs mode 'prune' and masked layers")
        self.opts = cast(LthOptions, self.options)
        self.densities, self.round_epochs = round_plan(k=self.maskset.k, rate=self.opts.imp_rate,
                                                       epochs=weight_optim.epochs)
        # Each round restarts the schedule: a round is a full training of the subnetwork.
        self.round_optim = dataclasses.replace(weight_optim, epochs=self.round_epochs)
        self.params = self.setup_weights(weight_optim=self.round_optim, freeze_bn=freeze_bn)
        self.rewind_state = self._load_rewind_point()
        self._notes: list[str] = []

    def _load_rewind_point(self) -> dict[str, torch.Tensor] | None:
        epoch = self.opts.rewind_epoch
        if epoch is None:
            return None
        if not self.source:
            raise UserError("--rewind-epoch: lth rewinds to a checkpoint of the --source-net run; pass --source-net")
        path = rewind_path(self.source, epoch)
        if not os.path.isfile(path):
            raise UserError(f"--rewind-epoch {epoch}: {path} does not exist; pretrain the source with --rewind-epoch "
                            f"{epoch} (it saves that checkpoint), or drop --rewind-epoch to fine-tune between rounds")
        state = load_checkpoint(path).get("state_dict")
        own = self.model.state_dict()
        # The rewind point is a pretrain checkpoint: a plain model, so the masked model's extra entries
        # (scores, masks) are not in it; every entry it has must match ours exactly.
        if not isinstance(state, dict) or any(name not in state or state[name].shape != value.shape
                                              for name, value in own.items()
                                              if not name.endswith((".popup_scores", ".mask"))):
            raise UserError(f"{path} does not hold the weights of this --arch (a different architecture or class "
                            "count): pretrain the source again with --rewind-epoch")
        return {name: value.to(self.device) for name, value in state.items() if name in own}

    # -- hooks used by the epoch loop ------------------------------------------------------------
    def set_epoch(self, epoch: int) -> dict[str, float]:
        return super().set_epoch(epoch % self.round_epochs)

    def train_epoch(self, epoch: int, loaders: Loaders) -> dict[str, float]:
        if epoch % self.round_epochs == 0:
            self.prune_round(epoch // self.round_epochs)
        return super().train_epoch(epoch, loaders)

    def final_masks(self, epoch: int) -> bool:
        return epoch >= (len(self.densities) - 1) * self.round_epochs

    def pop_notes(self) -> list[str]:
        notes, self._notes = self._notes, []
        return notes

    # -- one round -------------------------------------------------------------------------------
    @torch.no_grad()
    def prune_round(self, index: int) -> None:
        """Prune to the round's density by magnitude, rewind, and restart the optimizer."""
        ms = self.maskset
        density = self.densities[index]
        before = ms.density()
        # The magnitude criterion over the surviving weights: pruned ones rank below every survivor
        # (a survivor that is exactly 0 too), so a round only removes weights.
        if ms.layer_k is None:
            masks = magnitude_masks(ms.layers, k=density, granularity="unstructured", scope=ms.scope,
                                    min_units=ms.min_units, alive_only=True)
        else:  # --layer-k: each round removes the same fraction of each layer's survivors, ending at its own k
            per_layer = layer_densities(ms.layer_k, k=ms.final_k, density=density, geometric=True)
            masks = {name: magnitude_masks({name: layer}, k=per_layer[name], granularity="unstructured",
                                           scope="layer", alive_only=True)[name] for name, layer in ms.layers.items()}
        ms.set_masks(masks)
        if self.rewind_state is not None:
            own = self.model.state_dict()
            for name, value in self.rewind_state.items():
                own[name].copy_(value)
        self.apply_masks()
        # A fresh optimizer: no momentum carries over from the previous round (nor from the removed weights).
        self.add_optimizer("optimizer", self.params, self.round_optim)
        rewound = (f"rewound to the source's weights after epoch {self.opts.rewind_epoch}"
                   if self.rewind_state is not None else "weights kept (no --rewind-epoch)")
        self._notes.append(f"IMP round {index + 1}/{len(self.densities)}: magnitude pruning ({ms.scope}), "
                           f"density {100 * before:.2f}% -> "
                           f"{100 * ms.density():.2f}% (round target {100 * density:.2f}%), {rewound}; "
                           f"{self.round_epochs} epochs of training follow")

    def summary_fields(self) -> dict[str, Any]:
        """Every round's density and last epoch, for summary.json (the report reads the rounds' accuracy
        from metrics.csv at those epochs)."""
        rounds = [{"round": i + 1, "density": d, "end_epoch": (i + 1) * self.round_epochs}
                  for i, d in enumerate(self.densities)]
        return {**super().summary_fields(), "imp_rounds": rounds}
