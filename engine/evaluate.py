"""Evaluation of a model on a loader, by name (``--val-method``): clean, adversarial or certified.

Each evaluation returns a dict of metrics (loss, top1 and top5 of the clean inputs always; its own
robust metrics besides) and names the one that chooses model_best (``Evaluation.metric``). Every
key reaches the epoch line (the robust ones), metrics.csv, tensorboard and summary.json.
Evaluations draw their random numbers (PGD's random start, the smoothing noise) from a generator of
their own seeded with the run's seed: every epoch is measured with the same draws, and the run's
own random stream, which a resumed run must repeat, is left alone.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from configs.options import RobustOptions
from configs.registry import Registry
from engine.metrics import correct_topk
from robust.attacks import cross_entropy_loss, pgd
from robust.certify import Certificate, certified_accuracy, certify

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Batches, *, device: torch.device) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) of ``model`` on ``loader``."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss, c1, c5, n = 0.0, 0, 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss += float(criterion(logits, y))
        a, b = correct_topk(logits, y)
        c1, c5, n = c1 + a, c5 + b, n + y.shape[0]
    return {"loss": loss / max(n, 1), "top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1)}


@dataclass(frozen=True)
class Evaluation:
    run: Callable[..., dict[str, float]]  # (model, loader, *, device) -> metrics
    metric: str = "top1"                  # the key that chooses model_best (HYDRA's prec1)
    shown: tuple[str, ...] = ()           # robust keys shown in the epoch line besides top1

    def __call__(self, model: nn.Module, loader: Batches, *, device: torch.device) -> dict[str, float]:
        return self.run(model, loader, device=device)


EvaluationBuilder = Callable[[RobustOptions, int], Evaluation]  # (options, seed)
# --val-method: how a model is evaluated each epoch and at the end. BiP/HYDRA configs name it.
EVALUATIONS: Registry[EvaluationBuilder] = Registry("evaluation", flag="--val-method")
BASE = Evaluation(evaluate)


def build_evaluation(options: RobustOptions, *, seed: int) -> Evaluation:
    return EVALUATIONS.get(options.val_method)(options, seed)


@EVALUATIONS.register("base")
def base(options: RobustOptions, seed: int) -> Evaluation:
    return BASE


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@EVALUATIONS.register("adv")
def adversarial(options: RobustOptions, seed: int) -> Evaluation:
    """HYDRA's ``adv`` evaluation: clean top-1, and top-1 under PGD at the run's --epsilon, with
    --eval-num-steps steps from a random start in the ball."""
    def run(model: nn.Module, loader: Batches, *, device: torch.device) -> dict[str, float]:
        model.eval()
        generator = _generator(device, seed)
        sums = {"loss": 0.0, "top1": 0, "top5": 0, "adv_loss": 0.0, "adv_top1": 0}
        n = 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad():
                logits = model(x)
            x_adv = pgd(model, x, loss=cross_entropy_loss(y), epsilon=options.epsilon, step_size=options.step_size,
                        num_steps=options.eval_num_steps, distance=options.distance, clip_min=options.clip_min,
                        clip_max=options.clip_max, start="ball", generator=generator)
            with torch.no_grad():
                adv_logits = model(x_adv)
            c1, c5 = correct_topk(logits, y)
            sums["loss"] += float(F.cross_entropy(logits, y, reduction="sum"))
            sums["adv_loss"] += float(F.cross_entropy(adv_logits, y, reduction="sum"))
            sums["top1"] += c1
            sums["top5"] += c5
            sums["adv_top1"] += correct_topk(adv_logits, y, ks=(1,))[0]
            n += y.shape[0]
        scale = {key: 1.0 if "loss" in key else 100.0 for key in sums}
        return {key: scale[key] * value / max(n, 1) for key, value in sums.items()}
    return Evaluation(run, metric="adv_top1", shown=("adv_top1",))


def certified_key(r: float) -> str:
    return f"cert_r{r:g}"


@EVALUATIONS.register("smooth")
def smoothed(options: RobustOptions, seed: int) -> Evaluation:
    """Clean loss/top-1/top-5 on the whole split, and the certified top-1 of the Gaussian-smoothed
    classifier (Cohen et al.'s CERTIFY, ``robust.certify``) at each of --certify-radii on its first
    --certify-subset samples; model_best is chosen by the first radius."""
    assert options.noise_std is not None  # RobustOptions.check_combination requires it
    sigma = options.noise_std
    keys = tuple(certified_key(r) for r in options.radii)

    def run(model: nn.Module, loader: Batches, *, device: torch.device) -> dict[str, float]:
        metrics = evaluate(model, loader, device=device)  # leaves the model in eval mode
        generator = _generator(device, seed)
        certificates: list[Certificate] = []
        labels: list[int] = []
        num_classes = None
        for x, y in loader:
            if num_classes is None:
                with torch.no_grad():
                    num_classes = int(model(x[:1].to(device)).shape[1])
            for xi, yi in zip(x, y):
                if len(labels) == options.certify_subset:
                    break
                certificates.append(certify(model, xi.to(device), sigma=sigma, n0=options.certify_n0,
                                            n=options.certify_n, alpha=options.certify_alpha,
                                            batch=options.certify_batch, num_classes=num_classes,
                                            generator=generator))
                labels.append(int(yi))
            if len(labels) == options.certify_subset:
                break
        metrics.update(zip(keys, certified_accuracy(certificates, labels, options.radii)))
        metrics["certified"] = float(len(labels))
        return metrics
    return Evaluation(run, metric=keys[0], shown=keys)
