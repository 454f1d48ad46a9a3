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
For the set Q pruned at once there are two updates, both dw = -F^-1 s with s = 0 off Q:
    joint (exact under the quadratic model):  s_Q = ([F^-1]_QQ)^-1 w_Q,
              dw = -F^-1[:, Q] ([F^-1]_QQ)^-1 w_Q,   loss change 1/2 w_Q^T ([F^-1]_QQ)^-1 w_Q;
    sum (WoodFisher's approximation, the sum of the single-weight updates, which ignores the
              interaction between the pruned weights of one block):  s_q = w_q / [F^-1]_qq.
The joint solve is blockwise (``EmpiricalFisherInverse.solve_pruned``) and never costs more than
one block's inverse. Either update is scaled by ``scale_prune_update`` (0 keeps the mask with no
compensation); then the pruned weights are set to exactly 0 (the sum does not zero them when
|Q| > 1; the joint update does, up to round-off).

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
computed through ``fisher_inverse.group_solve`` (blocks must be aligned to whole groups), the joint
move for several groups through ``group_pruned_mul``; kfac's Kronecker inverse has both in closed form
(``pruning.kfac``).

Unit criteria without curvature (filters/channels only): FPGM scores a unit by the sum of the L2
distances from its weights to every other alive unit's of the layer (its distance from the geometric
median); TaylorFO by the mean over the m gradient rows of (g_r restricted to the unit . w_unit)^2. Neither
adds up over weights, so each is one score per unit; neither moves the surviving weights. Three more
read the model itself (filters only, ``probe``: ``pruning.activations``): APoZ scores a filter by the
fraction of its post-ReLU outputs that are non-zero, meanact by their mean, slimming by |gamma| of its
BatchNorm.

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

from typing import TYPE_CHECKING, Protocol, overload

import torch

if TYPE_CHECKING:  # annotations only: this module stays model-agnostic
    from pruning.activations import UnitProbe


class FisherInverse(Protocol):
    """What the OBS step needs from a (block-diagonal) inverse Fisher."""

    def diag(self) -> torch.Tensor: ...

    def fisher_diag(self) -> torch.Tensor: ...

    def mul(self, v: torch.Tensor) -> torch.Tensor: ...

    def solve_pruned(self, t: torch.Tensor, prune: torch.Tensor) -> torch.Tensor: ...

    def pruned_mul(self, t: torch.Tensor, prune: torch.Tensor) -> torch.Tensor: ...


class EmpiricalFisherInverseLike(FisherInverse, Protocol):
    """Group OBS also needs ([F^-1]_QQ)^-1 w_Q per group (``EmpiricalFisherInverse.group_solve``) and the
    joint move for a union of groups (``group_pruned_mul``); kfac's ``KroneckerInverse`` has both too."""

    def group_solve(self, w: torch.Tensor, *, group_size: int) -> torch.Tensor: ...

    def group_pruned_mul(self, w: torch.Tensor, prune: torch.Tensor, *, group_size: int) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------
# helpers


@overload
def _flat(t: torch.Tensor, d: int, name: str) -> torch.Tensor: ...
@overload
def _flat(t: None, d: int, name: str) -> None: ...
@overload
def _flat(t: torch.Tensor | None, d: int, name: str) -> torch.Tensor | None: ...
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


