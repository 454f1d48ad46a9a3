"""FLOPs of a model: its dense multiply-accumulates, and the MACs per weight of its masked layers, for
the counter (``pruning.cost``) and FLOPs-aware pruning (``--flops-power``, ``--flops-target``).

A FLOP here is one multiply-accumulate (MAC) per input sample. ``dense_macs`` counts every matrix
product, convolution and attention of one forward pass with PyTorch's own
``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 FLOPs per MAC), so a module of any type
is counted as long as it computes through those operators; elementwise work (biases, BatchNorm,
activations) is not counted. ``flops_per_weight`` gives, per masked layer, how many MACs each of its
weights does for one sample (a conv weight once per output position, a linear weight once per row
of its input, e.g. per token): pruning a weight removes exactly that many MACs. Both depend on the
architecture and the input size only, never on the masks, so they are measured once, on one input
of the run's size.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

aten = torch.ops.aten

# Attention on the CPU runs through ``_scaled_dot_product_flash_attention_for_cpu``, which
# FlopCounterMode (torch 2.14) has no formula for: without one, a ViT's attention products count 0.
# Its arithmetic is the CUDA flash kernel's, so the same formula applies. Passed per counter
# (``custom_mapping``), never registered globally.
_EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {}
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu") and \
        aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
    def _cpu_flash_flop(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: Any,
                        out_shape: Any = None, **kwargs: Any) -> int:
        return int(sdpa_flop_count(query_shape, key_shape, value_shape))

    _EXTRA_FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_flop


@contextmanager
def _counting(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm statistics untouched), no autograd, and no fused attention fast path:
    nn.MultiheadAttention's inference fast path runs one fused operator that no counter sees.
    Everything is put back afterwards."""
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)


def dense_macs(model: nn.Module, *, example: torch.Tensor) -> int:
    """The multiply-accumulates of one forward pass per sample of ``example`` (a batch; its first dim
    is the batch), as PyTorch's FlopCounterMode counts them (FLOPs / 2). Masks do not change it: a
    masked layer still multiplies its whole (masked) weight."""
    with _counting(model), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        model(example)
    return int(counter.get_total_flops()) // (2 * example.shape[0])


def _uses_per_weight(module: nn.Module, output: torch.Tensor, batch: int) -> int:
    """How many times each weight of ``module`` is used for ONE sample of a batch of ``batch``: once
    per output element of its output unit (conv: per output position; linear: per input row, which
    covers (N, features), (N, L, features) and the (L, N, features) layout of attention alike)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        units = module.out_channels
    elif isinstance(module, nn.Linear):
        units = module.out_features
    else:
        raise TypeError(f"no FLOPs rule for {type(module).__name__} (conv and linear layers only)")
    return output.numel() // (units * batch)


def flops_per_weight(model: nn.Module, *, example: torch.Tensor, layers: Mapping[str, nn.Module]) -> dict[str, int]:
    """FLOPs (MACs) per weight and per sample of each layer in ``layers``, from one forward pass of
    ``example`` (a batch; its first dim is the batch). A layer called several times in one forward
    (shared weights) adds up its calls. The model is run in eval mode (BatchNorm statistics are
    not touched) and put back in its previous mode."""
    counts = dict.fromkeys(layers, 0)
    batch = example.shape[0]

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            counts[name] += _uses_per_weight(module, output, batch)
        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    try:
        with _counting(model):
            model(example)
    finally:
        for h in handles:
            h.remove()
    unused = [name for name, c in counts.items() if c == 0]
    if unused:
        raise ValueError(f"layers {unused[:3]} were not called as modules in the forward pass (their weight is "
                         "used by another module's code, or not at all): their FLOPs per weight are unknown")
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
