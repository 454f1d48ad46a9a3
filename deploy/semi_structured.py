"""2:4 Linear layers as ``torch.sparse`` semi-structured tensors, for sparse tensor cores.

An N:M mask (``--layer-type nm``) whose every group of 4 consecutive input features keeps at most
2 weights is what NVIDIA's sparse tensor cores compute on: ``torch.sparse.to_sparse_semi_structured``
stores the kept half plus 2-bit indices, and ``F.linear`` then runs the sparse kernel (cuSPARSELt or
CUTLASS). The groups of ``layers.selector`` run along the input features of a Linear weight, which
is the layout that function expects (rows of the (out, in) matrix), so no permutation is needed.

Only Linear layers are converted: PyTorch has no semi-structured convolution (a 2:4 Conv2d mask,
grouped along the input channels, is the one ASP/TensorRT accelerate, but not through this API).
The kernels exist on CUDA devices of compute capability 8.0 or more (Ampere, Hopper), in half
precision; anywhere else ``semi_structured`` says why it converted nothing (one line) and returns
the plain dense network, which computes the same function.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from layers import masked_layers, to_dense
from layers.masked import MaskedLinear

GROUP = 4  # 2:4: what the hardware computes
MAX_KEPT = 2


@dataclass
class SemiStructuredResult:
    model: nn.Module
    converted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why this machine cannot run 2:4 semi-structured kernels, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device (the 2:4 kernels need an NVIDIA GPU of compute capability >= 8.0)"
    device = device or torch.device("cuda")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return f"the GPU has compute capability {major}.{minor}; the 2:4 kernels need 8.0 or more (Ampere, Hopper)"
    return None


def is_two_four(mask: torch.Tensor) -> bool:
    """Whether a Linear mask keeps at most 2 of every 4 consecutive input features (2:4, 1:4)."""
    if mask.dim() != 2 or mask.shape[1] % GROUP:
        return False
    return bool((mask.reshape(-1, GROUP).sum(1) <= MAX_KEPT).all())


def semi_structured(model: nn.Module, *, device: torch.device | None = None,
                    dtype: torch.dtype = torch.float16) -> SemiStructuredResult:
    """A plain copy of the masked ``model`` (masks applied, ``layers.to_dense``) in which every Linear
    layer with a 2:4-compatible mask holds its weight as a semi-structured sparse tensor, on the GPU
    in ``dtype``. Without a suitable GPU nothing is converted and ``notes`` says why, in one line; a
    layer the kernels refuse (e.g. a shape below their minimum) stays dense with a note naming it."""
    reason = unavailable_reason(device)
    eligible = [name for name, layer in masked_layers(model).items()
                if isinstance(layer, MaskedLinear) and is_two_four(layer.mask)]
    net = to_dense(copy.deepcopy(model))
    if reason is not None:
        return SemiStructuredResult(net, notes=[f"2:4 semi-structured conversion not done: {reason}; the dense "
                                                "network (masks applied) computes the same outputs"])
    if not eligible:
        return SemiStructuredResult(net.to(device or "cuda", dtype), notes=[
            "2:4 semi-structured conversion not done: no Linear layer has a 2:4 mask (--layer-type nm --nm 2:4)"])
    from torch.sparse import to_sparse_semi_structured

    net = net.to(device or "cuda", dtype).eval()
    modules = dict(net.named_modules())
    result = SemiStructuredResult(net)
    for name in eligible:
        linear = modules[name]
        assert isinstance(linear, nn.Linear)  # to_dense made the masked Linear a plain one
        try:
            sparse = to_sparse_semi_structured(linear.weight.detach())
        except (RuntimeError, ValueError) as exc:  # shape/dtype limits of the kernels: that layer stays dense
            result.notes.append(f"{name} stays dense: {str(exc).splitlines()[0]}")
            continue
        linear.weight = nn.Parameter(sparse, requires_grad=False)
        result.converted.append(name)
    result.notes.insert(0, f"2:4 semi-structured: {len(result.converted)} of {len(eligible)} 2:4 Linear layers "
                           f"converted ({', '.join(result.converted) or 'none'}), {dtype}")
    return result
