"""OBS statistic and update (WoodFisher, WoodTaylor, diagonal Fisher, group OBS) on a quadratic
model whose curvature is the explicit float64 block Fisher."""
from __future__ import annotations

import pytest
import torch

from pruning.fisher_inverse import DiagonalFisher, EmpiricalFisherInverse
from pruning.obs import (
    diagonal_fisher_statistic,
    diagonal_fisher_update,
    group_obs_statistic,
    group_obs_update,
    group_permutation,
    obs_statistic,
    obs_update,
    woodtaylor_statistic,
    woodtaylor_update,
)

DAMP = 1e-3


def setup(m: int = 6, d: int = 50, block: int | None = 20, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(m, d, generator=gen, dtype=torch.float64) * 0.3
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    inv = EmpiricalFisherInverse(G, block_size=block, damp=DAMP)
    c = d if block is None else block
    blocks = []
    for s in range(0, d, c):
        Gb = G[:, s:s + c]
        blocks.append(DAMP * torch.eye(Gb.shape[1], dtype=torch.float64) + Gb.T @ Gb / m)
    F = torch.block_diag(*blocks)
    return G, w, inv, F


def one_hot(d: int, *idx: int) -> torch.Tensor:
    t = torch.zeros(d, dtype=torch.bool)
    t[list(idx)] = True
    return t


@pytest.mark.parametrize("block", [20, 4, None])  # dual, primal (c <= m), whole layer
def test_single_pruned_weight_is_zeroed_and_loss_change_is_half_the_statistic(block):
    G, w, inv, F = setup(block=block)
    Finv = torch.linalg.inv(F)
    q = 13
    rho = obs_statistic(weight=w, fisher_inverse=inv)
    torch.testing.assert_close(rho[q], w[q] ** 2 / Finv[q, q], rtol=1e-9, atol=0)

    w_new = obs_update(weight=w, fisher_inverse=inv, prune=one_hot(50, q))
    assert w_new[q].item() == 0.0
    dw = w_new - w
    # The OBS direction itself (not only the forced zero) reaches w_q = 0: the unforced update
    # -(w_q / [F^-1]_qq) F^-1 e_q has component -w_q at q, and matches on every other coordinate.
    expect = -(w[q] / Finv[q, q]) * Finv[:, q]
    torch.testing.assert_close(expect[q], -w[q], rtol=1e-9, atol=0)
    torch.testing.assert_close(dw, expect, rtol=1e-8, atol=1e-10)
    # quadratic model: 1/2 dw^T F dw = rho_q / 2
    torch.testing.assert_close(0.5 * dw @ F @ dw, rho[q] / 2, rtol=1e-8, atol=0)
    # ... and it is the least increase among all dw with w_q + dw_q = 0 (a random competitor)
    other = dw + torch.randn(50, dtype=torch.float64) * 1e-2
    other[q] = -w[q]
    assert (0.5 * other @ F @ other) > (0.5 * dw @ F @ dw)


def test_blocks_are_independent_and_updates_add_within_a_block():
    G, w, inv, F = setup()
    Finv = torch.linalg.inv(F)
    Q = [3, 7, 25, 41, 44]  # two in block 0, one in block 1, two in the padded block 2
    w_new = obs_update(weight=w, fisher_inverse=inv, prune=one_hot(50, *Q))
    s = torch.zeros(50, dtype=torch.float64)
    s[Q] = w[Q] / Finv.diagonal()[Q]
    expect = w - Finv @ s
    expect[Q] = 0.0
    torch.testing.assert_close(w_new, expect, rtol=1e-8, atol=1e-10)


def test_scale_zero_touches_nothing_but_the_pruned_and_scale_half_halves_the_move():
    G, w, inv, F = setup()
    prune = one_hot(50, 2, 30)
    w0 = obs_update(weight=w, fisher_inverse=inv, prune=prune, scale_prune_update=0.0)
    keep = ~prune
    assert torch.equal(w0[keep], w[keep])
    assert bool((w0[prune] == 0).all())
    full = obs_update(weight=w, fisher_inverse=inv, prune=prune, scale_prune_update=1.0)
    half = obs_update(weight=w, fisher_inverse=inv, prune=prune, scale_prune_update=0.5)
    torch.testing.assert_close(half[keep] - w[keep], 0.5 * (full[keep] - w[keep]), rtol=1e-10, atol=1e-12)


def test_already_pruned_weights_stay_pruned_and_score_lowest():
    G, w, inv, F = setup()
    mask = torch.ones(50, dtype=torch.bool)
    dead = [0, 5, 21, 48]
    mask[dead] = False
    w = w.clone()
    w[dead] = 0.0
    G = G.clone()
    G[:, dead] = 0.0  # the gradient collection masks pruned coordinates
    inv = EmpiricalFisherInverse(G, block_size=20, damp=DAMP)
    w[mask & (torch.arange(50) % 7 == 0)] = 0.0  # alive weights that happen to be zero
    rho = obs_statistic(weight=w, fisher_inverse=inv, mask=mask)
    assert bool((rho[~mask] == 0).all())
    assert bool((rho[mask] > 0).all())  # strictly above pruned ones, even for w_q = 0
    assert bool((rho.abs()[mask] > rho.abs()[~mask].max()).all())  # also for a |score| selector

    w_new = obs_update(weight=w, fisher_inverse=inv, prune=one_hot(50, 10, 33), mask=mask)
    assert bool((w_new[dead] == 0).all())
    # prune asks again for an already-pruned weight: it stays 0 and moves nothing
    again = obs_update(weight=w, fisher_inverse=inv, prune=one_hot(50, 5), mask=mask)
    torch.testing.assert_close(again, w, rtol=0, atol=0)


def test_selector_never_revives_a_pruned_weight():
    selector = pytest.importorskip("layers.selector")
    G, w, inv, F = setup()
    mask = torch.rand(50, generator=torch.Generator().manual_seed(3)) > 0.4
    w = torch.where(mask, w, torch.zeros_like(w))
    w[mask.nonzero()[0]] = 0.0  # an alive weight at exactly zero still beats the pruned
    rho = obs_statistic(weight=w, fisher_inverse=inv, mask=mask)
    alive = int(mask.sum())
    for scope in ("global", "layer"):
        keep = selector.select_masks([rho.view(5, 10)], k=alive / 50, granularity="unstructured", scope=scope)[0]
        assert not bool((keep.reshape(-1) & ~mask).any())


@pytest.mark.parametrize("block", [20, None])
def test_woodtaylor_matches_the_constrained_minimiser_with_gradient(block):
    G, w, inv, F = setup(block=block)
    g = G.mean(0)
    Finv = torch.linalg.inv(F)
    q = 17
    rho = woodtaylor_statistic(weight=w, fisher_inverse=inv, grad=g)
    a = Finv @ g
    torch.testing.assert_close(rho[q], (w[q] - a[q]) ** 2 / Finv[q, q], rtol=1e-8, atol=0)

    w_new = woodtaylor_update(weight=w, fisher_inverse=inv, prune=one_hot(50, q), grad=g)
    dw = w_new - w
    # KKT of  min g^T dw + 1/2 dw^T F dw  s.t.  e_q^T dw = -w_q
    K = torch.zeros(51, 51, dtype=torch.float64)
    K[:50, :50], K[:50, 50], K[50, :50] = F, 0, 0
    K[q, 50] = K[50, q] = 1.0
    rhs = torch.cat([-g, -w[q:q + 1]])
    exact = torch.linalg.solve(K, rhs)[:50]
    torch.testing.assert_close(dw, exact, rtol=1e-7, atol=1e-9)
    change = g @ dw + 0.5 * dw @ F @ dw
    torch.testing.assert_close(change, rho[q] / 2 - 0.5 * g @ a, rtol=1e-7, atol=1e-12)


def test_woodtaylor_with_zero_gradient_is_woodfisher():
    G, w, inv, F = setup()
    zero = torch.zeros(50, dtype=torch.float64)
    prune = one_hot(50, 4, 26)
    torch.testing.assert_close(woodtaylor_statistic(weight=w, fisher_inverse=inv, grad=zero),
                               obs_statistic(weight=w, fisher_inverse=inv))
    torch.testing.assert_close(woodtaylor_update(weight=w, fisher_inverse=inv, prune=prune, grad=zero),
                               obs_update(weight=w, fisher_inverse=inv, prune=prune))
    with pytest.raises(ValueError, match="grad"):
        woodtaylor_statistic(weight=w, fisher_inverse=inv)


def test_diagonal_fisher_baseline():
    G, w, inv, F = setup()
    diag = DiagonalFisher(G, damp=DAMP)
    fqq = DAMP + G.square().mean(0)
    torch.testing.assert_close(diagonal_fisher_statistic(weight=w, fisher_inverse=diag), w ** 2 * fqq)
    # works from the full inverse object too (same F_qq)
    torch.testing.assert_close(diagonal_fisher_statistic(weight=w, fisher_inverse=inv), w ** 2 * fqq)
    # the generic OBS update with a diagonal F moves nothing but the pruned weight: same result
    prune = one_hot(50, 1, 2, 40)
    a = diagonal_fisher_update(weight=w, fisher_inverse=diag, prune=prune)
    b = obs_update(weight=w, fisher_inverse=diag, prune=prune)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert torch.equal(a[~prune], w[~prune]) and bool((a[prune] == 0).all())


def test_weight_shape_is_preserved():
    G, w, inv, F = setup()
    W = w.view(5, 10)
    assert obs_statistic(weight=W, fisher_inverse=inv).shape == (5, 10)
    assert obs_update(weight=W, fisher_inverse=inv, prune=one_hot(50, 3).view(5, 10)).shape == (5, 10)


# ---- group OBS ----


@pytest.mark.parametrize("block", [None, 864])  # dual: 256 x 256 Woodbury systems; primal: 288 x 288 blocks
def test_group_obs_of_large_groups_at_two_threads(block):
    """The sizes where batched float64 LU (torch.linalg.solve) failed on the pinned stack at 2 threads
    (oneMKL DLASWP errors, then minutes of spinning): 256 rows, groups of 288 (a 32x3x3 filter); the
    Cholesky solves give the float64 reference."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        G, w, inv, F = setup(m=256, d=4 * 288, block=block)
        stat = group_obs_statistic(weight=w, fisher_inverse=inv, group_size=288)
    finally:
        torch.set_num_threads(before)
    Finv = torch.linalg.inv(F)
    expect = torch.stack([w[q:q + 288] @ torch.linalg.solve(Finv[q:q + 288, q:q + 288], w[q:q + 288])
                          for q in range(0, 4 * 288, 288)])
    torch.testing.assert_close(stat, expect, rtol=1e-7, atol=0)


@pytest.mark.parametrize("block,g", [(20, 10), (None, 10), (12, 4)])  # dual g > m, whole layer, primal
def test_group_obs_single_group(block, g):
    G, w, inv, F = setup(m=6, d=60, block=block)
    Finv = torch.linalg.inv(F)
    n_groups = 60 // g
    stat = group_obs_statistic(weight=w, fisher_inverse=inv, group_size=g)
    assert stat.shape == (n_groups,)
    Q = slice(2 * g, 3 * g)
    expect = w[Q] @ torch.linalg.solve(Finv[Q, Q], w[Q])
    torch.testing.assert_close(stat[2], expect, rtol=1e-8, atol=0)

    prune = torch.zeros(n_groups, dtype=torch.bool)
    prune[2] = True
    w_new = group_obs_update(weight=w, fisher_inverse=inv, group_size=g, prune=prune)
    dw = w_new - w
    unforced = -Finv[:, Q] @ torch.linalg.solve(Finv[Q, Q], w[Q])
    torch.testing.assert_close(unforced[Q], -w[Q], rtol=1e-7, atol=1e-9)  # the update itself zeroes Q
    torch.testing.assert_close(dw, unforced, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(0.5 * dw @ F @ dw, stat[2] / 2, rtol=1e-7, atol=0)


def test_group_obs_keeps_pruned_groups_and_channel_permutation():
    shape = (4, 3, 2, 2)  # conv: 4 filters, 3 input channels
    perm, g = group_permutation(shape=shape, granularity="channel")
    assert g == 16
    W = torch.randn(shape, dtype=torch.float64)
    # channel c's weights are contiguous after the permutation
    assert torch.equal(W.flatten()[perm][16:32], W[:, 1].flatten())
    gen = torch.Generator().manual_seed(4)
    G = torch.randn(6, 48, generator=gen, dtype=torch.float64)[:, perm]
    inv = EmpiricalFisherInverse(G, block_size=None, damp=DAMP)
    mask = torch.tensor([True, False, True])
    wp = W.flatten()[perm].clone()
    wp[16:32] = 0
    stat = group_obs_statistic(weight=wp, fisher_inverse=inv, group_size=g, mask=mask)
    assert stat[1] == 0 and bool((stat[mask] > 0).all())
    new = group_obs_update(weight=wp, fisher_inverse=inv, group_size=g, prune=torch.tensor([True, False, False]), mask=mask)
    assert bool((new[:32] == 0).all()) and bool((new[32:] != wp[32:]).any())
    back = torch.empty_like(new)
    back[perm] = new
    assert bool((back.view(shape)[:, :2] == 0).all())
    assert group_permutation(shape=shape, granularity="filter") == (None, 12)


def test_parameters_are_read_not_modified_and_no_graph_is_built():
    G, w, inv, F = setup()
    p = torch.nn.Parameter(w.clone())
    rho = obs_statistic(weight=p, fisher_inverse=inv)
    new = obs_update(weight=p, fisher_inverse=inv, prune=one_hot(50, 8))
    assert not rho.requires_grad and not new.requires_grad
    assert torch.equal(p.detach(), w) and new[8] == 0


# -- joint OBS for a set: against the fp64 brute-force constrained minimiser ----------------------
def brute_force_joint(F, w, Q, g=None):
    """argmin g^T dw + 1/2 dw^T F dw subject to w_Q + dw_Q = 0, by the KKT system in float64."""
    d = w.numel()
    g = torch.zeros(d, dtype=torch.float64) if g is None else g
    E = torch.zeros(d, len(Q), dtype=torch.float64)
    E[Q, torch.arange(len(Q))] = 1.0
    kkt = torch.cat([torch.cat([F, E], 1), torch.cat([E.T, torch.zeros(len(Q), len(Q), dtype=torch.float64)], 1)], 0)
    rhs = torch.cat([-g, -w[Q]])
    return torch.linalg.solve(kkt, rhs)[:d]


@pytest.mark.parametrize("block", [20, 4, None])  # dual, primal, whole vector (dual)
@pytest.mark.parametrize("n_pruned", [1, 3, 17])
def test_joint_update_is_the_exact_constrained_optimum(block, n_pruned):
    G, w, inv, F = setup(block=block)
    Q = torch.randperm(50, generator=torch.Generator().manual_seed(n_pruned))[:n_pruned].sort().values.tolist()
    prune = one_hot(50, *Q)
    dw = brute_force_joint(F, w, Q)
    w_joint = obs_update(weight=w, fisher_inverse=inv, prune=prune, joint=True)
    torch.testing.assert_close(w_joint - w, dw, rtol=1e-7, atol=1e-9)
    # it removes Q by itself (the final zeroing only cleans round-off) ...
    assert float((w - inv.mul(inv.solve_pruned(w, prune)))[Q].abs().max()) < 1e-8
    # ... and never leaves a larger quadratic loss than the sum of single-weight updates
    w_sum = obs_update(weight=w, fisher_inverse=inv, prune=prune, joint=False)
    loss = lambda v: float(0.5 * (v - w) @ F @ (v - w))  # noqa: E731
    assert loss(w_joint) <= loss(w_sum) + 1e-12
    if n_pruned == 1:  # one weight: joint and sum are the same update
        torch.testing.assert_close(w_joint, w_sum, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("block", [20, 4])
def test_woodtaylor_joint_is_the_exact_constrained_optimum_with_gradient(block):
    G, w, inv, F = setup(block=block)
    g = G.mean(0)
    Q = [1, 2, 8, 22, 23, 40]
    dw = brute_force_joint(F, w, Q, g=g)
    w_new = woodtaylor_update(weight=w, fisher_inverse=inv, prune=one_hot(50, *Q), grad=g, joint=True)
    torch.testing.assert_close(w_new - w, dw, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("block,g", [(20, 5), (10, 5), (None, 10)])
def test_group_joint_update_removes_several_groups_at_the_optimum(block, g):
    G, w, inv, F = setup(block=block)
    groups = torch.tensor([True, False, True, False, False, True, False, False, False, False])[: 50 // g]
    Q = torch.arange(50).view(-1, g)[groups].flatten().tolist()
    dw = brute_force_joint(F, w, Q)
    w_new = group_obs_update(weight=w, fisher_inverse=inv, group_size=g, prune=groups, joint=True)
    torch.testing.assert_close(w_new - w, dw, rtol=1e-7, atol=1e-9)
    summed = group_obs_update(weight=w, fisher_inverse=inv, group_size=g, prune=groups, joint=False)
    loss = lambda v: float(0.5 * (v - w) @ F @ (v - w))  # noqa: E731
    assert loss(w_new) <= loss(summed) + 1e-12
