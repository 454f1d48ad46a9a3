"""What trainers that set masks themselves and train the weights under them share (WoodFisher, LTH):
the optimizer owns the weights, not the scores; the masks are frozen between pruning events; after
every optimizer step the pruned weights are zeroed again, so that momentum, weight decay or Adam
never bring them back; and a pruning event clears the optimizer state of the weights it removed."""
from __future__ import annotations

from typing import Any

import torch

from engine.optim import OptimSettings, own_only, split_parameters
from layers import MaskSet, dense_masks
from trainers.base import BaseTrainer


class FixedMaskTrainer(BaseTrainer):
    maskset: MaskSet

    def setup_weights(self, *, weight_optim: OptimSettings, freeze_bn: bool) -> list[torch.nn.Parameter]:
        """The weight optimizer, owning every parameter but the scores (and BatchNorm with freeze_bn).
        A fresh run starts dense; a resumed one (masks frozen, restored from its checkpoint) keeps its
        masks. Returns the parameters the optimizer owns."""
        scores, bn, other = split_parameters(self.model)
        params = other + ([] if freeze_bn else bn)
        own_only(self.model, params)  # scores are unused and frozen
        self.add_optimizer("optimizer", params, weight_optim)
        ms = self.maskset
        if not ms.frozen:
            ms.set_masks(dense_masks(ms.layers))
        self.apply_masks()
        return params

    def step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = super().step(batch)
        self.apply_masks()  # pruned weights stay exactly zero (momentum, weight decay, Adam, ...)
        return out

    @torch.no_grad()
    def apply_masks(self) -> None:
        layers = list(self.maskset.layers.values())  # one operator for every layer (the masks in the weights' dtype)
        torch._foreach_mul_([layer.weight for layer in layers], [layer.multiplier() for layer in layers])

    @torch.no_grad()
    def clear_pruned_state(self) -> None:
        """Zero the pruned coordinates of every weight-shaped optimizer state (SGD momentum, Adam moments)."""
        for opt in self.optimizers.values():
            for layer in self.maskset.layers.values():
                for value in opt.state.get(layer.weight, {}).values():
                    if torch.is_tensor(value) and value.shape == layer.weight.shape:
                        value.mul_(layer.mask)
