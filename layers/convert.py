"""Dense <-> masked conversion, so that architectures are written once, dense.

``to_masked`` swaps the nn.Conv2d / nn.Linear layers of any model (ours or torchvision's) for
their masked twins with the same weights; ``to_dense`` and ``dense_state_dict`` go back, with the
masks applied, giving a model / state dict that loads strictly into the plain architecture.

Which layers are masked depends on the granularity (``MASKED_TYPES``): every conv, linear and
attention layer for unstructured and N:M masks; convolutions only for filter and channel masks, as
in BiP (its ``get_layers`` returns a plain nn.Linear for them). A filter of a classifier is an output
class, so masking linear rows would delete classes; and BiP's structured checkpoints have no scores
for their linear layers, so they load here only if those layers stay plain.

Subclasses of Conv2d/Linear are masked too (by their MRO) when they keep the base forward, and get
their class back from ``to_dense``; ``nn.MultiheadAttention`` becomes ``layers.attention``'s twin,
whose four projections are masked linear layers. What cannot be masked faithfully (a subclass with a
forward of its own, attention under filter/channel masks or with add_bias_kv / add_zero_attn) is
refused with ``UnmaskableLayer`` naming the layer and the --exclude-layers fix, never skipped.
"""
from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from layers.attention import MaskedMultiheadAttention, UnsupportedAttention
from layers.masked import MaskedConv2d, MaskedLayer, MaskedLinear


def _conv_args(m: nn.Conv2d) -> dict:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size, stride=m.stride,
                padding=m.padding, dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                padding_mode=m.padding_mode, device=m.weight.device, dtype=m.weight.dtype)


def _linear_args(m: nn.Linear) -> dict:
    return dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None,
                device=m.weight.device, dtype=m.weight.dtype)


def _copy_weights(source: Any, target: Any, *, weight: torch.Tensor) -> None:  # Conv2d/Linear pairs
    with torch.no_grad():
        target.weight.copy_(weight)
        if source.bias is not None:
            target.bias.copy_(source.bias)


def _masked_conv(m: nn.Conv2d, granularity: str) -> MaskedConv2d:
    twin = MaskedConv2d(**_conv_args(m), granularity=granularity)
    _copy_weights(m, twin, weight=m.weight)
    return twin


def _masked_linear(m: nn.Linear, granularity: str) -> MaskedLinear:
    twin = MaskedLinear(**_linear_args(m), granularity=granularity)
    _copy_weights(m, twin, weight=m.weight)
    return twin


def _masked_attention(m: nn.MultiheadAttention, granularity: str) -> MaskedMultiheadAttention:
    return MaskedMultiheadAttention.from_plain(m, granularity)


def _plain_conv(m: MaskedConv2d) -> nn.Conv2d:
    plain = nn.Conv2d(**_conv_args(m))
    _copy_weights(m, plain, weight=m.weight * m.mask)
    return plain


def _plain_linear(m: MaskedLinear) -> nn.Linear:
    plain = nn.Linear(**_linear_args(m))
    _copy_weights(m, plain, weight=m.weight * m.mask)
    return plain


def _plain_attention(m: MaskedMultiheadAttention) -> nn.MultiheadAttention:
    return m.plain()


# Registries: plain type -> masked twin (weights copied), and back (weight * mask). A subclass of a
# plain type (torchvision's NonDynamicallyQuantizableLinear, a user's Conv2d with extra attributes)
# finds its twin through its MRO, as long as it keeps the base forward: the twin computes the base
# forward with a masked weight, so a subclass that computes something else cannot be masked by it.
# ``to_dense`` gives such a layer its own class back.
MASKED_TWIN: dict[type[nn.Module], Callable[[Any, str], nn.Module]] = {
    nn.Conv2d: _masked_conv, nn.Linear: _masked_linear, nn.MultiheadAttention: _masked_attention}
PLAIN_TWIN: dict[type[nn.Module], Callable[[Any], nn.Module]] = {
    MaskedConv2d: _plain_conv, MaskedLinear: _plain_linear, MaskedMultiheadAttention: _plain_attention}
# Plain types that get a mask, per granularity (see the module docstring).
MASKED_TYPES: dict[str, tuple[type, ...]] = {
    "unstructured": (nn.Conv2d, nn.Linear, nn.MultiheadAttention),
    "filter": (nn.Conv2d,),
    "channel": (nn.Conv2d,),
    "nm": (nn.Conv2d, nn.Linear, nn.MultiheadAttention),  # N:M keeps N/M of every row: no class is ever removed
}
# Modules whose weights a user may call prunable: what --exclude-layers patterns are matched against.
PRUNABLE_TYPES = (nn.Conv2d, nn.Linear, nn.MultiheadAttention)


class UnmaskableLayer(ValueError):
    """A layer a granularity would mask that no twin can reproduce (its message names it and the fix)."""