def pruned_solve(fisher_inverse: FisherInverse, t: torch.Tensor, prune: torch.Tensor, *, joint: bool) -> torch.Tensor:
    """s with s = 0 off the pruned set Q and, on Q, ([F^-1]_QQ)^-1 t_Q (joint) or t_q / [F^-1]_qq (sum):
    the update for removing Q is then -F^-1 s (see the module docstring)."""
    if joint:
        return fisher_inverse.solve_pruned(t, prune)
    h = fisher_inverse.diag().to(t.dtype)
    return torch.where(prune, t / h, torch.zeros((), dtype=t.dtype, device=t.device))


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
    joint: bool = False,
) -> torch.Tensor:
    """New weights after pruning the set ``prune`` (True = pruned now) with the OBS update.

    w + scale * (-F^-1 s), s the joint or summed solve on the pruned set (``pruned_solve``); then
    pruned and already-pruned (mask False) weights set to exactly 0. Returns a new tensor shaped
    like ``weight``. No host synchronisation: an empty set simply gives s = 0.
    """
    w = weight.reshape(-1)
    alive = _alive(mask, w)
    q = _flat(prune, w.numel(), "prune").to(torch.bool) & alive
    dead = q | ~alive
    if scale_prune_update == 0:
        return _finish(w, dead, weight)
    if joint:  # F^-1 s in one call (``pruned_mul``: from F_RR alone where that is cheaper)
        w_new = w - scale_prune_update * fisher_inverse.pruned_mul(w, q)
    else:
        w_new = w - scale_prune_update * fisher_inverse.mul(pruned_solve(fisher_inverse, w, q, joint=False))
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
    joint: bool = False,
) -> torch.Tensor:
    """w + scale * (-F^-1 g - F^-1 s), s the joint or summed solve of (w - F^-1 g) on the pruned set
    (the constrained minimiser of g^T dw + 1/2 dw^T F dw with w_Q + dw_Q = 0 when joint); pruned and
    already-pruned weights then exactly 0.

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
    s = pruned_solve(fisher_inverse, w - a, q, joint=joint)
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
    joint: bool = False,
) -> torch.Tensor:
    """The OBS update under a diagonal F moves only the pruned weight itself (to 0): zero the pruned
    and already-pruned weights, leave the rest untouched (``scale_prune_update`` has nothing to scale,
    and the joint solve equals the sum for a diagonal F)."""
    w = weight.reshape(-1)
    alive = _alive(mask, w)
    q = _flat(prune, w.numel(), "prune").to(torch.bool) & alive
    return _finish(w, q | ~alive, weight)


# ---------------------------------------------------------------------------------------------
# group OBS (filters / channels)


def group_permutation(*, shape: tuple[int, ...] | torch.Size, granularity: str,
                      device: torch.device | str | None = None) -> tuple[torch.Tensor | None, int]:
    """Order of the flattened weight that makes each unit a contiguous group, and the group size.

    ``filter`` (output channel, dim 0): already contiguous in row-major order -> (None, numel/shape[0]).
    ``channel`` (input channel, dim 1): perm such that w.flatten()[perm] lists channel 0's weights,
    then channel 1's, ...; apply it to the weight and to the columns of G before building the
    inverse, and scatter the result back with ``out[perm] = result``. Made on ``device`` directly.
    """
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    if granularity == "filter":
        return None, n // shape[0]
    if granularity == "channel":
        perm = torch.arange(n, device=device).view(shape).transpose(0, 1).reshape(-1)
        return perm, n // shape[1]
    raise ValueError(f"group OBS supports granularity 'filter' or 'channel', got {granularity!r}")


@torch.no_grad()
def group_obs_statistic(
    *,
    weight: torch.Tensor,
    fisher_inverse: EmpiricalFisherInverseLike,
    group_size: int,
    mask: torch.Tensor | None = None,
    solved: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per group Q (contiguous, ``group_size`` weights): rho_Q = w_Q^T ([F^-1]_QQ)^-1 w_Q;
    0 on already-pruned groups (``mask``: one bool per group, True = alive). Shape (n_groups,).
    ``solved``: u = ([F^-1]_QQ)^-1 w_Q per group if already computed (``group_obs_update`` reuses it)."""
    w = weight.reshape(-1)
    n_groups = w.numel() // group_size
    u = fisher_inverse.group_solve(w, group_size=group_size) if solved is None else solved
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
    joint: bool = False,
    solved: torch.Tensor | None = None,
) -> torch.Tensor:
    """Remove the pruned groups (``prune``/``mask``: one bool per group) with the OBS update.

    joint: s on the union Q of all pruned groups' coordinates of a block is ([F^-1]_QQ)^-1 w_Q (the
    exact optimum for removing them together); otherwise the sum over groups of the single-group
    updates, S_Q = ([F^-1]_QQ)^-1 w_Q per group (``solved`` passes in that per-group solve when the
    statistic already computed it, so it is not solved twice). Then w + scale * (-F^-1 s), pruned
    and already-pruned groups exactly 0."""
    w = weight.reshape(-1)
    n_groups = w.numel() // group_size
    alive = torch.ones(n_groups, dtype=torch.bool, device=w.device) if mask is None else mask.reshape(-1).to(torch.bool)
    q = prune.reshape(-1).to(torch.bool) & alive
    dead = (q | ~alive).repeat_interleave(group_size)
    if scale_prune_update == 0:
        return _finish(w, dead, weight)
    if joint:
        w_new = w - scale_prune_update * fisher_inverse.group_pruned_mul(w, q, group_size=group_size)
        return _finish(w_new, dead, weight)
    q_weights = q.repeat_interleave(group_size)
    u = fisher_inverse.group_solve(w, group_size=group_size) if solved is None else solved
    s = torch.where(q_weights, u.reshape(-1), torch.zeros((), dtype=u.dtype, device=u.device))
    w_new = w - scale_prune_update * fisher_inverse.mul(s.to(w.dtype))
    return _finish(w_new, dead, weight)


