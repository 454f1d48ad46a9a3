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
def flops_per_weight(model: nn.Module, *, example: torch.Tensor, layers: dict[str, nn.Module]) -> dict[str, int]:
    """FLOPs (MACs) per weight and per sample of each layer in ``layers``, from one forward pass of
    ``example`` (a batch; its first dim is the batch). A layer called several times in one forward
    (shared weights) adds up its calls. The model is run in eval mode (BatchNorm statistics are
    not touched) and put back in its previous mode."""
    counts = {name: 0 for name in layers}

    def hook_for(name: str):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
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
