"""FLOPs of masked layers, for FLOPs-aware pruning (``--flops-power``, ``--flops-target``).

A FLOP here is one multiply-accumulate of a weight, per input sample: a conv weight is used once
per output position (H_out * W_out MACs), a linear weight once per sample (or once per position
of the leading dims when a linear layer maps a sequence). Biases, BatchNorm and activations are
not counted: they do not shrink when weights are pruned. These counts depend on the architecture
and the input size only, never on the masks, so they are measured once, with forward hooks on one
input of the run's size.

The dense FLOPs of a model are sum_layer numel(weight) * flops_per_weight[layer]; the kept FLOPs
count only the weights that are still alive.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


def _positions_per_weight(module: nn.Module, output: torch.Tensor) -> int:
    """How many times each weight of ``module`` is used for ONE sample of this call's batch."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return math.prod(output.shape[2:])  # one MAC per output position (spatial dims)
    if isinstance(module, nn.Linear):
        return math.prod(output.shape[1:-1])  # 1 for (N, features); L for (N, L, features)
    raise TypeError(f"no FLOPs rule for {type(module).__name__} (conv and linear layers only)")


@torch.no_grad()
def flops_per_weight(model: nn.Module, *, example: torch.Tensor, layers: Mapping[str, nn.Module]) -> dict[str, int]:
    """FLOPs (MACs) per weight and per sample of each layer in ``layers``, from one forward pass of
    ``example`` (a batch; its first dim is the batch). A layer called several times in one forward
    (shared weights) adds up its calls. The model is run in eval mode (BatchNorm statistics are
    not touched) and put back in its previous mode."""
    counts = dict.fromkeys(layers, 0)

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            counts[name] += _positions_per_weight(module, output)
        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    unused = [name for name, c in counts.items() if c == 0]
    if unused:
        raise ValueError(f"masked layers {unused[:3]} took no part in the forward pass: their FLOPs are unknown")
    return counts


def flops_budget(fraction: float, dense_flops: int) -> int:
    """The kept FLOPs allowed at ``fraction`` of ``dense_flops``: floor(fraction * dense), with float
    noise of a few ulps just below an integer rounded away (0.3 * 1000 may be 299.99999999999994;
    the same rule as ``layers.selector.n_keep``)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"FLOPs fraction must be in (0, 1], got {fraction}")
    value = fraction * dense_flops
    return min(dense_flops, math.floor(value + 8 * sys.float_info.epsilon * max(1.0, value)))


def largest_prefix_within(costs: torch.Tensor, budget: int) -> int:
    """The largest n such that costs[:n].sum() <= budget (costs >= 0, in rank order, best first).

    A binary search (``searchsorted``) over the cumulative sums: only FLOPs are counted, nothing is
    pruned or updated while searching. Integer costs are summed in int64, so the comparison with
    the budget is exact."""
    if costs.numel() == 0:
        return 0
    if bool((costs < 0).any()):
        raise ValueError("FLOPs costs must be >= 0")
    cumulative = torch.cumsum(costs.to(torch.int64), 0)
    return int(torch.searchsorted(cumulative, torch.tensor([budget], dtype=torch.int64, device=costs.device),
                                  right=True)[0])


def weight_by_flops(scores: dict[str, torch.Tensor], *, flops: dict[str, int], power: float,
                    granularity: str) -> dict[str, torch.Tensor]:
    """Scores whose statistic is divided by flops_per_weight[layer]^power (FLOP-heavy layers rank lower).

    The selector ranks |score| per weight but the L2 norm of a filter's/channel's scores, and the OBS
    solver's group scores are sqrt(statistic)-valued: dividing each score of a group by f^(p/2)
    divides the group's statistic by f^p."""
    p = power if granularity == "unstructured" else power / 2
    out = {}
    for name, s in scores.items():
        weighted = s.abs() / float(flops[name]) ** p
        # An alive weight must still outrank a pruned one (score 0): no underflow to 0.
        tiny = torch.finfo(weighted.dtype).tiny
        out[name] = torch.where(s != 0, weighted.clamp_min(tiny), torch.zeros((), dtype=s.dtype, device=s.device))
    return out


def select_within_flops(scores: dict[str, torch.Tensor], *, shapes: dict[str, torch.Size], alive_units: int,
                        flops: dict[str, int], granularity: str, min_units: int,
                        fraction: float) -> tuple[dict[str, torch.Tensor], dict[str, int | None]]:
    """Masks keeping the largest prefix of all layers' units, ranked exactly as the shared selector
    ranks them, whose FLOPs fit ``fraction`` of the dense FLOPs; and a record of the search.

    Only FLOPs are summed here (a binary search over the cumulative sums): no weight is touched, so
    the caller applies ONE update for the chosen set (the public WoodFisher code re-applied the OBS
    update at every step of its search). The ranking: the selector's unit scores, each layer's best
    ``min_units`` first, ties to the higher flat index (a stable ascending sort, reversed). Never
    revives a unit (``alive_units`` caps the count: pruned units score 0 and rank last); the floor
    and one unit win over the budget, as ``n_keep`` keeps at least one unit."""
    from layers.selector import UNIT_SCORES, expand_units, global_ranking

    names = list(shapes)
    units = [UNIT_SCORES[granularity](scores[n].detach()) for n in names]
    flat = global_ranking(units, min_units=min_units)
    forced = sum(min(min_units, u.numel()) for u in units)
    costs = torch.cat([torch.full((u.numel(),), (math.prod(shapes[n]) // u.numel()) * flops[n], dtype=torch.int64,
                                  device=flat.device) for n, u in zip(names, units)])
    order = torch.sort(flat, stable=True).indices.flip(0)
    ranked = costs[order]
    dense = sum(math.prod(shapes[n]) * flops[n] for n in names)
    budget = flops_budget(fraction, dense)
    n = min(max(largest_prefix_within(ranked, budget), 1, forced), alive_units)
    keep = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
    keep[order[:n]] = True
    new = {name: expand_units(part, shapes[name], granularity)
           for name, part in zip(names, keep.split([u.numel() for u in units]))}
    search = {"flops_budget": budget, "flops_dense": dense, "kept_units": n,
              "flops_next": int(ranked[n]) if n < alive_units else None}
    return new, search
