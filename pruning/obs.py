"""The Optimal Brain Surgeon step: which weights to prune and how to move the others.

Model-agnostic: every function takes the flattened weights ``weight`` (the same coordinate order as
the columns of the gradient matrix G the Fisher inverse was built from; any shape is accepted and
returned), an inverse object with ``diag()``, ``mul(v)`` and ``fisher_diag()`` (see
``pruning.fisher_inverse``), and boolean masks with True = alive (kept) and True = pruned now.

Quadratic model of the loss around w with curvature F (the damped empirical Fisher):
    L(w + dw) - L(w) ~= g^T dw + 1/2 dw^T F dw.

WoodFisher / OBS (g taken as 0 at a trained point; Hassibi & Stork 1993; Singh & Alistarh 2020):
removing weight q (e_q^T dw = -w_q) at least cost gives
    dw = -(w_q / [F^-1]_qq) F^-1 e_q,        loss change = 1/2 w_q^2 / [F^-1]_qq.
The statistic is rho_q = w_q^2 / [F^-1]_qq (the 1/2 dropped: it does not change the ranking).
For the set Q pruned at once the update is the sum of the single-weight updates (the WoodFisher
approximation, which ignores the interaction between pruned weights of one block):
    dw = -F^-1 s,   s_q = w_q / [F^-1]_qq on Q, 0 elsewhere,
scaled by ``scale_prune_update`` (0 keeps the mask with no compensation); then the pruned weights
are set to exactly 0 (the sum of updates does not zero them when |Q| > 1).

WoodTaylor (the first-order term kept, g = the mean of the m gradient rows): with a = F^-1 g,
    dw = -a - ((w_q - a_q) / [F^-1]_qq) F^-1 e_q,
    loss change = 1/2 (w_q - a_q)^2 / [F^-1]_qq - 1/2 g^T F^-1 g.
The last term does not depend on q (it is the gain of the Newton step -a, applied whatever is
pruned), so the statistic is rho_q = (w_q - a_q)^2 / [F^-1]_qq and the update for a set Q is
dw = -a - F^-1 s with s_q = (w_q - a_q) / [F^-1]_qq on Q.

Diagonal Fisher (baseline): F replaced by diag(F_qq): rho_q = w_q^2 F_qq, and the OBS update moves
no other weight (F^-1 e_q is a multiple of e_q), so the update only zeroes the pruned weights.

Group OBS (filters/channels): removing a whole group Q (w_Q -> 0) at least cost gives
    dw = -F^-1[:, Q] ([F^-1]_QQ)^-1 w_Q,       loss change = 1/2 w_Q^T ([F^-1]_QQ)^-1 w_Q,
computed through ``fisher_inverse.group_solve`` (blocks must be aligned to whole groups).

Scores for the selector. The project's selector keeps the top-scoring units and ranks unstructured
weights by |score| (``layers.selector``), so the lowest score any unit can have is 0, not -inf
(|-inf| = +inf would be kept first). Already-pruned weights therefore get exactly 0 and every
alive weight gets at least the smallest positive normal float (``torch.finfo(dtype).tiny``), so an
alive weight always outranks a pruned one, with the raw scores and with their absolute values;
ranking among alive weights is unchanged (only values below ~1e-38 collapse).

The step is not differentiable: every function runs under ``torch.no_grad()`` and returns new
tensors (weights passed as Parameters are read, never modified in place).
"""
from __future__ import annotations

from typing import Protocol

import torch


class FisherInverse(Protocol):
    """What the OBS step needs from a (block-diagonal) inverse Fisher."""

    def diag(self) -> torch.Tensor: ...

    def fisher_diag(self) -> torch.Tensor: ...

    def mul(self, v: torch.Tensor) -> torch.Tensor: ...


class EmpiricalFisherInverseLike(FisherInverse, Protocol):
    """Group OBS also needs ([F^-1]_QQ)^-1 w_Q per group (``EmpiricalFisherInverse.group_solve``)."""

    def group_solve(self, w: torch.Tensor, *, group_size: int) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------
# helpers


def _flat(t: torch.Tensor | None, d: int, name: str) -> torch.Tensor | None:
    if t is None:
        return None
    if t.numel() != d:
        raise ValueError(f"{name} has {t.numel()} entries, expected {d}")
    return t.reshape(-1)


