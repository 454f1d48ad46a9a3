"""Dense <-> masked conversion, so that architectures are written once, dense.

``to_masked`` swaps the nn.Conv2d / nn.Linear layers of any model (ours or torchvision's) for
their masked twins with the same weights; ``to_dense`` and ``dense_state_dict`` go back, with the
masks applied, giving a model / state dict that loads strictly into the plain architecture.

Which layers are masked depends on the granularity (``MASKED_TYPES``): every conv and linear layer
for unstructured and N:M masks; convolutions only for filter and channel masks, as in BiP (its
``get_layers`` returns a plain nn.Linear for them). A filter of a classifier is an output class,
so masking linear rows would delete classes; and BiP's structured checkpoints have no scores for
their linear layers, so they load here only if those layers stay plain.
"""
from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from layers.masked import MaskedConv2d, MaskedLayer, MaskedLinear


def _conv_args(m: nn.Conv2d) -> dict:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size, stride=m.stride,
                padding=m.padding, dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                padding_mode=m.padding_mode, device=m.weight.device, dtype=m.weight.dtype)


def _linear_args(m: nn.Linear) -> dict:
    return dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None,
                device=m.weight.device, dtype=m.weight.dtype)


def _masked_conv(m: nn.Conv2d, granularity: str) -> MaskedConv2d:
    return MaskedConv2d(**_conv_args(m), granularity=granularity)


def _masked_linear(m: nn.Linear, granularity: str) -> MaskedLinear:
    return MaskedLinear(**_linear_args(m), granularity=granularity)


def _plain_conv(m: MaskedConv2d) -> nn.Conv2d:
    return nn.Conv2d(**_conv_args(m))


def _plain_linear(m: MaskedLinear) -> nn.Linear:
    return nn.Linear(**_linear_args(m))


# Registries: plain type -> masked twin constructor, and back. Exact types, so that a masked
# layer (a subclass of its plain type) is never converted twice.
MASKED_TWIN: dict[type[nn.Module], Callable[[Any, str], MaskedConv2d | MaskedLinear]] = {
    nn.Conv2d: _masked_conv, nn.Linear: _masked_linear}
PLAIN_TWIN: dict[type[nn.Module], Callable[[Any], nn.Conv2d | nn.Linear]] = {
    MaskedConv2d: _plain_conv, MaskedLinear: _plain_linear}
# Plain types that get a mask, per granularity (see the module docstring).
MASKED_TYPES: dict[str, tuple[type, ...]] = {
    "unstructured": (nn.Conv2d, nn.Linear),
    "filter": (nn.Conv2d,),
    "channel": (nn.Conv2d,),
    "nm": (nn.Conv2d, nn.Linear),  # N:M keeps N/M of every row, so no class is ever removed
}


def _swap(model: nn.Module, make: Callable[[nn.Module], nn.Module | None], prefix: str = "",
          name_of: dict[int, str] | None = None) -> nn.Module:
    """Replace children in place; ``make(child)`` returns a new module or None to recurse.
    ``name_of`` (when given) receives id(child) -> qualified name before ``make`` sees it."""
    for name, child in list(model.named_children()):
        if name_of is not None:
            name_of[id(child)] = prefix + name
        new = make(child)
        if new is None:
            _swap(child, make, prefix + name + ".", name_of)
        else:
            setattr(model, name, new)
    return model


def exclusion_patterns(text: str | None) -> list[str]:
    """``--exclude-layers`` (comma-separated fnmatch patterns of module names) as a list."""
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def excluded_layers(model: nn.Module, patterns: list[str]) -> list[str]:
    """Conv2d/Linear layers of ``model`` whose qualified name matches one of ``patterns``.
    Raises ValueError naming a pattern that matches no such layer (a typo would otherwise prune it)."""
    names = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            close = difflib.get_close_matches(pattern, names, n=1, cutoff=0.0)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"layer pattern {pattern!r} matches no Conv2d/Linear layer of the model{hint} "
                             f"(layers: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
    return [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def to_masked(model: nn.Module, *, granularity: str, exclude: list[str] | None = None) -> nn.Module:
    """Replace the Conv2d/Linear layers the granularity masks (``MASKED_TYPES``) by their masked
    twins (all-ones mask), in place; returns model. Layers whose qualified name matches a pattern
    of ``exclude`` (fnmatch) stay plain: no mask, never pruned, by any trainer or granularity."""
    if granularity not in MASKED_TYPES:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {tuple(MASKED_TYPES)}")
    masked_types = MASKED_TYPES[granularity]
    keep_plain = set(excluded_layers(model, exclude or []))
    name_of: dict[int, str] = {}

    def make(child: nn.Module) -> nn.Module | None:
        factory = MASKED_TWIN.get(type(child))
        if factory is None or type(child) not in masked_types or name_of[id(child)] in keep_plain:
            return None
        assert isinstance(child, (nn.Conv2d, nn.Linear))  # the keys of MASKED_TWIN
        twin = factory(child, granularity)
        with torch.no_grad():
            twin.weight.copy_(child.weight)
            if child.bias is not None:
                assert twin.bias is not None  # built with bias=child.bias is not None
                twin.bias.copy_(child.bias)
        return twin

    return _swap(model, make, name_of=name_of)


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every masked layer by a plain one holding ``weight * mask``, in place."""

    def make(child: nn.Module) -> nn.Module | None:
        factory = PLAIN_TWIN.get(type(child))
        if factory is None:
            return None
        assert isinstance(child, (MaskedConv2d, MaskedLinear))  # the keys of PLAIN_TWIN
        plain = factory(child)
        with torch.no_grad():
            plain.weight.copy_(child.weight * child.mask)
            if child.bias is not None:
                assert plain.bias is not None  # built with bias=child.bias is not None
                plain.bias.copy_(child.bias)
        return plain

    return _swap(model, make)


def masked_layers(model: nn.Module) -> dict[str, MaskedLayer]:
    """The masked layers of a model by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MaskedLayer)}


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the plain twin: masks applied to weights, no scores and no mask buffers."""
    layers = masked_layers(model)
    out = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf in ("popup_scores", "mask"):
            continue
        if owner in layers and leaf == "weight":
            value = value * layers[owner].mask
        out[key] = value.detach().clone()
    return out
