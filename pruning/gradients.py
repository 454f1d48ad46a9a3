"""The m gradient rows of the empirical Fisher, batched with ``torch.func``.

Row i of G (m x D) is the mean loss gradient of the given weights over one Fisher mini-batch of
``samples_per_row`` consecutive samples of a batch stream. Instead of m forward/backward passes one
after the other (what the public WoodFisher code does, and what made gradient collection 63-70 % of
a pruning event here), every call computes the gradients of many *pieces* at once with
``vmap(grad(...))``: a piece is ``piece`` samples of one row (the whole row, unless
``max_samples`` splits it), its gradient the sum of its samples' losses divided by
``samples_per_row``, and a row is the sum of its pieces. How many pieces go into one call is set
by a memory budget for the per-piece gradients (pieces x D floats).

The model runs in eval mode (BatchNorm uses its running statistics and is not updated), under
``functional_call`` with only the given weights as inputs of the gradient; everything else is
read from the model. Labels are the data's or, for the true Fisher, drawn from the model's own
softmax with a seeded generator (from a plain forward pass of the same inputs: in eval mode it
gives the same logits). The weights' gradients at masked-out coordinates are exactly 0, since a
masked layer computes with ``weight * mask``.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

CPU_BUDGET_BYTES = 256 * 2**20   # per-call piece gradients on the host (a few x that transiently)
GPU_BUDGET_BYTES = 1024 * 2**20


def piece_size(samples_per_row: int, max_samples: int | None) -> int:
    """The largest divisor of ``samples_per_row`` that is at most ``max_samples`` (all pieces of a
    row then have one size, which ``vmap`` needs)."""
    cap = samples_per_row if max_samples is None else max(1, min(max_samples, samples_per_row))
    return max(d for d in range(1, cap + 1) if samples_per_row % d == 0)


def _samples(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int, device: torch.device
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Re-cut a stream of batches of any size into consecutive slices of at most ``count`` samples."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    held = 0
    for x, y in batches:
        xs.append(x.to(device, non_blocking=True))
        ys.append(y.to(device, non_blocking=True))
        held += len(y)
        while held >= count:
            X, Y = torch.cat(xs), torch.cat(ys)
            yield X[:count], Y[:count]
            xs, ys, held = [X[count:]], [Y[count:]], held - count
    if held:
        yield torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def collect_gradients(
    model: nn.Module,
    weights: dict[str, nn.Parameter],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    rows: int,
    samples_per_row: int,
    max_samples: int | None = None,
    label_smoothing: float = 0.0,
    label_generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
    budget_bytes: int | None = None,
) -> torch.Tensor:
    """G (rows x D): gradient rows of the concatenated ``weights`` (qualified parameter name ->
    parameter of ``model``, in the column order of G).

    batches: an iterator of (inputs, labels); at least rows * samples_per_row samples are read.
    max_samples: at most this many samples of one row per piece (bounds the activations of a row).
    label_generator: draw labels from the model's softmax (true Fisher) with this generator.
    out: a preallocated (rows x D) matrix to fill (e.g. in pinned host memory); zeroed here.
    """
    first = next(iter(weights.values()))
    device, dtype = first.device, first.dtype
    names = list(weights)
    sizes = [weights[n].numel() for n in names]
    D = sum(sizes)
    G = torch.zeros(rows, D, dtype=dtype, device=device) if out is None else out.zero_()
    p = piece_size(samples_per_row, max_samples)
    pieces_per_row = samples_per_row // p
    budget = budget_bytes or (GPU_BUDGET_BYTES if device.type == "cuda" else CPU_BUDGET_BYTES)
    per_call = max(1, min(rows * pieces_per_row, budget // max(1, D * first.element_size())))
    params = {n: weights[n].detach() for n in names}

    def piece_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, params, (x,))
        return F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing) / samples_per_row

    piece_grads = vmap(grad(piece_loss), in_dims=(None, 0, 0))
    was_training = model.training
    model.eval()
    try:
        done = 0  # pieces finished
        total = rows * pieces_per_row
        for x, y in _samples(batches, per_call * p, device):
            n = min(len(y) // p, total - done)
            if n <= 0:
                break
            x, y = x[: n * p], y[: n * p]
            if label_generator is not None:
                probs = torch.softmax(model(x).float(), dim=1)
                y = torch.multinomial(probs, 1, generator=label_generator).squeeze(1)
            with torch.enable_grad():
                g = piece_grads(params, x.view(n, p, *x.shape[1:]), y.view(n, p))
            flat = torch.cat([g[name].reshape(n, -1) for name in names], dim=1)
            r0, r1 = done // pieces_per_row, (done + n - 1) // pieces_per_row  # rows this call touches
            row_of = torch.arange(done, done + n, device=device) // pieces_per_row - r0
            local = torch.zeros(r1 - r0 + 1, D, dtype=dtype, device=device)
            local.index_add_(0, row_of, flat.to(dtype))
            G[r0:r0 + len(local)].add_(local.to(G.device, non_blocking=True))
            done += n
            if done >= total:
                break
        if done < total:
            raise ValueError(f"the batch stream ended after {done * p} samples; "
                             f"{total * p} are needed for {rows} rows of {samples_per_row}")
    finally:
        model.train(was_training)
    return G
