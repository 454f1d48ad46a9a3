"""LayerNorm over the channels a coupled mask keeps (``--coupled`` on ConvNeXt-style networks).

A LayerNorm that normalises over the channels (ConvNeXt's channels-last ``nn.LayerNorm`` and its
``LayerNorm2d``) mixes every channel into every other's output through the mean and variance, so a
pruned channel cannot be removed from a plain LayerNorm without changing the function: a removed
channel still counts in the statistics. Under coupled masks such a norm becomes ``MaskedLayerNorm``:
its statistics run over the channels whose dependency group is kept, and pruned channels output
exactly 0. The masked network then equals its slimmed twin, whose plain LayerNorm has the kept
channels only. With every channel kept it is the plain LayerNorm (float rounding aside).

The channel mask is derived from the layers' filter masks (``layers.coupling.Coupling.norm_masks``)
whenever they change, so it is not saved (``persistent=False``): checkpoints keep the plain keys.
"""
from __future__ import annotations

import copy
from typing import cast

import torch
from torch import nn

# LayerNorm classes whose forward normalises over the channels of an NCHW input (dim 1), by qualified
# class name so that no optional package is imported; a plain nn.LayerNorm normalises the last dim.
CHANNEL_FIRST_NORMS = {"torchvision.models.convnext.LayerNorm2d"}


def norm_channel_dim(module: nn.Module) -> int | None:
    """The dim a LayerNorm normalises over, 1 or -1; None for any other module (or a LayerNorm over
    several dims, or a subclass whose forward is not known here)."""
    if isinstance(module, MaskedLayerNorm):
        return module.channel_dim
    if not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1:
        return None
    if type(module) is nn.LayerNorm:
        return -1
    cls = type(module)
    return 1 if f"{cls.__module__}.{cls.__qualname__}" in CHANNEL_FIRST_NORMS else None


class MaskedLayerNorm(nn.LayerNorm):
    """A LayerNorm whose mean and variance run over the kept channels only; pruned channels output 0."""

    channel_mask: torch.Tensor

    def __init__(self, channels: int, *, channel_dim: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(channels, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device,
                         dtype=dtype)
        self.channel_dim = channel_dim
        self._plain_class: type[nn.LayerNorm] = nn.LayerNorm
        self.register_buffer("channel_mask", torch.ones(channels, dtype=torch.bool, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.channel_dim == 1:
            x = x.movedim(1, -1)
        if dtype in (torch.float16, torch.bfloat16):  # statistics in float32, as LayerNorm's kernels keep them
            x = x.float()
        keep = self.channel_mask.to(x.dtype)
        n = keep.sum().clamp_min(1)  # every channel pruned (a whole stream, --scope global): all zeros, not 0/0
        mean = (x * keep).sum(-1, keepdim=True) / n
        centred = (x - mean) * keep
        var = centred.square().sum(-1, keepdim=True) / n  # biased, as LayerNorm's
        y = centred * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias * keep
        y = y.to(dtype)
        return y.movedim(-1, 1) if self.channel_dim == 1 else y

    def plain(self, keep: list[int] | None = None) -> nn.LayerNorm:
        """The plain LayerNorm (of the original class) over the channels ``keep`` (all by default)."""
        index = list(range(self.normalized_shape[0])) if keep is None else keep
        out: nn.LayerNorm = copy.deepcopy(self)
        out.__class__ = self._plain_class  # the same state as the twin's, less the mask
        del out._buffers["channel_mask"]
        for attr in ("channel_dim", "_plain_class"):
            out.__dict__.pop(attr, None)
        _slice(out, index)
        return out

    def sliced(self, keep: list[int]) -> MaskedLayerNorm:
        """This norm over the channels ``keep``, with their part of the channel mask."""
        out = copy.deepcopy(self)
        _slice(out, keep)
        out.channel_mask = self.channel_mask[keep].clone()
        return out


def _slice(norm: nn.LayerNorm, keep: list[int]) -> None:
    norm.normalized_shape = (len(keep),)
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(norm, name)
            if p is not None:
                setattr(norm, name, nn.Parameter(p.detach()[keep].clone()))


def to_masked_norm(module: nn.LayerNorm) -> MaskedLayerNorm:
    """The masked twin of a channel LayerNorm (``norm_channel_dim`` not None), same parameters."""
    dim = norm_channel_dim(module)
    if dim is None:
        raise ValueError(f"{type(module).__name__} does not normalise over channels")
    twin = MaskedLayerNorm(module.normalized_shape[0], channel_dim=dim, eps=module.eps,
                           elementwise_affine=module.elementwise_affine, bias=module.bias is not None,
                           device=module.weight.device if module.weight is not None else None,
                           dtype=module.weight.dtype if module.weight is not None else None)
    twin._plain_class = type(module)
    with torch.no_grad():
        if module.weight is not None:
            cast(torch.Tensor, twin.weight).copy_(module.weight)
        if module.bias is not None:
            cast(torch.Tensor, twin.bias).copy_(module.bias)
    return twin


def mask_channel_norms(model: nn.Module, names: set[str]) -> dict[str, MaskedLayerNorm]:
    """Replace the channel LayerNorms ``names`` of ``model`` by their masked twins, in place."""
    out = {}
    for name in sorted(names):
        module = model.get_submodule(name)
        twin = module if isinstance(module, MaskedLayerNorm) else to_masked_norm(cast(nn.LayerNorm, module))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, twin)
        out[name] = twin
    return out