def plain_base(module: nn.Module) -> type[nn.Module] | None:
    """The registered plain type ``module`` is (itself or by inheritance), or None; masked twins are
    never plain (they are not converted twice)."""
    if isinstance(module, (MaskedLayer, MaskedMultiheadAttention)):
        return None
    return next((cls for cls in type(module).__mro__ if cls in MASKED_TWIN), None)


def _prunable_names(model: nn.Module) -> list[str]:
    """Qualified names of the modules --exclude-layers matches: convolutions, linear layers and attention
    modules, but not the projections inside an attention module (it is masked or kept as a whole)."""
    names: list[str] = []
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, (nn.MultiheadAttention, MaskedMultiheadAttention)):
            inside.append(name)
        if isinstance(m, PRUNABLE_TYPES) or isinstance(m, MaskedMultiheadAttention):
            names.append(name)
    return names


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
    """Conv2d/Linear/attention modules of ``model`` whose qualified name matches one of ``patterns``.
    Raises ValueError naming a pattern that matches no such module (a typo would otherwise prune it)."""
    names = _prunable_names(model)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            close = difflib.get_close_matches(pattern, names, n=1, cutoff=0.0)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"layer pattern {pattern!r} matches no Conv2d/Linear/attention layer of the model{hint} "
                             f"(layers: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
    return [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def to_masked(model: nn.Module, *, granularity: str, exclude: list[str] | None = None,
              also: set[str] | None = None) -> nn.Module:
    """Replace the layers the granularity masks (``MASKED_TYPES``, subclasses included) by their masked
    twins (all-ones mask), in place; returns model. Layers whose qualified name matches a pattern of
    ``exclude`` (fnmatch) stay plain: no mask, never pruned, by any trainer or granularity. Raises
    ``UnmaskableLayer`` for a layer that must be masked but cannot be (a subclass with its own forward,
    an attention option the twin lacks, attention under filter/channel masks). ``also``: names of layers
    to mask although the granularity does not mask their type (``--coupled``: a linear layer that acts on
    the channels of a feature map, whose rows are channels, not classes)."""
    if granularity not in MASKED_TYPES:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {tuple(MASKED_TYPES)}")
    masked_types = MASKED_TYPES[granularity]
    keep_plain = set(excluded_layers(model, exclude or []))
    name_of: dict[int, str] = {}

    def make(child: nn.Module) -> nn.Module | None:
        base = plain_base(child)
        name = name_of[id(child)]
        if base is None:
            return None
        if name in keep_plain:
            return child  # kept as it is, and not entered: an excluded attention keeps its out_proj plain too
        hint = f"keep it dense with --exclude-layers {name}"
        if base not in masked_types and name not in (also or set()):
            if base is nn.MultiheadAttention:  # heads as structured units: not built yet, so never skipped silently
                raise UnmaskableLayer(f"{name} is an attention module, which filter/channel masks cannot prune "
                                      f"(structured attention is not supported): use --layer-type unstructured "
                                      f"or nm, or {hint}")
            return None
        if type(child) is not base and type(child).forward is not base.forward:
            raise UnmaskableLayer(f"{name} is a {type(child).__name__}, a {base.__name__} subclass with a forward "
                                  f"of its own, which a masked {base.__name__} would not reproduce: {hint}")
        try:
            twin = MASKED_TWIN[base](child, granularity)
        except UnsupportedAttention as exc:
            raise UnmaskableLayer(f"{name}: {exc}; {hint}") from None
        if type(child) is not base:
            object.__setattr__(twin, "_plain_class", type(child))  # given back by to_dense (not a submodule)
        return twin

    return _swap(model, make, name_of=name_of)


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every masked layer by a plain one holding ``weight * mask``, in place; a layer that was
    a subclass of Conv2d/Linear gets its own class back."""

    def make(child: nn.Module) -> nn.Module | None:
        factory = PLAIN_TWIN.get(type(child))
        if factory is None:
            return None
        plain = factory(child)
        original = getattr(child, "_plain_class", None)
        if original is not None:
            # Its forward is the base's (checked by to_masked) and its state is the base's.
            plain.__class__ = original
        return plain

    return _swap(model, make)


def masked_layers(model: nn.Module) -> dict[str, MaskedLayer]:
    """The masked layers of a model by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MaskedLayer)}


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the plain twin: masks applied to weights, no scores and no mask buffers; an attention
    twin's projections packed back into nn.MultiheadAttention's keys."""
    layers = masked_layers(model)
    attention = {name: m for name, m in model.named_modules() if isinstance(m, MaskedMultiheadAttention)}
    out = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner.rpartition(".")[0] in attention and owner.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj",
                                                                                  "out_proj"):
            continue  # written below from the attention module itself
        if owner in layers and leaf in ("popup_scores", "mask"):
            continue
        if owner in layers and leaf == "weight":
            value = value * layers[owner].mask
        out[key] = value.detach().clone()
    for name, module in attention.items():
        out.update({f"{name}.{key}": value for key, value in module.plain_state().items()})
    return out
