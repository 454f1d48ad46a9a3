"""BiP: bi-level pruning, weights (lower level) and scores (upper level) learned together.

One iteration on two distinct batches, x1 (lower) and x2 (upper, from the second stream):
1. lower level: one step of the weight optimizer on l(m * theta; x1) (+ its weight decay),
   scores untouched;
2. upper level at the new weights, on x2: g_s = dl/ds (straight-through) and
   g_theta = dl/dtheta of each masked layer, in ONE backward pass; the scores' gradient is
       g_s - lr2 * g_s * g_theta          (implicit_grad="paper", Algorithm 1 of the paper)
       g_s - lr2 * g_s * g_s              (implicit_grad="bip-code", what the public code computes)
   and the mask optimizer (its own lr and schedule) takes one step.
With ``accelerate`` each iteration takes a score step on x2 then a weight step on x1, with no
implicit term (BiP's fast mode).

Each optimizer owns only its parameters, and gradients are taken with ``torch.autograd.grad``
for exactly the tensors a step needs, so nothing depends on toggling ``requires_grad``.
"""
from __future__ import annotations

import torch

from trainers.base import BaseTrainer, OptimSettings, own_only, split_parameters
from trainers.registry import register_trainer

IMPLICIT_GRADS = ("paper", "bip-code")


@register_trainer("bilevel")
class BilevelTrainer(BaseTrainer):
    option_names = ("lr2", "implicit_grad", "accelerate")

    def setup(self, *, weights: OptimSettings, masks: OptimSettings | None, freeze_bn: bool,
              lr2: float = 1e-4, implicit_grad: str = "paper", accelerate: bool = False) -> None:
        if self.mode != "prune" or self.maskset is None or masks is None:
            raise ValueError("the bilevel trainer prunes: it needs mode 'prune', masked layers and mask settings")
        if implicit_grad not in IMPLICIT_GRADS:
            raise ValueError(f"implicit_grad must be one of {IMPLICIT_GRADS}, got {implicit_grad!r}")
        self.lr2 = lr2
        self.implicit_grad = implicit_grad
        self.accelerate = accelerate
        scores, bn, other = split_parameters(self.model)
        self.scores = scores
        self.weights = ([] if freeze_bn else bn) + other
        layers = list(self.maskset.layers.values())
        self.masked_weights = [layer.weight for layer in layers]
        if [id(l.popup_scores) for l in layers] != [id(s) for s in scores]:
            raise ValueError("every score tensor must belong to a masked layer of the mask set")
        own_only(self.model, self.scores + self.weights)
        self.add_optimizer("optimizer", self.weights, weights)
        self.add_optimizer("mask_optimizer", self.scores, masks)

    def batches(self, loaders):
        # The upper level reads its own stream (an independent shuffle, or a held-out split).
        return zip(loaders.train, loaders.upper), min(len(loaders.train), len(loaders.upper))

    @staticmethod
    def _apply(optimizer: torch.optim.Optimizer, params, grads) -> None:
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()

    def _loss(self, x, y):
        logits = self.model(x)
        return self.criterion(logits, y), logits

    def step(self, batch):
        (x1, y1), (x2, y2) = self._to_device(batch[0]), self._to_device(batch[1])
        opt, mask_opt = self.optimizers["optimizer"], self.optimizers["mask_optimizer"]
        if self.accelerate:
            loss_up, _ = self._loss(x2, y2)
            self._apply(mask_opt, self.scores, torch.autograd.grad(loss_up, self.scores))
            with self.maskset.scores_fixed():
                loss, logits = self._loss(x1, y1)
                self._apply(opt, self.weights, torch.autograd.grad(loss, self.weights))
            return loss.detach(), logits.detach(), y1
        # 1. lower level: weights on x1 (no score gradient needed)
        with self.maskset.scores_fixed():
            loss, logits = self._loss(x1, y1)
            self._apply(opt, self.weights, torch.autograd.grad(loss, self.weights))
        # 2. upper level: scores on x2 at the new weights, with the implicit-gradient term
        loss_up, _ = self._loss(x2, y2)
        n = len(self.scores)
        grads = torch.autograd.grad(loss_up, self.scores + self.masked_weights)
        g_s, g_theta = grads[:n], grads[n:]
        # g_s - lr2 * g_s * partner, built in place in g_theta's buffers (no longer needed)
        score_grads = []
        for gs, gt in zip(g_s, g_theta):
            partner = gt if self.implicit_grad == "paper" else gt.copy_(gs)
            score_grads.append(partner.mul_(gs).mul_(-self.lr2).add_(gs))
        self._apply(mask_opt, self.scores, score_grads)
        return loss.detach(), logits.detach(), y1
