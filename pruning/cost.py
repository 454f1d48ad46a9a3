"""Parameters and FLOPs of a model, dense and as masked: the one counter the run summary, ``--evaluate``,
the results report and the FLOPs-aware WoodFisher methods share (``pruning.flops`` gives the FLOPs per
weight; this module adds them up).

Counted: the weights of every Conv2d and Linear layer, masked or plain (a classifier that filter masks
leave dense still costs its weights). A weight is kept when its mask is True (plain layers keep all).
FLOPs are multiply-accumulates per sample (see ``pruning.flops``). Biases and BatchNorm are left out:
pruning does not remove them, and at the densities studied they are a rounding error.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from pruning.flops import flops_per_weight


@dataclass(frozen=True)
class ModelCost:
    params_total: int  # conv/linear weights
    params_kept: int
    flops_total: int  # multiply-accumulates per sample, dense
    flops_kept: int

    @property
    def params_ratio(self) -> float:
        return self.params_kept / self.params_total if self.params_total else 1.0

    @property
    def flops_ratio(self) -> float:
        return self.flops_kept / self.flops_total if self.flops_total else 1.0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def line(self) -> str:
        return (f"weights kept {self.params_kept:,} of {self.params_total:,} ({100 * self.params_ratio:.2f}%), "
                f"FLOPs kept {self.flops_kept:,} of {self.flops_total:,} per sample ({100 * self.flops_ratio:.2f}%)")


def weight_layers(model: nn.Module) -> dict[str, nn.Conv2d | nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@torch.no_grad()
def model_cost(model: nn.Module, *, example: torch.Tensor) -> ModelCost:
    """Count ``model``'s weights and FLOPs for one sample shaped like ``example`` (a batch of >= 1).
    Masked layers (with a boolean ``mask`` buffer) count their kept weights; one host read in all."""
    layers = weight_layers(model)
    per_weight = flops_per_weight(model, example=example[:1], layers=layers)
    weights = [m.weight for m in layers.values()]
    masks = [getattr(m, "mask", None) for m in layers.values()]
    kept = [mask.sum() if isinstance(mask, torch.Tensor) else torch.tensor(w.numel(), device=w.device)
            for mask, w in zip(masks, weights)]
    kept_counts = torch.stack([k.to(torch.int64) for k in kept]).tolist() if kept else []
    totals = [w.numel() for w in weights]
    flops = list(per_weight.values())
    return ModelCost(params_total=sum(totals), params_kept=sum(kept_counts),
                     flops_total=sum(t * f for t, f in zip(totals, flops)),
                     flops_kept=sum(k * f for k, f in zip(kept_counts, flops)))
