"""Parameters and FLOPs of a model, dense and as masked: the one counter the run summary, ``--evaluate``,
the results report and the FLOPs-aware WoodFisher methods share (``pruning.flops`` gives the FLOPs per
weight; this module adds them up).

Counted: the weights of every Conv2d and Linear layer, masked or plain (a classifier that filter masks
leave dense still costs its weights). A weight is kept when its mask is True (plain layers keep all).
FLOPs are multiply-accumulates per sample (see ``pruning.flops``). Biases and BatchNorm are left out:
pruning does not remove them, and at the densities studied they are a rounding error.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import cast

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


def kept_weights(layers: Mapping[str, nn.Module]) -> list[int]:
    """The kept weights of each layer (its mask's True count; all of a plain layer's), in one host read."""
    counts = []
    for layer in layers.values():
        weight = cast(torch.Tensor, layer.weight)
        mask = getattr(layer, "mask", None)
        counts.append(mask.sum() if isinstance(mask, torch.Tensor) else torch.tensor(weight.numel(),
                                                                                    device=weight.device))
    return torch.stack([c.to(torch.int64) for c in counts]).tolist() if counts else []


def kept_flops(layers: Mapping[str, nn.Module], flops: Mapping[str, int], *,
               kept: list[int] | None = None) -> tuple[int, int]:
    """(kept, dense) FLOPs of ``layers`` given their FLOPs per weight (``pruning.flops.flops_per_weight``);
    ``kept``: their ``kept_weights``, when the caller has read them."""
    kept = kept_weights(layers) if kept is None else kept
    totals = [cast(torch.Tensor, layer.weight).numel() for layer in layers.values()]
    per_weight = [flops[name] for name in layers]
    return (sum(k * f for k, f in zip(kept, per_weight)), sum(t * f for t, f in zip(totals, per_weight)))


@torch.no_grad()
def model_cost(model: nn.Module, *, example: torch.Tensor) -> ModelCost:
    """Count ``model``'s weights and FLOPs for one sample shaped like ``example`` (a batch of >= 1).
    Masked layers (with a boolean ``mask`` buffer) count their kept weights; one host read in all."""
    layers = weight_layers(model)
    per_weight = flops_per_weight(model, example=example[:1], layers=layers)
    kept = kept_weights(layers)
    flops_kept, flops_total = kept_flops(layers, per_weight, kept=kept)
    return ModelCost(params_total=sum(m.weight.numel() for m in layers.values()), params_kept=sum(kept),
                     flops_total=flops_total, flops_kept=flops_kept)
