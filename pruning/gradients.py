"""The m gradient rows of the empirical Fisher, many rows per forward/backward pass.

Row i of G (m x D) is the mean loss gradient of the masked layers' weights over one Fisher
mini-batch of ``samples_per_row`` consecutive samples of a batch stream. The public WoodFisher
code (and this project before) ran m forward/backward passes one after the other, which made
gradient collection 63-70 % of a pruning event. Here one pass over a chunk of many samples gives
all their rows at once, with the per-example-gradient identity of conv and linear layers (as in
Opacus / BackPACK): for y = W x,

    dL/dW = sum over samples s (and output positions l) of  dL/dy[s, :, l]  x[s, :, l]^T,

so the gradient of a *group* of samples (one row) is that sum restricted to the group: a batched
matrix product of the layer's output gradients and its (unfolded, for a conv) inputs, both taken
from the one pass (forward hooks keep the inputs; ``autograd.grad`` gives the output gradients,
without computing any summed weight gradient). Pieces: a row may be split into pieces of
``max_samples`` (bounds one pass's activations); pieces of one row add up.

The model runs in eval mode (BatchNorm uses its running statistics and is not updated). Labels are
the data's or, for the true Fisher, drawn from the model's own softmax with a seeded generator.
Masked-out coordinates are exactly 0: a masked layer computes with ``weight * mask``, so
dL/dweight = mask * dL/d(weight * mask).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layers.masked import MaskedLayer

CPU_BUDGET_BYTES = 256 * 2**20   # row gradients of one pass (the rows it touches x D floats)
GPU_BUDGET_BYTES = 1024 * 2**20
SAMPLES_PER_PASS = 256           # at most this many samples of one row per pass (bounds a piece)
# Samples per forward/backward pass (several rows' pieces together). On a CPU, passes larger than the
# caches cost more than they save: ResNet-20 rows of 1 sample took 3.3 s per 1000 rows in passes of 256
# against 1.5 s in passes of 64, rows of 8 samples 0.81 s against 0.55 s (bench/bench_event.py cases).
PASS_SAMPLES = {"cpu": 64, "cuda": 256}


def piece_size(samples_per_row: int, max_samples: int | None) -> int:
    """The largest divisor of ``samples_per_row`` that is at most ``max_samples`` and at most
    SAMPLES_PER_PASS (all pieces of a row then have one size, and one pass holds a bounded number
    of samples, however many a row averages)."""
    cap = min(samples_per_row, SAMPLES_PER_PASS, max_samples or samples_per_row)
    return next(d for d in range(max(1, cap), 0, -1) if samples_per_row % d == 0)


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


def _conv_padding(layer: nn.Conv2d) -> tuple[int, ...]:
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return (0, 0)
        pads = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        if any(p % 2 for p in pads):
            raise NotImplementedError("padding='same' with an even receptive field pads unevenly: not supported")
        return (pads[0] // 2, pads[1] // 2)
    return layer.padding


def _piece_grads(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor, pieces: int) -> torch.Tensor:
    """(pieces, *weight.shape): for one call of ``layer`` on inputs ``x`` (pieces x p samples, piece
    by piece) with output gradients ``gy``, the sum over each piece's samples of dL/dW_eff."""
    p = x.shape[0] // pieces
    if isinstance(layer, nn.Linear):
        xs = x.reshape(pieces, -1, x.shape[-1])     # (pieces, p * positions, in)
        gs = gy.reshape(pieces, -1, gy.shape[-1])   # (pieces, p * positions, out)
        return torch.bmm(gs.transpose(1, 2), xs)    # (pieces, out, in)
    if not isinstance(layer, nn.Conv2d):
        raise TypeError(f"no per-example gradient rule for {type(layer).__name__} (Conv2d and Linear only)")
    padding = _conv_padding(layer)
    if layer.padding_mode != "zeros":  # as Conv2d._conv_forward: pad first, then convolve unpadded
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = (0, 0)
    args = (None, list(layer.stride), list(padding), list(layer.dilation), False, [0, 0])
    if p >= 4:
        # A weight-gradient kernel per piece: measured fastest on CPU once a piece has a few samples.
        out = torch.empty(pieces, *layer.weight.shape, dtype=x.dtype, device=x.device)
        xs, gs = x.view(pieces, p, *x.shape[1:]), gy.view(pieces, p, *gy.shape[1:])
        for i in range(pieces):
            out[i] = torch.ops.aten.convolution_backward(gs[i], xs[i], layer.weight, *args, layer.groups,
                                                         [False, True, False])[1]
        return out
    # Few samples per piece: one grouped weight-gradient call, the pieces as channel groups (the
    # p samples of a piece are the batch that is summed over).
    c, o = x.shape[1], gy.shape[1]
    xg = x.view(pieces, p, *x.shape[1:]).transpose(0, 1).reshape(p, pieces * c, *x.shape[2:])
    gg = gy.view(pieces, p, *gy.shape[1:]).transpose(0, 1).reshape(p, pieces * o, *gy.shape[2:])
    weight = layer.weight.detach().expand(pieces, *layer.weight.shape).reshape(pieces * o, *layer.weight.shape[1:])
    gw = torch.ops.aten.convolution_backward(gg, xg, weight, *args, layer.groups * pieces, [False, True, False])[1]
    return gw.view(pieces, *layer.weight.shape)


