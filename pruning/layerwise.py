"""Layer-wise OBS (OBC / SparseGPT's reconstruction): compensate a fixed mask one layer at a time.

A small model-agnostic solver in the manner of IST-DASLab's ``sparsegpt.py``; its names follow the
paper. For one layer with weight W (rows = outputs, columns = inputs; a Conv2d's weight read as
(out, in * kh * kw), its input as unfolded patches in that order) and calibration inputs X (one
column per sample and position), the layer-wise problem is

    min_W' ||W X - W' X||^2   subject to   W'_{r,p} = 0 for every pruned coordinate (r, p).

Its Hessian is H = 2 X X^T, the same for every output row, so each row r with kept set K_r is an
independent least-squares problem with the exact solution

    W'_{r,K} = W_{r,:} H_{:,K} (H_KK)^-1 = w_K + (H_KK)^-1 H_KP w_P,    W'_{r,P} = 0.

H is dampened as SparseGPT does, H + lambda I with lambda = percdamp * mean(diag H) (a ridge term
that pulls W'_K towards w_K where X says little); percdamp = 0 is the undamped problem. H is
accumulated batch by batch (H += X X^T, rescaled to the running mean), so no X is kept. The solve
is in float64 with batched Cholesky factors: rows that share their kept set share one factor (a
channel mask: one solve for the layer; a filter mask: a pruned row is zero and a kept row keeps its
weights, no solve at all), and the others (unstructured, N:M) are solved in chunks of rows whose
matrices fit in ``max_bytes``.

``compensate_sequential`` runs it on a model's masked layers in module order, each layer's inputs
captured by a forward pre-hook from the model whose earlier layers are already compensated (as
SparseGPT does), so a layer also corrects for the error of the layers before it.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from layers.masked import MaskedLayer

PERCDAMP = 0.01     # SparseGPT's default
MAX_BYTES = 1 << 28  # at most this much memory for one chunk of per-row matrices (256 MiB)


def _check_layer(layer: nn.Module) -> None:
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(f"layer-wise OBS handles Conv2d with groups=1 only, got groups={layer.groups} "
                             "(a grouped conv's filter reads only its group's channels: exclude it from the masks)")
    elif not isinstance(layer, nn.Linear):
        raise ValueError(f"layer-wise OBS handles Conv2d and Linear layers, got {type(layer).__name__}")


def layer_inputs(layer: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """X: the layer's input as a (columns, samples) float64 matrix, columns in the order of
    ``layer.weight.reshape(out, -1)`` (a Conv2d's unfolded patches: one column per sample and position)."""
    _check_layer(layer)
    if isinstance(layer, nn.Linear):
        return inp.detach().reshape(-1, inp.shape[-1]).t().to(torch.float64)
    assert isinstance(layer, nn.Conv2d)
    x = inp.detach()
    if x.dim() == 3:  # an unbatched (C, H, W) input
        x = x.unsqueeze(0)
    padding = layer.padding
    if isinstance(padding, str):  # "valid" or "same" (which may pad one side more, as F.conv2d does)
        if padding == "valid":
            padding = (0, 0)
        else:
            pads = []
            for d, k in zip(reversed(layer.dilation), reversed(layer.kernel_size)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)
            padding = (0, 0)
    elif layer.padding_mode != "zeros":  # reflect / replicate / circular: padded before the conv
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = (0, 0)
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
    return cols.transpose(0, 1).reshape(cols.shape[1], -1).to(torch.float64)  # (C*kh*kw, batch * positions)


class LayerwiseOBS:
    """H = 2 X X^T of one Conv2d/Linear layer, accumulated from batches of its inputs, and the
    layer-wise OBS solution for a mask (see the module docstring)."""

    def __init__(self, layer: nn.Module) -> None:
        _check_layer(layer)
        self.layer = layer
        weight: torch.Tensor = layer.weight  # type: ignore[assignment]
        self.rows = weight.shape[0]
        self.columns = weight[0].numel()
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float64, device=weight.device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        """Add one batch of the layer's inputs (what its forward receives) to H, as sparsegpt.py does:
        H stays 2/n times the sum of x x^T over the n columns seen so far."""
        X = layer_inputs(self.layer, inp).to(self.H.device)
        n = X.shape[1]
        if n == 0:
            return
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        X = X * (2.0 / self.nsamples) ** 0.5
        self.H.addmm_(X, X.t())

    def damped(self, percdamp: float = PERCDAMP) -> torch.Tensor:
        """H + lambda I, lambda = percdamp * mean(diag H); a dead input (diag 0) gets 1 there, as in sparsegpt.py."""
        H = self.H.clone()
        diag = torch.diagonal(H)
        diag[diag == 0] = 1.0
        diag += percdamp * float(diag.mean())
        return H

    def solve(self, weight: torch.Tensor, keep: torch.Tensor, *, percdamp: float = PERCDAMP,
              max_bytes: int = MAX_BYTES) -> torch.Tensor:
        """W' for ``weight`` (the layer's shape, pruned coordinates holding their values) under the mask
        ``keep`` (True = kept): zero where pruned, in ``weight``'s dtype and shape."""
        if self.nsamples == 0:
            raise ValueError("layer-wise OBS: no calibration inputs reached this layer")
        if not (percdamp >= 0 and percdamp < float("inf")):
            raise ValueError(f"percdamp must be a finite number >= 0, got {percdamp}")
        W = weight.detach().reshape(self.rows, -1).to(torch.float64)
        K = keep.reshape(self.rows, -1).to(W.device, torch.bool)
        H = self.damped(percdamp)
        out = W * K  # rows kept whole stay as they are (W H H^-1 = W), rows pruned whole are 0
        uniq, inverse, counts = torch.unique(K, dim=0, return_inverse=True, return_counts=True)
        order = torch.argsort(inverse, stable=True)  # the rows of each kept set, set after set
        offsets = torch.cumsum(counts, 0) - counts
        partial = (uniq.any(1) & ~uniq.all(1)).nonzero().flatten()
        sizes = uniq.sum(1)
        for count in counts[partial].unique().tolist():  # sets with as many rows solve together
            sets = partial[counts[partial] == count]
            sets = sets[torch.argsort(sizes[sets], descending=True, stable=True)]  # similar |K| in a chunk
            start = 0
            while start < len(sets):
                widest = int(sizes[sets[start]])  # the chunk's largest kept set: its matrices' size
                chunk = max(1, max_bytes // (3 * 8 * widest * (widest + count)))
                part = sets[start:start + chunk]
                rows = order[offsets[part].unsqueeze(1) + torch.arange(count, device=W.device)]  # (s, count)
                out[rows] = _solve_kept(H, W[rows], uniq[part], widest).to(out.dtype)
                start += chunk
        return out.reshape(weight.shape).to(weight.dtype)


def _solve_kept(H: torch.Tensor, W: torch.Tensor, K: torch.Tensor, widest: int) -> torch.Tensor:
    """For s kept sets K (s, d) of at most ``widest`` columns and the rows W (s, c, d) of each: x_K =
    (H_KK)^-1 (H W^T)_K, x_P = 0, as one batched Cholesky solve of the |K| x |K| systems, each padded
    to ``widest`` with the identity."""
    s, c, d = W.shape
    cols = torch.argsort((~K).to(torch.int8), dim=1, stable=True)[:, :widest]  # each set's kept columns first
    valid = torch.arange(widest, device=K.device).unsqueeze(0) < K.sum(1, keepdim=True)  # (s, widest)
    both = valid.unsqueeze(2) & valid.unsqueeze(1)
    A = torch.where(both, H[cols.unsqueeze(2), cols.unsqueeze(1)], torch.zeros((), dtype=H.dtype, device=H.device))
    A = A + torch.diag_embed((~valid).to(H.dtype))
    B = torch.gather(W @ H, 2, cols.unsqueeze(1).expand(s, c, widest)).transpose(1, 2) * valid.unsqueeze(2)
    L, info = torch.linalg.cholesky_ex(A)
    bad = info != 0
    if bool(bad.any()):  # not positive definite (percdamp 0 on rank-deficient inputs): damp those sets more
        scale = torch.diagonal(H).mean()
        for extra in (1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
            eye = torch.diag_embed(valid[bad].to(H.dtype)) * (extra * scale)
            L_bad, info_bad = torch.linalg.cholesky_ex(A[bad] + eye)
            if not bool(info_bad.any()):
                L[bad] = L_bad
                break
        else:
            raise ValueError("layer-wise OBS: H restricted to a kept set is not positive definite; use percdamp > 0")
    X = torch.cholesky_solve(B, L).transpose(1, 2) * valid.unsqueeze(1)  # (s, c, widest)
    out = torch.zeros_like(W)
    return out.scatter_(2, cols.unsqueeze(1).expand(s, c, widest), X)


class _Captured(Exception):
    """Raised by the pre-hook once a layer's input is taken: the rest of the forward is not needed."""


@dataclass
class LayerwiseRecord:
    """What a sequential layer-wise compensation did."""

    layers: int = 0
    samples: int = 0
    seconds: float = 0.0
    error_before: dict[str, float] = field(default_factory=dict)  # ||W X - (W*M) X||^2 / ||W X||^2 per layer
    error_after: dict[str, float] = field(default_factory=dict)   # ||W X - W' X||^2 / ||W X||^2 per layer


def _relative_error(H: torch.Tensor, W: torch.Tensor, W_new: torch.Tensor) -> float:
    """||W X - W' X||^2 / ||W X||^2 from H = 2 X X^T / n (undamped)."""
    D = (W - W_new).reshape(W.shape[0], -1).to(torch.float64)
    R = W.reshape(W.shape[0], -1).to(torch.float64)
    ref = float(torch.einsum("ij,jk,ik->", R, H, R))
    return float(torch.einsum("ij,jk,ik->", D, H, D)) / ref if ref > 0 else 0.0


@torch.no_grad()
def compensate_sequential(model: nn.Module, layers: Mapping[str, MaskedLayer], masks: Mapping[str, torch.Tensor],
                          batches: Iterable[torch.Tensor], *, percdamp: float = PERCDAMP, max_bytes: int = MAX_BYTES,
                          forward: Callable[[nn.Module, torch.Tensor], object] | None = None) -> LayerwiseRecord:
    """Compensate ``layers`` (masked layers with ``weight`` and a ``mask`` buffer, in module order) for
    ``masks`` one after the other: each layer's H comes from ``batches`` (model inputs, reused for every
    layer) run through ``model`` (in eval mode) with the earlier layers already compensated; its weight
    becomes the layer-wise OBS solution W' for its mask, which is also written to its ``mask``.
    The weights to reconstruct are those the layers hold when called (pruned coordinates with their
    values). ``forward(model, x)``: how to run the model (default ``model(x)``)."""
    t0 = time.perf_counter()
    inputs = list(batches)
    was_training = model.training
    model.eval()
    for name, layer in layers.items():
        layer.mask.copy_(masks[name].to(layer.mask.device, torch.bool))
    record = LayerwiseRecord(samples=sum(len(x) for x in inputs))
    try:
        for name, layer in layers.items():
            obs = LayerwiseOBS(layer)

            def hook(module: nn.Module, args: tuple, obs: LayerwiseOBS = obs) -> None:
                obs.add_batch(args[0])
                raise _Captured

            handle = layer.register_forward_pre_hook(hook)
            try:
                for x in inputs:
                    try:
                        (forward or (lambda m, v: m(v)))(model, x)
                    except _Captured:
                        pass
            finally:
                handle.remove()
            weight = layer.weight
            keep = masks[name].to(weight.device, torch.bool)
            if obs.nsamples == 0:  # never called: nothing to reconstruct
                weight.mul_(keep)
                continue
            new = obs.solve(weight, keep, percdamp=percdamp, max_bytes=max_bytes)
            record.error_before[name] = _relative_error(obs.H, weight, weight * keep)
            record.error_after[name] = _relative_error(obs.H, weight, new)
            weight.copy_(new)
            record.layers += 1
            del obs
    finally:
        model.train(was_training)
    record.seconds = time.perf_counter() - t0
    return record