def _alive_score(stat: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """stat on alive weights (at least finfo.tiny), exactly 0 on pruned ones."""
    tiny = torch.finfo(stat.dtype).tiny
    return torch.where(alive, stat.clamp_min(tiny), torch.zeros((), dtype=stat.dtype, device=stat.device))


def _alive(mask: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(w, dtype=torch.bool) if mask is None else mask.reshape(-1).to(torch.bool)


def _finish(w_new: torch.Tensor, dead: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Pruned and already-pruned weights exactly 0, original shape and dtype."""
    w_new = w_new.masked_fill(dead, 0.0)
    return w_new.reshape(like.shape).to(like.dtype)


def _mean_grad(grad: torch.Tensor | None, d: int) -> torch.Tensor:
    if grad is None:
        raise ValueError("WoodTaylor needs grad= (the mean of the m gradient rows, length d)")
    return _flat(grad, d, "grad")


# ---------------------------------------------------------------------------------------------
# WoodFisher (OBS)


@torch.no_grad()
def obs_statistic(
    *,
    weight: torch.Tensor,
    fisher_inverse: FisherInverse,
    mask: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """rho_q = w_q^2 / [F^-1]_qq; 0 on already-pruned weights (mask False). Shape of weight.

    ``grad`` is accepted for a common signature with the WoodTaylor variant and ignored.
    """
    w = weight.reshape(-1)
    alive = _alive(mask, w)
    h = fisher_inverse.diag().to(w.dtype)
    return _alive_score(w.square() / h, alive).reshape(weight.shape)


@torch.no_grad()
def obs_update(
    *,
    weight: torch.Tensor,
    fisher_inverse: FisherInverse,
    prune: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale_prune_update: float = 1.0,
    grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """New weights after pruning the set ``prune`` (True = pruned now) with the OBS update.

    w + scale * (-F^-1 s), s_q = w_q / [F^-1]_qq on the pruned set; then pruned and already-pruned
    (mask False) weights set to exactly 0. Returns a new tensor shaped like ``weight``.
    """
    w = weight.reshape(-1)
    alive = _alive(mask, w)
    q = _flat(prune, w.numel(), "prune").to(torch.bool) & alive
    dead = q | ~alive
    if scale_prune_update == 0 or not bool(q.any()):
        return _finish(w, dead, weight)
    h = fisher_inverse.diag().to(w.dtype)
    s = torch.where(q, w / h, torch.zeros((), dtype=w.dtype, device=w.device))
    w_new = w - scale_prune_update * fisher_inverse.mul(s)
    return _finish(w_new, dead, weight)


# ---------------------------------------------------------------------------------------------
# WoodTaylor


@torch.no_grad()
def woodtaylor_statistic(
    *,
    weight: torch.Tensor,
    fisher_inverse: FisherInverse,
    mask: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """rho_q = (w_q - (F^-1 g)_q)^2 / [F^-1]_qq with g = ``grad`` (required); 0 on pruned weights."""
    w = weight.reshape(-1)
    alive = _alive(mask, w)
    a = fisher_inverse.mul(_mean_grad(grad, w.numel()).to(w.dtype))
    h = fisher_inverse.diag().to(w.dtype)
    return _alive_score((w - a).square() / h, alive).reshape(weight.shape)


@torch.no_grad()
def woodtaylor_update(
    *,
    weight: torch.Tensor,
    fisher_inverse: FisherInverse,
    prune: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale_prune_update: float = 1.0,
    grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """w + scale * (-F^-1 g - F^-1 s), s_q = (w_q - (F^-1 g)_q) / [F^-1]_qq on the pruned set;
    pruned and already-pruned weights then exactly 0.

    The Newton term -F^-1 g is zero on already-pruned coordinates when their gradient columns were
    masked to 0 (they are decoupled in F), as the gradient collection does.
    """
    w = weight.reshape(-1)
    alive = _alive(mask, w)
    q = _flat(prune, w.numel(), "prune").to(torch.bool) & alive
    dead = q | ~alive
    if scale_prune_update == 0:
        return _finish(w, dead, weight)
    g = _mean_grad(grad, w.numel()).to(w.dtype)
    a = fisher_inverse.mul(g)
    h = fisher_inverse.diag().to(w.dtype)
    s = torch.where(q, (w - a) / h, torch.zeros((), dtype=w.dtype, device=w.device))
    # One product for both terms: F^-1 g + F^-1 s = F^-1 (g + s).
    w_new = w - scale_prune_update * fisher_inverse.mul(g + s)
    return _finish(w_new, dead, weight)


# ---------------------------------------------------------------------------------------------
# diagonal Fisher baseline


@torch.no_grad()
def diagonal_fisher_statistic(
    *,
    weight: torch.Tensor,
    fisher_inverse: FisherInverse,
    mask: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """rho_q = w_q^2 F_qq (OBS with F replaced by its diagonal); 0 on pruned weights."""
    w = weight.reshape(-1)
    alive = _alive(mask, w)
    return _alive_score(w.square() * fisher_inverse.fisher_diag().to(w.dtype), alive).reshape(weight.shape)


@torch.no_grad()
def diagonal_fisher_update(
    *,
    weight: torch.Tensor,
    fisher_inverse: FisherInverse,
    prune: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale_prune_update: float = 1.0,
    grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """The OBS update under a diagonal F moves only the pruned weight itself (to 0): zero the pruned
    and already-pruned weights, leave the rest untouched (``scale_prune_update`` has nothing to scale)."""
    w = weight.reshape(-1)
    alive = _alive(mask, w)
    q = _flat(prune, w.numel(), "prune").to(torch.bool) & alive
    return _finish(w, q | ~alive, weight)


# ---------------------------------------------------------------------------------------------
# group OBS (filters / channels)


def group_permutation(*, shape: tuple[int, ...] | torch.Size, granularity: str) -> tuple[torch.Tensor | None, int]:
    """Order of the flattened weight that makes each unit a contiguous group, and the group size.

    ``filter`` (output channel, dim 0): already contiguous in row-major order -> (None, numel/shape[0]).
    ``channel`` (input channel, dim 1): perm such that w.flatten()[perm] lists channel 0's weights,
    then channel 1's, ...; apply it to the weight and to the columns of G before building the
    inverse, and scatter the result back with ``out[perm] = result``.
    """
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    if granularity == "filter":
        return None, n // shape[0]
    if granularity == "channel":
        perm = torch.arange(n).view(shape).transpose(0, 1).reshape(-1)
        return perm, n // shape[1]
    raise ValueError(f"group OBS supports granularity 'filter' or 'channel', got {granularity!r}")


@torch.no_grad()
def group_obs_statistic(
    *,
    weight: torch.Tensor,
    fisher_inverse: EmpiricalFisherInverseLike,
    group_size: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per group Q (contiguous, ``group_size`` weights): rho_Q = w_Q^T ([F^-1]_QQ)^-1 w_Q;
    0 on already-pruned groups (``mask``: one bool per group, True = alive). Shape (n_groups,)."""
    w = weight.reshape(-1)
    n_groups = w.numel() // group_size
    u = fisher_inverse.group_solve(w, group_size=group_size)
    stat = (w.view(n_groups, group_size) * u.view(n_groups, group_size)).sum(1)
    alive = torch.ones(n_groups, dtype=torch.bool, device=w.device) if mask is None else mask.reshape(-1).to(torch.bool)
    return _alive_score(stat, alive)


@torch.no_grad()
def group_obs_update(
    *,
    weight: torch.Tensor,
    fisher_inverse: EmpiricalFisherInverseLike,
    group_size: int,
    prune: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale_prune_update: float = 1.0,
) -> torch.Tensor:
    """w + scale * (-F^-1 S), S_Q = ([F^-1]_QQ)^-1 w_Q on the pruned groups, 0 elsewhere; pruned
    and already-pruned groups then exactly 0. ``prune``/``mask``: one bool per group."""
    w = weight.reshape(-1)
    n_groups = w.numel() // group_size
    alive = torch.ones(n_groups, dtype=torch.bool, device=w.device) if mask is None else mask.reshape(-1).to(torch.bool)
    q = prune.reshape(-1).to(torch.bool) & alive
    dead = (q | ~alive).repeat_interleave(group_size)
    if scale_prune_update == 0 or not bool(q.any()):
        return _finish(w, dead, weight)
    u = fisher_inverse.group_solve(w, group_size=group_size).view(n_groups, group_size)
    S = torch.where(q[:, None], u, torch.zeros((), dtype=u.dtype, device=u.device)).reshape(-1)
    w_new = w - scale_prune_update * fisher_inverse.mul(S.to(w.dtype))
    return _finish(w_new, dead, weight)


# ---------------------------------------------------------------------------------------------
# magnitude baselines


@torch.no_grad()
def magnitude_statistic(*, weight: torch.Tensor, fisher_inverse=None, mask: torch.Tensor | None = None,
                        grad: torch.Tensor | None = None) -> torch.Tensor:
    """w_q^2 (the ranking of |w|); 0 on already-pruned weights. Needs no Fisher."""
    w = weight.reshape(-1)
    return _alive_score(w.square(), _alive(mask, w)).reshape(weight.shape)


@torch.no_grad()
def zero_update(*, weight: torch.Tensor, fisher_inverse, prune: torch.Tensor, mask: torch.Tensor | None = None,
                scale_prune_update: float = 1.0, grad: torch.Tensor | None = None) -> torch.Tensor:
    """No compensation: pruned and already-pruned weights set to 0, the rest untouched."""
    w = weight.reshape(-1)
    dead = _flat(prune, w.numel(), "prune").to(torch.bool) | ~_alive(mask, w)
    return _finish(w, dead, weight)
