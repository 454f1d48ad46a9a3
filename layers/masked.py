"""Masked Conv2d and Linear: a weight, importance scores and a boolean mask buffer.

``popup_scores`` keeps the HYDRA/BiP name so that their checkpoints load. The mask is a buffer
chosen by the selector (``layers.selector``) through a ``MaskSet``; a layer never computes its
own mask, so the forward pass costs one elementwise product and no sort.

When the scores are being learned (they require grad and autograd is on) the forward goes through
the straight-through estimator of HYDRA / edge-popup: the hard top-k is the identity in the
backward pass, and since units are ranked by |s|,

    dL/ds = sign(s) * w * dL/d(w * m)        (elementwise, for every granularity)
    dL/dw = m * dL/d(w * m)

What a step costs per layer: the product w * m in the forward pass and one product in the backward
pass (dL/ds from the *signed weight* sign(s) * w, computed for every layer at once by the mask set
before the forward and cached here while w and s are unchanged); the mask in the weight's dtype (the
*multiplier*) is cached too, and the mask set refreshes every layer's with one operator.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _StraightThroughMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                signed_weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask, signed_weight)
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        mask, signed_weight = ctx.saved_tensors
        grad_weight = grad * mask if ctx.needs_input_grad[0] else None
        grad_scores = grad * signed_weight if ctx.needs_input_grad[1] else None
        return grad_weight, grad_scores, None, None


class MaskedLayer(nn.Module):
    """Mixin for a layer with ``weight``, ``popup_scores`` and a ``mask`` buffer."""

    granularity: str
    # Declared for the type checker: ``weight`` comes from the nn.Conv2d / nn.Linear it is mixed into;
    # ``popup_scores`` and the ``mask`` buffer are created by ``_init_masking``.
    weight: torch.Tensor
    popup_scores: nn.Parameter
    mask: torch.Tensor
    # False while a step needs no score gradient (BiP's lower level): forward then skips the
    # straight-through path and its backward work on every weight.
    score_grad: bool = True

    def _init_masking(self, granularity: str) -> None:
        self.granularity = granularity
        self.popup_scores = nn.Parameter(torch.empty_like(self.weight, requires_grad=False))
        # HYDRA/BiP's default score init; train.py may replace it (see layers.scores_init).
        nn.init.kaiming_uniform_(self.popup_scores, a=math.sqrt(5))
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self._multiplier: torch.Tensor | None = None
        self._multiplier_of: tuple = (None, -1, None)
        self._signed: torch.Tensor | None = None
        self._signed_of: tuple = (None, -1, None, -1)

    def multiplier(self) -> torch.Tensor:
        """The mask in the weight's dtype, cached until the boolean mask changes.

        Multiplying by a bool tensor converts it on every call (measured 3x slower than a float
        product); the cache is refreshed when the mask's version counter, storage or device changes.
        """
        if torch.compiler.is_compiling():
            # --compile: the cast joins the compiled graph (fused with the product, no pass of its
            # own); the cache's _version check cannot be traced and would break the graph per layer.
            return self.mask.to(self.weight.dtype)
        source, version, dtype = self._multiplier_of
        # ``is`` on the mask tensor itself (held here), not its address: a new mask allocated where
        # a freed one lived must never match.
        if source is not self.mask or version != self.mask._version or dtype != self.weight.dtype:
            self._multiplier = self.mask.to(self.weight.dtype)
            self._multiplier_of = (self.mask, self.mask._version, self.weight.dtype)
        assert self._multiplier is not None  # set above on the first call: _multiplier_of starts as no mask
        return self._multiplier

    def multiplier_target(self) -> torch.Tensor:
        """The tensor the next multiplier is written into (``adopt_multiplier``): the cached one when its
        shape, dtype and device still fit, so a mask set refreshing every layer allocates nothing."""
        m = self._multiplier
        if m is None or m.shape != self.mask.shape or m.dtype != self.weight.dtype or m.device != self.mask.device:
            m = torch.empty(self.mask.shape, dtype=self.weight.dtype, device=self.mask.device)
        return m

    def adopt_multiplier(self, multiplier: torch.Tensor) -> None:
        """Take ``multiplier`` (the current mask, already written in the weight's dtype) as the cache."""
        self._multiplier = multiplier
        self._multiplier_of = (self.mask, self.mask._version, self.weight.dtype)

    def wants_score_grad(self) -> bool:
        """Whether the next forward takes the straight-through path (scores learned, autograd on)."""
        return self.score_grad and self.popup_scores.requires_grad and torch.is_grad_enabled()

    def signed_key(self) -> tuple:
        """What the signed weight sign(s) * w depends on: the weight and the scores, by identity and version."""
        return (self.weight, self.weight._version, self.popup_scores, self.popup_scores._version)

    def adopt_signed_weight(self, signed: torch.Tensor) -> None:
        """Take ``signed`` = sign(s) * w of the current weight and scores (computed by the mask set for every
        layer at once) as the cache the straight-through backward reads."""
        self._signed = signed
        self._signed_of = self.signed_key()

    def signed_weight(self) -> torch.Tensor:
        """sign(s) * w, detached: the cached one while weight and scores are unchanged."""
        if torch.compiler.is_compiling():  # joins the compiled graph (see ``multiplier``)
            return (self.weight * torch.sign(self.popup_scores)).detach()
        key = self.signed_key()
        if (self._signed is None or any(a is not b for a, b in zip(key[::2], self._signed_of[::2]))
                or key[1::2] != self._signed_of[1::2]):
            with torch.no_grad():
                return self.weight * torch.sign(self.popup_scores)
        return self._signed

    def masked_weight(self) -> torch.Tensor:
        if self.wants_score_grad():
            return _StraightThroughMask.apply(self.weight, self.popup_scores, self.multiplier(), self.signed_weight())
        return self.weight * self.multiplier()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, granularity={self.granularity}"


class MaskedConv2d(MaskedLayer, nn.Conv2d):
    def __init__(self, *args: Any, granularity: str = "unstructured", **kwargs: Any) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_masking(granularity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class MaskedLinear(MaskedLayer, nn.Linear):
    def __init__(self, *args: Any, granularity: str = "unstructured", **kwargs: Any) -> None:
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_masking(granularity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)
