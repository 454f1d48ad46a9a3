"""Baseline for the benchmark only: the public WoodFisher code's algorithm, re-implemented.

IST-DASLab/WoodFisher (``pruners/woodfisherblock.py``, ``_compute_block_woodburry_fisher_inverse``
and ``_compute_split_block_woodburry_fisher_inverse``) builds the inverse of
F = lambda I + (1/m) sum_i g_i g_i^T for each block by m sequential rank-1 Woodbury updates in
float32, starting from F_0^-1 = I / lambda:

    F_i^-1 = F_{i-1}^-1 - (F_{i-1}^-1 g_i)(F_{i-1}^-1 g_i)^T / (m + g_i^T F_{i-1}^-1 g_i).

Loop structure reproduced here, as in that code: layer by layer; inside a layer, blocks
("splits") of ``fittable_params`` consecutive weights, the last one shorter (no padding, blocks
never cross layers); inside a block, one Python iteration per gradient. The first update is
written in closed form from I / lambda (no c x c product), every later one as
``x = F^-1 g; x /= sqrt(m + g.x); F^-1 -= outer(x, x)`` -- one c x c matrix-vector product and one
freshly allocated c x c outer product per gradient. Nothing is batched across blocks: the public
code does not batch them either. Each block's full c x c inverse is kept (the public code keeps
them all until the global selection and update when joint sparsification is on).

Not used by the trainer; it exists so that ``bench/bench_fisher.py`` compares against the real
algorithm in the same process.
"""
from __future__ import annotations

from typing import Sequence

import torch


def woodbury_block_inverse(grads: torch.Tensor, *, damp: float) -> torch.Tensor:
    """F^-1 (c x c, float32) of one block from its gradient rows (m x c) by m rank-1 updates."""
    grads = grads.to(torch.float32)
    m = grads.shape[0]
    g = grads[0]
    # F_1^-1 = I/lambda - (g g^T / lambda^2) / (m + g^T g / lambda)
    inv = torch.outer(g, g).mul_(1.0 / damp**2).div_(m + g.dot(g) / damp)
    inv.diagonal().sub_(1.0 / damp)
    inv.mul_(-1)
    for i in range(1, m):
        g = grads[i]
        x = torch.matmul(inv, g)
        x.div_((m + g.dot(x)) ** 0.5)
        inv.sub_(torch.outer(x, x))
    return inv


def split_bounds(layer_sizes: Sequence[int], block_size: int) -> list[tuple[int, int]]:
    """(start, end) column ranges of every block, layer by layer, the last block of a layer shorter."""
    bounds, offset = [], 0
    for n in layer_sizes:
        for s in range(0, n, block_size):
            bounds.append((offset + s, offset + min(s + block_size, n)))
        offset += n
    return bounds


class SequentialWoodburyInverse:
    """All blocks of all layers by the sequential algorithm; diag(F^-1) and F^-1 v like ours.

    grads: (m, sum(layer_sizes)); ``bounds`` may restrict the work to a subset of the blocks
    (``split_bounds`` gives all of them).
    """

    def __init__(self, grads: torch.Tensor, *, bounds: Sequence[tuple[int, int]], damp: float) -> None:
        self.bounds = list(bounds)
        self.blocks = [woodbury_block_inverse(grads[:, a:b], damp=damp) for a, b in self.bounds]

    def diag(self) -> torch.Tensor:
        return torch.cat([blk.diagonal() for blk in self.blocks])

    def mul(self, v: torch.Tensor) -> torch.Tensor:
        """F^-1 v on the covered coordinates, v given over them (concatenated in bounds order)."""
        out, s = [], 0
        for blk in self.blocks:
            c = blk.shape[0]
            out.append(blk @ v[s:s + c].to(blk.dtype))
            s += c
        return torch.cat(out)


def sequential_peak_bytes(block_widths: Sequence[int], *, keep_all: bool = True) -> int:
    """Extra memory of the sequential method, float32: every kept c x c inverse, plus, while one
    block is being built, its fresh c x c outer product and the c-vector x.

    keep_all=True: all blocks held at once (joint/global selection, the issue's default);
    False: one block at a time (the least the algorithm can ever need)."""
    item = 4
    largest = max(block_widths)
    transient = largest * largest * item + largest * item
    kept = sum(c * c for c in block_widths) * item if keep_all else largest * largest * item
    return kept + transient
