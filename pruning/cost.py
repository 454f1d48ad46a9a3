"""Parameters and FLOPs of a model, dense and as masked: the one counter the run summary, ``--evaluate``,
the results report and the FLOPs-aware WoodFisher methods share (``pruning.flops`` measures the FLOPs;
this module adds them up).

Two sparsities, both counted from the tensors, never from the configuration:
- among the **masked layers** (every module holding a boolean ``mask`` buffer shaped like its weight):
  their weights, the mask's kept count, and the zeros of the effective weight ``weight * mask``;
- among **all weights of the model**: every parameter (biases, normalisation, embeddings and layers
  left dense included; the importance scores ``popup_scores`` excluded, they are not weights of the
  network), a masked weight counted as ``weight * mask``. A weight is kept when it is not zero.
A model whose unmasked weights are a large share (a ViT whose attention is left dense, a classifier
kept dense by filter masks) therefore reports a model sparsity well below the masks' sparsity.

FLOPs are multiply-accumulates per sample: ``flops_total`` is the whole forward pass as PyTorch's
FlopCounterMode counts it (convolutions, matrix products, attention), and ``flops_kept`` removes the
MACs of every pruned weight of the masked layers (``pruning.flops.flops_per_weight``). Recurrent
modules compute through fused operators no counter sees: they are named in ``flops_uncounted``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import nn

from pruning.flops import dense_macs, flops_per_weight

# Module types whose arithmetic FlopCounterMode does not see (fused kernels without a formula).
_UNCOUNTED_TYPES: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.RNNCellBase)


@dataclass(frozen=True)
class ModelCost:
    masked_params: int  # weights of the masked layers
    masked_kept: int  # True entries of their masks
    masked_zeros: int  # zero entries of their effective weights (weight * mask)
    params_total: int  # every parameter of the model except the scores
    params_kept: int  # its nonzero effective values
    flops_total: int  # multiply-accumulates per sample, dense
    flops_kept: int
    flops_uncounted: tuple[str, ...] = ()  # modules whose MACs are not in flops_total

    @property
    def params_ratio(self) -> float:
        return self.params_kept / self.params_total if self.params_total else 1.0

    @property
    def flops_ratio(self) -> float:
        return self.flops_kept / self.flops_total if self.flops_total else 1.0

    @property
    def sparsity_masked(self) -> float:
        """Fraction of zero effective weights among the masked layers' weights."""
        return self.masked_zeros / self.masked_params if self.masked_params else 0.0

    @property
    def sparsity_model(self) -> float:
        """Fraction of zero effective weights among all weights of the model."""
        return 1.0 - self.params_ratio

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flops_uncounted": list(self.flops_uncounted),
                "sparsity_masked": self.sparsity_masked, "sparsity_model": self.sparsity_model}

    def line(self) -> str:
        uncounted = (f" (not counted: {', '.join(self.flops_uncounted[:3])}"
                     f"{', ...' if len(self.flops_uncounted) > 3 else ''})") if self.flops_uncounted else ""
        return (f"weights kept {self.params_kept:,} of {self.params_total:,} ({100 * self.params_ratio:.2f}%; "
                f"masked layers {self.masked_params - self.masked_zeros:,} of {self.masked_params:,}), "
                f"FLOPs kept {self.flops_kept:,} of {self.flops_total:,} per sample ({100 * self.flops_ratio:.2f}%)"
                + uncounted)


def masked_layers_of(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` that hold a boolean ``mask`` buffer shaped like their ``weight``, by name."""
    out = {}
    for name, module in model.named_modules():
        mask, weight = getattr(module, "mask", None), getattr(module, "weight", None)
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and isinstance(weight, torch.Tensor) \
                and mask.shape == weight.shape:
            out[name] = module
    return out


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


def _weight_counts(model: nn.Module, layers: Mapping[str, nn.Module]) -> tuple[list[int], int, int, int, int]:
    """(kept per masked layer, zeros of the masked layers' effective weights, all weights, their
    nonzero effective values, masked weights), in one host read."""
    effective: dict[int, torch.Tensor] = {}
    scores: set[int] = set()
    for layer in layers.values():
        weight, mask = cast(torch.Tensor, layer.weight), cast(torch.Tensor, layer.mask)
        effective[id(weight)] = weight * mask
        popup = getattr(layer, "popup_scores", None)
        if isinstance(popup, torch.Tensor):
            scores.add(id(popup))
    # named_parameters() lists a shared parameter once.
    params = [p for _, p in model.named_parameters() if id(p) not in scores]
    nonzero = [torch.count_nonzero(effective.get(id(p), p.detach())) for p in params]
    masked_zeros = [(effective[id(layer.weight)] == 0).sum() for layer in layers.values()]
    kept = [cast(torch.Tensor, layer.mask).sum() for layer in layers.values()]
    device = params[0].device if params else torch.device("cpu")
    values = torch.stack([t.to(device=device, dtype=torch.int64) for t in kept + masked_zeros + nonzero]
                         or [torch.zeros((), dtype=torch.int64)]).tolist()
    n = len(kept)
    masked = sum(cast(torch.Tensor, layer.weight).numel() for layer in layers.values())
    return (values[:n], sum(values[n:2 * n]), sum(p.numel() for p in params), sum(values[2 * n:2 * n + len(params)]),
            masked)


@torch.no_grad()
def model_cost(model: nn.Module, *, example: torch.Tensor) -> ModelCost:
    """Count ``model``'s weights and FLOPs for one sample shaped like ``example`` (a batch of >= 1).
    Masked layers must be called as modules in the forward pass (their MACs per weight are measured
    with hooks); one host read for the weights."""
    example = example[:1]
    layers = masked_layers_of(model)
    per_weight = flops_per_weight(model, example=example, layers=layers) if layers else {}
    kept, masked_zeros, params_total, params_kept, masked_params = _weight_counts(model, layers)
    flops_total = dense_macs(model, example=example)
    pruned_flops = sum((cast(torch.Tensor, layer.weight).numel() - k) * per_weight[name]
                       for (name, layer), k in zip(layers.items(), kept))
    uncounted = tuple(name for name, m in model.named_modules() if isinstance(m, _UNCOUNTED_TYPES))
    return ModelCost(masked_params=masked_params, masked_kept=sum(kept), masked_zeros=masked_zeros,
                     params_total=params_total, params_kept=params_kept, flops_total=flops_total,
                     flops_kept=flops_total - pruned_flops, flops_uncounted=uncounted)