# ---------------------------------------------------------------------------------------------
# magnitude baselines


@torch.no_grad()
def magnitude_ranking(*, weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """|w|, what the magnitude criterion ranks (its statistic for the solver is the square); with a
    ``mask``, 0 on already-pruned weights and at least finfo.tiny on alive ones, so that a selection
    only removes."""
    return weight.abs() if mask is None else _alive_score(weight.abs(), mask.to(torch.bool))


@torch.no_grad()
def magnitude_statistic(*, weight: torch.Tensor, fisher_inverse: FisherInverse | None = None,
                        mask: torch.Tensor | None = None,
                        grad: torch.Tensor | None = None) -> torch.Tensor:
    """w_q^2 (the ranking of |w|); 0 on already-pruned weights. Needs no Fisher."""
    w = weight.reshape(-1)
    return _alive_score(w.square(), _alive(mask, w)).reshape(weight.shape)


@torch.no_grad()
def l1_statistic(*, weight: torch.Tensor, fisher_inverse: FisherInverse | None = None,
                 mask: torch.Tensor | None = None, grad: torch.Tensor | None = None) -> torch.Tensor:
    """|w_q|, 0 on already-pruned weights: summed over a filter/channel (the selector ranks the square root
    of the sum, see ``pruning.methods.selector_scores``), a unit ranks by its L1 norm. Needs no Fisher."""
    w = weight.reshape(-1)
    return _alive_score(w.abs(), _alive(mask, w)).reshape(weight.shape)


@torch.no_grad()
def random_statistic(*, weight: torch.Tensor, fisher_inverse: FisherInverse | None = None,
                     mask: torch.Tensor | None = None, grad: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform random scores in (0, 1), 0 on already-pruned weights: the random baseline. Drawn from a
    generator seeded by the weights' own bits (their float64 sum and count), so the same weights give the
    same scores on every rank, on resume and on rerun, without touching the training's random streams."""
    w = weight.reshape(-1)
    seed = hash((float(w.detach().double().sum()), w.numel())) & 0x7FFF_FFFF_FFFF_FFFF
    r = torch.rand(w.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return _alive_score(r.to(device=w.device, dtype=w.dtype), _alive(mask, w)).reshape(weight.shape)


# ---------------------------------------------------------------------------------------------
# unit criteria (filters / channels) without curvature: one score per unit, from the weights and, for
# TaylorFO, the gradient rows; ``weight`` in unit order (contiguous groups of ``group_size``, see
# ``group_permutation``), ``mask`` one bool per unit (True = alive), ``rows`` G's columns in the same order.


def _alive_units(mask: torch.Tensor | None, n_units: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n_units, dtype=torch.bool, device=device) if mask is None else mask.reshape(-1).to(torch.bool)


@torch.no_grad()
def fpgm_statistic(*, weight: torch.Tensor, group_size: int, mask: torch.Tensor | None = None,
                   rows: torch.Tensor | None = None, probe: UnitProbe | None = None) -> torch.Tensor:
    """FPGM (He, Liu, Wang, Hu & Yang, "Filter Pruning via Geometric Median", CVPR 2019; NNI's FPGMPruner):
    sum_j ||w_u - w_j||_2 over the other alive units j of the layer. The unit nearest the geometric median
    (smallest sum) is the most replaceable by the others, so it is pruned first. Already-pruned units score 0
    and are left out of the others' sums: their zeroed weights would otherwise count as a point at the
    origin. Shape (n_units,). ``rows`` and ``probe`` are accepted for a common signature and ignored."""
    w = weight.reshape(-1)
    n_units = w.numel() // group_size
    alive = _alive_units(mask, n_units, w.device)
    # float64: a distance sum of near neighbours loses digits to cdist's |a|^2 + |b|^2 - 2 a.b in float32
    units = w.view(n_units, group_size).double()
    dist = torch.cdist(units, units)
    stat = (dist * alive.to(dist.dtype)[None, :]).sum(1)
    return _alive_score(stat.to(w.dtype), alive)


@torch.no_grad()
def taylorfo_statistic(*, weight: torch.Tensor, group_size: int, mask: torch.Tensor | None = None,
                       rows: torch.Tensor | None = None, probe: UnitProbe | None = None) -> torch.Tensor:
    """First-order Taylor importance of a unit (Molchanov, Mallya, Tyree, Frosio & Kautz, "Importance
    Estimation for Neural Network Pruning", CVPR 2019, the "FO on weights" criterion): removing unit u
    changes the loss of mini-batch r by about -sum_{q in u} g_{r,q} w_q, so u scores by the mean over the m
    gradient rows r of (sum_{q in u} g_{r,q} w_q)^2 (``rows``: G's columns of this layer, required). The
    square is taken per mini-batch, before averaging, as the paper does: a mean gradient would cancel the
    batches' disagreement. 0 on already-pruned units. Shape (n_units,). ``probe`` is ignored."""
    if rows is None:
        raise ValueError("TaylorFO needs rows= (the m gradient rows of this layer's weights, m x numel)")
    w = weight.reshape(-1)
    n_units = w.numel() // group_size
    if rows.dim() != 2 or rows.shape[1] != w.numel():
        raise ValueError(f"rows must be (m, {w.numel()}), got {tuple(rows.shape)}")
    g = rows.to(device=w.device, dtype=w.dtype).view(-1, n_units, group_size)
    per_row = torch.einsum("rug,ug->ru", g, w.view(n_units, group_size))  # sum_{q in u} g_{r,q} w_q, no m x D temporary
    return _alive_score(per_row.square().mean(0), _alive_units(mask, n_units, w.device))


# ---------------------------------------------------------------------------------------------
# unit criteria that read the model (filters only): ``probe`` is what ``pruning.activations`` measured of
# the layer's filters (activation counts on calibration samples, or the following BatchNorm's gamma).


def _probe(probe: UnitProbe | None, field: str, criterion: str, n_units: int) -> torch.Tensor:
    value = None if probe is None else getattr(probe, field)
    if value is None:
        raise ValueError(f"{criterion} needs probe= with {field} per filter (pruning.activations)")
    if value.numel() != n_units:
        raise ValueError(f"{criterion}: probe.{field} has {value.numel()} entries, expected {n_units} filters")
    return value.reshape(-1)


@torch.no_grad()
def apoz_statistic(*, weight: torch.Tensor, group_size: int, mask: torch.Tensor | None = None,
                   rows: torch.Tensor | None = None, probe: UnitProbe | None = None) -> torch.Tensor:
    """1 - APoZ, the fraction of a filter's activation outputs that are not zero (Hu, Peng, Tai & Tang,
    "Network Trimming: A Data-Driven Neuron Pruning Approach towards Efficient Deep Architectures", 2016;
    NNI's ActivationAPoZRankFilterPruner). APoZ is the Average Percentage of Zeros of the ReLU after the
    filter over the calibration samples and positions (``probe.zeros / probe.count``); the more zeros, the
    less the filter passes on, so the lowest 1 - APoZ is pruned first (a filter that is always 0 scores
    finfo.tiny, still above a pruned one). 0 on already-pruned filters. Shape (n_units,)."""
    w = weight.reshape(-1)
    n_units = w.numel() // group_size
    stat = 1.0 - _per_activation(probe, "zeros", "apoz", n_units, w.device)
    return _alive_score(stat.to(w.dtype), _alive_units(mask, n_units, w.device))


@torch.no_grad()
def meanact_statistic(*, weight: torch.Tensor, group_size: int, mask: torch.Tensor | None = None,
                      rows: torch.Tensor | None = None, probe: UnitProbe | None = None) -> torch.Tensor:
    """The mean of a filter's activation outputs over the calibration samples and positions
    (``probe.total / probe.count``; the "mean activation" baseline of Molchanov, Tyree, Karras, Aila & Kautz,
    "Pruning Convolutional Neural Networks for Resource Efficient Inference", ICLR 2017; NNI's
    ActivationMeanRankFilterPruner): after a ReLU every output is >= 0, and the smallest mean is pruned
    first. 0 on already-pruned filters. Shape (n_units,)."""
    w = weight.reshape(-1)
    n_units = w.numel() // group_size
    stat = _per_activation(probe, "total", "meanact", n_units, w.device)
    return _alive_score(stat.to(w.dtype), _alive_units(mask, n_units, w.device))


def _per_activation(probe: UnitProbe | None, field: str, name: str, n_units: int,
                    device: torch.device) -> torch.Tensor:
    """A probe's per-filter sum ``field`` over its activations, divided by how many were measured (float64)."""
    summed = _probe(probe, field, name, n_units)
    assert probe is not None  # ``_probe``
    if probe.count < 1:
        raise ValueError(f"{name}: no activation was measured (probe.count is 0)")
    return summed.to(device=device, dtype=torch.float64) / probe.count


@torch.no_grad()
def slimming_statistic(*, weight: torch.Tensor, group_size: int, mask: torch.Tensor | None = None,
                       rows: torch.Tensor | None = None, probe: UnitProbe | None = None) -> torch.Tensor:
    """|gamma| of the BatchNorm after the filter (Liu, Li, Shen, Huang, Yan & Zhang, "Learning Efficient
    Convolutional Networks through Network Slimming", ICCV 2017): the BatchNorm scales the filter's
    normalised output by gamma, so a small |gamma| (driven there by the L1 penalty, ``--bn-l1``) means a
    filter the next layer barely sees. 0 on already-pruned filters. Shape (n_units,)."""
    w = weight.reshape(-1)
    n_units = w.numel() // group_size
    gamma = _probe(probe, "gamma", "slimming", n_units)
    return _alive_score(gamma.to(device=w.device, dtype=w.dtype).abs(), _alive_units(mask, n_units, w.device))


# ---------------------------------------------------------------------------------------------
# second-order criteria with a curvature read off the model per layer (``PruneMethod.curvature``: naivehess's
# Hessian diagonal, ``pruning.hessian``; kfac's Kronecker inverse, ``pruning.kfac``, which uses the OBS
# statistic and update above with its own inverse)


class LayerCurvature(FisherInverse, Protocol):
    """A per-layer curvature the solver hands to a statistic and update as ``fisher_inverse``."""

    def permuted(self, perm: torch.Tensor) -> LayerCurvature: ...

    def kept_memory_bytes(self) -> int: ...

    def peak_memory_bytes(self) -> int: ...

    def failed(self) -> torch.Tensor: ...


@torch.no_grad()
def naivehess_statistic(*, weight: torch.Tensor, fisher_inverse: FisherInverse, mask: torch.Tensor | None = None,
                        grad: torch.Tensor | None = None) -> torch.Tensor:
    """Optimal Brain Damage (LeCun, Denker & Solla 1990) with the exact Hessian diagonal H_qq
    (``fisher_inverse.fisher_diag()``, ``pruning.hessian``): the loss change of removing w_q when the gradient
    is 0 and H is taken as diagonal, 1/2 w_q^2 H_qq (the 1/2 dropped: it does not change the ranking; for a
    diagonal H the OBS statistic w_q^2 / [H^-1]_qq is the same number). H_qq can be negative away from a
    minimum; as WoodFisher's NaiveHessianPruner does, the signed value ranks (a weight whose removal the
    quadratic model says lowers the loss goes first), shifted so that it is not negative: by the smallest
    alive value when that is below 0 (the reference subtracts the layer's minimum), so the ranking within a
    layer is that of w^2 H_qq and non-negative values are unchanged. 0 on already-pruned weights."""
    w = weight.reshape(-1)
    alive = _alive(mask, w)
    stat = w.square() * fisher_inverse.fisher_diag().to(w.dtype)
    inf = torch.full((), float("inf"), dtype=w.dtype, device=w.device)
    low = torch.where(alive, stat, inf).min().clamp(max=0.0)
    return _alive_score(stat - low, alive).reshape(weight.shape)


@torch.no_grad()
def zero_update(*, weight: torch.Tensor, fisher_inverse: FisherInverse | None, prune: torch.Tensor,
                mask: torch.Tensor | None = None,
                scale_prune_update: float = 1.0, grad: torch.Tensor | None = None, joint: bool = False) -> torch.Tensor:
    """No compensation: pruned and already-pruned weights set to 0, the rest untouched."""
    w = weight.reshape(-1)
    dead = _flat(prune, w.numel(), "prune").to(torch.bool) | ~_alive(mask, w)
    return _finish(w, dead, weight)