def pass_samples(*, rows: int, samples_per_row: int, width: int, element_size: int, device_type: str,
                 max_samples: int | None = None, budget_bytes: int | None = None) -> int:
    """Samples per forward/backward pass of ``collect_gradients`` for ``rows`` rows of ``samples_per_row``
    over ``width`` (D) weights: whole pieces (``piece_size``), at most PASS_SAMPLES of the device, and
    no more rows' gradients (rows x D floats) than the budget. bench/bench_event.py cuts its dense
    backward passes the same way."""
    p = piece_size(samples_per_row, max_samples)
    pieces_per_row = samples_per_row // p
    total = rows * pieces_per_row
    budget = budget_bytes or (GPU_BUDGET_BYTES if device_type == "cuda" else CPU_BUDGET_BYTES)
    per_pass = max(1, min(total, max(1, PASS_SAMPLES.get(device_type, SAMPLES_PER_PASS) // p),
                          max(1, budget // max(1, width * element_size)) * pieces_per_row))
    return per_pass * p


@torch.no_grad()
def collect_gradients(
    model: nn.Module,
    layers: Mapping[str, nn.Conv2d | nn.Linear | MaskedLayer],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    rows: int,
    samples_per_row: int,
    max_samples: int | None = None,
    label_smoothing: float = 0.0,
    label_generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
    budget_bytes: int | None = None,
    masked_columns: bool = True,
) -> torch.Tensor:
    """G (rows x D): gradient rows of the weights of ``layers`` (Conv2d/Linear modules of ``model``,
    masked or not; their weights concatenated in this order are the columns of G).

    batches: an iterator of (inputs, labels); exactly rows * samples_per_row samples are used.
    max_samples: at most this many samples of one row per pass (bounds the activations of a row).
    label_generator: draw labels from the model's softmax (true Fisher) with this generator.
    out: a preallocated (rows x D) matrix to fill (e.g. in pinned host memory); zeroed here.
    masked_columns: the gradient of each weight (0 where masked out, as dL/dweight is). False: the
        gradient of the effective weight weight * mask at every coordinate, masked ones included (what
        the loss would do if a masked-out weight came back: the columns OBS needs to compensate for
        weights a mask removed, at the masked model).
    """
    mods = list(layers.values())
    device, dtype = mods[0].weight.device, mods[0].weight.dtype
    sizes = [m.weight.numel() for m in mods]
    D = sum(sizes)
    G = torch.zeros(rows, D, dtype=dtype, device=device) if out is None else out.zero_()
    p = piece_size(samples_per_row, max_samples)
    pieces_per_row = samples_per_row // p
    total = rows * pieces_per_row
    # pieces per pass: bounded by the samples of one pass, and by the row gradients it makes
    per_pass = pass_samples(rows=rows, samples_per_row=samples_per_row, width=D,
                            element_size=mods[0].weight.element_size(), device_type=device.type,
                            max_samples=max_samples, budget_bytes=budget_bytes) // p
    calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def keep_io(index: int) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            calls.setdefault(index, []).append((args[0].detach(), output))
        return hook

    was_training = model.training
    requires = [m.weight.requires_grad for m in mods]
    handles = [m.register_forward_hook(keep_io(i)) for i, m in enumerate(mods)]
    model.eval()
    try:
        for m in mods:  # outputs must be part of a graph; no weight gradient is computed from it
            m.weight.requires_grad_(True)
        done = 0  # pieces finished
        for x, y in _samples(batches, per_pass * p, device):
            n = min(len(y) // p, total - done)
            if n <= 0:
                break
            x, y = x[: n * p], y[: n * p]
            calls.clear()
            with torch.enable_grad():
                logits = model(x)
                if label_generator is not None:
                    probs = torch.softmax(logits.detach().float(), dim=1)
                    y = torch.multinomial(probs, 1, generator=label_generator).squeeze(1)
                loss = F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing) / samples_per_row
                outputs = [o for i in range(len(mods)) for _, o in calls.get(i, [])]
                if len(outputs) == 0:
                    raise ValueError("none of the layers took part in the forward pass")
                grads = iter(torch.autograd.grad(loss, outputs))
            r0, r1 = done // pieces_per_row, (done + n - 1) // pieces_per_row  # rows this pass touches
            piece_row = torch.arange(done, done + n, device=device) // pieces_per_row - r0
            parts = []
            for i, m in enumerate(mods):
                g = torch.zeros(r1 - r0 + 1, *m.weight.shape, dtype=dtype, device=device)
                for inp, _ in calls.get(i, []):  # a layer called twice (shared weights) adds up its calls
                    g.index_add_(0, piece_row, _piece_grads(m, inp, next(grads), n).to(dtype))
                mask = getattr(m, "mask", None)
                if mask is not None and masked_columns:
                    g.mul_(mask)
                parts.append(g.reshape(r1 - r0 + 1, -1))
            G[r0:r1 + 1].add_(torch.cat(parts, dim=1).to(G.device, non_blocking=True))
            done += n
            if done >= total:
                break
        if done < total:
            raise ValueError(f"the batch stream ended after {done * p} samples; "
                             f"{total * p} are needed for {rows} rows of {samples_per_row}")
    finally:
        for h in handles:
            h.remove()
        for m, r in zip(mods, requires):
            m.weight.requires_grad_(r)
        model.train(was_training)
    return G
