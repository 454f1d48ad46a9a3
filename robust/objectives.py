"""Training objectives by name (``--objective``): the loss every trainer takes its step on.

A trainer never computes its loss itself: it calls ``objective(model, x, y)`` and gets
``(loss, logits)``, so HYDRA's score step, BiP's two levels, fine-tuning and WoodFisher's weight
steps all train on the same robust loss without copies of the trainers. ``logits`` are those the
run reports as its training accuracy: of the clean inputs where the loss has a clean term
(natural, trades, stability), else of the inputs the loss is computed on (the PGD examples for
pgd, the noisy inputs for smooth).

| name      | loss                                                    | extra forward/backward passes  |
|-----------|---------------------------------------------------------|--------------------------------|
| natural   | CE(f(x), y)                                             | none                           |
| pgd       | CE(f(x_adv), y), x_adv = PGD on CE from a random start  | num_steps (input gradient only) |
| trades    | CE(f(x), y) + beta * KL(f(x) || f(x_adv)) / batch,      | num_steps + 1 forward           |
|           | x_adv = PGD on that KL from x + 0.001 N(0, 1)           |                                |
| smooth    | CE(f(x + d), y), d ~ N(0, sigma^2)                      | none                           |
| stability | CE(f(x), y) + beta * KL(f(x) || f(x + d)) / batch       | 1 forward                      |

CE is the trainer's criterion (with its label smoothing); the attacks use the plain one. The
adversarial examples are made in eval mode (``robust.attacks``); the loss is then computed in the
mode the trainer set (train mode). trades and stability are HYDRA's ``trainer/adv.py`` and
``trainer/smooth.py`` (CIFAR branch); smooth is Cohen et al.'s Gaussian augmentation (HYDRA's
ImageNet branch).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from configs.options import RobustOptions
from configs.registry import Registry
from robust.attacks import cross_entropy_loss, eval_mode, kl_loss, pgd

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Builder = Callable[[RobustOptions, nn.Module], Objective]

OBJECTIVES: Registry[Builder] = Registry("objective", flag="--objective")


def _kl(logits_other: torch.Tensor, logits_clean: torch.Tensor) -> torch.Tensor:
    """KL(softmax(clean) || softmax(other)), summed and divided by the batch size, as TRADES writes
    it; the gradient flows through both sides (TRADES does not detach the clean prediction)."""
    return F.kl_div(F.log_softmax(logits_other, dim=1), F.softmax(logits_clean, dim=1),
                    reduction="sum") / logits_clean.shape[0]


@OBJECTIVES.register("natural")
def natural(options: RobustOptions, criterion: nn.Module) -> Objective:
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return criterion(logits, y), logits
    return loss


def _attack(options: RobustOptions) -> dict:
    return {"epsilon": options.epsilon, "step_size": options.step_size, "num_steps": options.num_steps,
            "distance": options.distance, "clip_min": options.clip_min, "clip_max": options.clip_max}


@OBJECTIVES.register("pgd")
def pgd_objective(options: RobustOptions, criterion: nn.Module) -> Objective:
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = pgd(model, x, loss=cross_entropy_loss(y), start="ball", **_attack(options))
        logits = model(x_adv)
        return criterion(logits, y), logits
    return loss


@OBJECTIVES.register("trades")
def trades(options: RobustOptions, criterion: nn.Module) -> Objective:
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), eval_mode(model):  # the attack's fixed target: the clean prediction, as TRADES
            clean = F.softmax(model(x), dim=1)
        x_adv = pgd(model, x, loss=kl_loss(clean), start="gauss", **_attack(options))
        logits = model(x)
        return criterion(logits, y) + options.beta * _kl(model(x_adv), logits), logits
    return loss


def _noise(x: torch.Tensor, options: RobustOptions) -> torch.Tensor:
    assert options.noise_std is not None  # RobustOptions.check_combination requires it
    return x + options.noise_std * torch.randn_like(x)


@OBJECTIVES.register("smooth")
def smooth(options: RobustOptions, criterion: nn.Module) -> Objective:
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(_noise(x, options))
        return criterion(logits, y), logits
    return loss


@OBJECTIVES.register("stability")
def stability(options: RobustOptions, criterion: nn.Module) -> Objective:
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return criterion(logits, y) + options.beta * _kl(model(_noise(x, options)), logits), logits
    return loss


def build_objective(options: RobustOptions | None, criterion: nn.Module) -> Objective:
    """The objective the options name (natural when None), with ``criterion`` as its cross-entropy."""
    options = options if options is not None else RobustOptions()
    return OBJECTIVES.get(options.objective)(options, criterion)
