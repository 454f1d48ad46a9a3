"""WoodFisher's second-order baselines: ``naivehess`` (OBD with the exact Hessian diagonal, pruning/hessian.py)
and ``kfac`` (blockwise K-FAC in the OBS statistic and update, group OBS for filters/channels, pruning/kfac.py),
against float64 hand computations and explicit matrices, through the solver, the WoodFisher trainer and
train.py."""
import os
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from configs.errors import UserError
from configs.options import WoodFisherOptions
from layers import MaskSet, n_keep, to_masked
from pruning.hessian import hessian_diagonal, rademacher_probes
from pruning.kfac import KFACFactors, KroneckerInverse, kfac_factors
from pruning.methods import PRUNE_METHODS
from pruning.obs import group_permutation, naivehess_statistic
from pruning.solver import FisherSettings, OBSSolver
from tests.helpers import tiny
from tests.helpers.tiny import tiny_net
from tests.test_criteria import kept_units, trainer
from trainers.base import RunSpec
from trainers.woodfisher import plan

CPU = torch.device("cpu")
tiny_loaders = partial(tiny.tiny_loaders, 48, batch_size=8)


def data(n=12, *, seed=0, classes=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def conv_net(seed=0, *, bias=False):
    """tiny_net's two convs and classifier, masked, float64, a few weights pruned (mask False, weight 0)."""
    model = tiny_net("unstructured", convs=2, seed=seed, bias=bias).double().eval()
    ms = MaskSet(model, k=0.5, granularity="unstructured", scope="layer")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in ms.layers.values():
            layer.mask.copy_(torch.rand(layer.weight.shape, generator=g) > 0.2)
            layer.weight.mul_(layer.mask)
    return model, ms


class MLP(nn.Sequential):
    def __init__(self, seed=0, bias=True):
        torch.manual_seed(seed)
        super().__init__(nn.Flatten(), nn.Linear(16, 5, bias=bias), nn.Tanh(), nn.Linear(5, 6, bias=bias))


def mlp(seed=0, *, bias=True):
    model = MLP(seed, bias=bias).double().eval()
    to_masked(model, granularity="unstructured")
    ms = MaskSet(model, k=0.5, granularity="unstructured", scope="layer")
    ms.set_masks({n: torch.ones_like(layer.mask) for n, layer in ms.layers.items()})
    return model, ms


# -- naivehess ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [conv_net, mlp])
def test_the_hessian_diagonal_is_that_of_autograds_full_hessian(build):
    """H_qq of each layer's weight against torch.autograd.functional.hessian of the same mean cross-entropy
    (float64, eval mode); pruned weights 0."""
    model, ms = build()
    x, y = data()
    got = hessian_diagonal(model, ms.layers, [(x[:5], y[:5]), (x[5:], y[5:])], samples=10, device=CPU)
    x, y = x[:10], y[:10]
    for name, layer in ms.layers.items():
        key = f"{name}.weight"

        def loss(w, key=key):
            return F.cross_entropy(functional_call(model, {key: w}, (x,)), y)

        w = layer.weight.detach().clone()
        full = torch.autograd.functional.hessian(loss, w).reshape(w.numel(), w.numel())
        want = full.diagonal() * layer.mask.reshape(-1)
        assert torch.allclose(got[name].reshape(-1), want, rtol=1e-10, atol=1e-13), name
        assert full.diagonal().abs().max() > 0 and not got[name][~layer.mask].any()


@pytest.mark.parametrize("build", [conv_net, mlp])
def test_hutchinson_is_the_mean_of_z_times_hz_with_the_joint_hessian_and_nears_its_diagonal(build):
    """--hessian-probes P: the estimate is exactly mean_p z_p * (H z_p) with H the full Hessian of all layers'
    weights jointly (float64, explicit, torch.autograd.functional.hessian) and the probes of seed 0; 0 at pruned
    weights; and with P = 400 its error is within 3x of its standard deviation, sum_{j != q} H_qj^2 / P."""
    model, ms = build()
    if build is mlp:  # prune a third of each layer (conv_net comes with pruned weights)
        with torch.no_grad():
            for layer in ms.layers.values():
                keep = (torch.arange(layer.mask.numel()) % 3 != 0).reshape(layer.mask.shape)
                layer.mask.copy_(keep)
                layer.weight.mul_(layer.mask)
    x, y = data()
    names, layers = list(ms.layers), list(ms.layers.values())
    sizes = [layer.weight.numel() for layer in layers]

    def loss(flat):
        ws = {f"{n}.weight": p.reshape(layer.weight.shape)
              for n, layer, p in zip(names, layers, flat.split(sizes))}
        return F.cross_entropy(functional_call(model, ws, (x,)), y)

    flat = torch.cat([layer.weight.detach().reshape(-1) for layer in layers])
    H = torch.autograd.functional.hessian(loss, flat)
    mask = torch.cat([layer.mask.reshape(-1) for layer in layers]).to(H.dtype)
    H = H * mask[:, None] * mask[None, :]  # a pruned weight is not read: masked layers compute with w * m
    for probes in (3, 400):
        got = hessian_diagonal(model, ms.layers, [(x, y)], samples=12, device=CPU, probes=probes)
        got = torch.cat([got[n].reshape(-1) for n in names])
        generator = torch.Generator().manual_seed(0)
        want = torch.zeros_like(flat)
        for _ in range(probes):
            z = torch.cat([p.reshape(-1) for p in rademacher_probes(layers, generator=generator)])
            want += z * (H @ z)
        want /= probes
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), probes
        assert not got[mask == 0].any()
    off = H - torch.diag(H.diagonal())
    variance = float(off.square().sum()) / probes
    assert float((got - H.diagonal()).square().sum()) < 9 * variance


def test_hessian_probes_refuse_a_method_without_a_hessian_with_one_line():
    with pytest.raises(UserError, match="--hessian-probes estimates the Hessian diagonal of --prune-method "
                                        "naivehess, and woodfisher reads none") as e:
        plan(WoodFisherOptions(prune_method="woodfisher", prune_end=1, hessian_probes=4),
             run=RunSpec(mode="prune", layer_type="unstructured", k=0.5, scope="global", epochs=2))
    assert "\n" not in str(e.value)


class Diag:
    def __init__(self, h):
        self.h = h

    def fisher_diag(self):
        return self.h


def test_naivehess_statistic_is_obd_signed_and_shifted_like_the_reference():
    """w^2 H_qq; with a negative value, every alive one shifted by the smallest (the signed order kept, the
    most negative lowest but above the pruned weight's 0)."""
    w = torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0], dtype=torch.float64)
    mask = torch.tensor([True, True, True, True, False])
    positive = torch.tensor([1.0, 0.5, 0.1, 2.0, 9.0], dtype=torch.float64)
    assert torch.equal(naivehess_statistic(weight=w, fisher_inverse=Diag(positive), mask=mask),
                       torch.tensor([1.0, 2.0, 0.9, 0.5, 0.0], dtype=torch.float64))
    h = torch.tensor([1.0, -0.5, 0.1, 2.0, 9.0], dtype=torch.float64)
    stat = naivehess_statistic(weight=w, fisher_inverse=Diag(h), mask=mask)
    raw = torch.tensor([1.0, -2.0, 0.9, 0.5])
    assert torch.allclose(stat[:4], (raw + 2.0).double().clamp_min(torch.finfo(torch.float64).tiny))
    assert stat[4] == 0 and 0 < stat[1] < stat[3] < stat[2] < stat[0]


def test_naivehess_through_the_solver_keeps_the_largest_obd_per_layer_and_moves_nothing():
    model, ms = conv_net()
    x, y = data(16)
    h = hessian_diagonal(model, ms.layers, [(x, y)], samples=16, device=CPU)
    before = {n: layer.weight.detach().clone() for n, layer in ms.layers.items()}
    solver = OBSSolver(ms.layers, granularity="unstructured", method=PRUNE_METHODS["naivehess"])
    solver.probe(model, [(x, y)], samples=16)
    masks = solver.prune_to(0.4, scope="layer")
    for name, layer in ms.layers.items():
        stat = naivehess_statistic(weight=before[name], fisher_inverse=Diag(h[name].reshape(-1)), mask=layer.mask)
        n = stat.numel()
        keep = torch.zeros(n, dtype=torch.bool)
        keep[stat.reshape(-1).topk(n_keep(0.4, n)).indices] = True
        assert torch.equal(masks[name].reshape(-1), keep), name
        assert torch.equal(layer.weight.detach(), before[name] * masks[name])
    assert solver.record.solve == "none"


# -- kfac: the factors ---------------------------------------------------------------------------------------
def per_sample_output_grads(model, layer, x, y):
    """dl_n/dy for each sample n alone (its own forward and cross-entropy), and the layer's input."""
    ins, outs, grads = [], [], []
    def keep(module, args, output):
        ins.append(args[0].detach())
        outs.append(output)

    handle = layer.register_forward_hook(keep)
    try:
        for n in range(len(y)):
            ins.clear()
            outs.clear()
            loss = F.cross_entropy(model(x[n:n + 1]), y[n:n + 1])
            grads.append((ins[0][0], torch.autograd.grad(loss, outs[0])[0][0]))
    finally:
        handle.remove()
    return grads


def conv_patches_by_hand(layer, a):
    """The conv's input patches at every output position, by explicit padding and slicing: (L, C*kh*kw)."""
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    padded = F.pad(a, (pw, pw, ph, ph))
    rows = []
    for i in range(0, padded.shape[1] - kh + 1, sh):
        for j in range(0, padded.shape[2] - kw + 1, sw):
            rows.append(padded[:, i:i + kh, j:j + kw].reshape(-1))
    return torch.stack(rows)


def factors_by_hand(model, layer, x, y):
    A = torch.zeros(layer.weight[0].numel(), layer.weight[0].numel(), dtype=torch.float64)
    G = torch.zeros(layer.weight.shape[0], layer.weight.shape[0], dtype=torch.float64)
    for a, g in per_sample_output_grads(model, layer, x, y):
        if isinstance(layer, nn.Conv2d):
            patches, outs = conv_patches_by_hand(layer, a), g.reshape(g.shape[0], -1).T  # (L, in), (L, out)
            S = outs.shape[0]
            assert patches.shape[0] == S
            for t in range(S):
                A += torch.outer(patches[t], patches[t]) / S**2
                G += torch.outer(outs[t], outs[t]) * S**2
        else:
            A += torch.outer(a, a)
            G += torch.outer(g, g)
    return A / len(y), G / len(y)


@pytest.mark.parametrize("build", [conv_net, mlp])
def test_kfac_factors_are_the_hand_computed_input_and_output_gradient_second_moments(build):
    """Linear: A = E[a a^T], G = E[g g^T], g = dl_n/dy of each sample's own loss; conv: over the unfolded
    patches and output positions, A with 1/S^2 and G with S^2 (the reference's split); the bias adds no ones
    column (weights only)."""
    model, ms = build()
    x, y = data(10)
    got = kfac_factors(model, ms.layers, [(x[:3], y[:3]), (x[3:], y[3:])], samples=10, device=CPU)
    for name, layer in ms.layers.items():
        A, G = factors_by_hand(model, layer, x, y)
        assert torch.allclose(got[name].A, A, rtol=1e-10, atol=1e-14), name
        assert torch.allclose(got[name].G, G, rtol=1e-10, atol=1e-14), name


def test_kfac_is_the_exact_fisher_block_of_one_sample_of_a_linear_layer():
    """With one sample and one position, vec(g a^T) vec(g a^T)^T = (g g^T) (x) (a a^T): the factors' Kronecker
    product is the per-sample Fisher block exactly (row-major weight order)."""
    model, ms = mlp(bias=False)
    x, y = data(1)
    f = kfac_factors(model, ms.layers, [(x, y)], samples=1, device=CPU)
    for name, layer in ms.layers.items():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        gw = layer.weight.grad.reshape(-1)
        assert torch.allclose(torch.kron(f[name].G, f[name].A), torch.outer(gw, gw), rtol=1e-10, atol=1e-14)


# -- kfac: statistic and update against the explicit Kronecker inverse -------------------------------------
@pytest.mark.parametrize("build", [conv_net, mlp])
def test_kfac_statistic_and_summed_update_match_the_explicit_kronecker_inverse(build):
    damp = 1e-3
    model, ms = build()
    x, y = data(12)
    f = kfac_factors(model, ms.layers, [(x, y)], samples=12, device=CPU)
    before = {n: layer.weight.detach().clone() for n, layer in ms.layers.items()}
    alive = {n: layer.mask.clone() for n, layer in ms.layers.items()}
    solver = OBSSolver(ms.layers, granularity="unstructured", method=PRUNE_METHODS["kfac"],
                       fisher=FisherSettings(m=12, damp=damp))
    solver.probe(model, [(x, y)], samples=12)
    scores = solver.scores()
    masks = solver.prune_to(0.4, scope="layer", joint=True)
    assert solver.record.solve == "sum" and "kfac has no joint solve: sum of single updates" in solver.record.notes
    shift = damp ** 0.5
    for name, layer in ms.layers.items():
        A = f[name].A + shift * torch.eye(f[name].A.shape[0], dtype=torch.float64)
        G = f[name].G + shift * torch.eye(f[name].G.shape[0], dtype=torch.float64)
        Finv = torch.linalg.inv(torch.kron(G, A))  # the explicit (out*in)^2 inverse of the damped block
        w, a = before[name].reshape(-1), alive[name].reshape(-1)
        stat = torch.where(a, w.square() / Finv.diagonal(), torch.zeros((), dtype=torch.float64))
        assert torch.allclose(scores[name].reshape(-1), stat, rtol=1e-9, atol=1e-300), name
        pruned = a & ~masks[name].reshape(-1)
        assert int(masks[name].sum()) == n_keep(0.4, w.numel())
        s = torch.where(pruned, w / Finv.diagonal(), torch.zeros((), dtype=torch.float64))
        want = (w - Finv @ s) * masks[name].reshape(-1)
        assert torch.allclose(layer.weight.detach().reshape(-1), want, rtol=1e-9, atol=1e-12), name
        moved = masks[name].reshape(-1) & (want != w)
        assert moved.any()  # the update compensates: survivors move


# -- kfac: filters and channels (group OBS) against the explicit Kronecker inverse -------------------------
def random_kronecker(weight_shape, *, damp=1e-2, seed=0):
    """A KroneckerInverse of random positive semi-definite factors (rank-deficient, so damping matters), and
    the explicit damped F = (G + sqrt(lambda) I) (x) (A + sqrt(lambda) I) with its inverse, float64."""
    g = torch.Generator().manual_seed(seed)
    out, fan_in = weight_shape[0], torch.Size(weight_shape[1:]).numel()
    a = torch.randn(fan_in, max(1, fan_in - 2), generator=g, dtype=torch.float64)
    b = torch.randn(out, max(1, out - 1), generator=g, dtype=torch.float64)
    factors = KFACFactors(A=a @ a.T / fan_in, G=b @ b.T / out)
    shift = damp ** 0.5
    F_full = torch.kron(factors.G + shift * torch.eye(out, dtype=torch.float64),
                        factors.A + shift * torch.eye(fan_in, dtype=torch.float64))
    return KroneckerInverse(factors, damp=damp, weight_shape=weight_shape), F_full, torch.linalg.inv(F_full)


def explicit_group_solve(Finv, w, groups):
    """u_Q = ([F^-1]_QQ)^-1 w_Q for every group Q (natural indices), as one natural-order vector."""
    u = torch.zeros_like(w)
    for Q in groups:
        u[Q] = torch.linalg.solve(Finv[Q][:, Q], w[Q])
    return u


def explicit_joint_move(Finv, w, Q):
    """F^-1[:, Q] ([F^-1]_QQ)^-1 w_Q."""
    return Finv[:, Q] @ torch.linalg.solve(Finv[Q][:, Q], w[Q])


SHAPES = [(4, 3, 2, 2), (5, 6)]  # a conv (out, C, kh, kw) and a Linear (out, in): a channel is one column


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("granularity", ["filter", "channel"])
@pytest.mark.parametrize("pruned", ["some", "none", "all"])
def test_kfac_group_solve_and_joint_move_match_the_explicit_kronecker_inverse(shape, granularity, pruned):
    """Per filter/channel Q: ([F^-1]_QQ)^-1 w_Q and, for the union Q of the pruned ones, the joint move
    F^-1[:, Q] ([F^-1]_QQ)^-1 w_Q, against the explicit (out*in)^2 inverse; the move is the constrained optimum
    (w - move is 0 on Q and F (w - move - w) vanishes off Q: the KKT conditions of min dw^T F dw, dw_Q = -w_Q).
    In channel order the inverse's diag, fisher_diag and mul are the natural ones permuted."""
    inv, F_full, Finv = random_kronecker(shape)
    n = F_full.shape[0]
    w = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    perm, size = group_permutation(shape=shape, granularity=granularity)
    order = torch.arange(n) if perm is None else perm
    view = inv if perm is None else inv.permuted(perm)
    groups = [order[i * size:(i + 1) * size] for i in range(n // size)]
    got = view.group_solve(w[order], group_size=size)
    assert torch.allclose(got, explicit_group_solve(Finv, w, groups)[order], rtol=1e-9, atol=1e-12)
    prune = {"some": torch.arange(len(groups)) % 2 == 0, "none": torch.zeros(len(groups), dtype=torch.bool),
             "all": torch.ones(len(groups), dtype=torch.bool)}[pruned]
    Q = torch.cat([groups[i] for i in range(len(groups)) if prune[i]] + [torch.zeros(0, dtype=torch.long)])
    move = view.group_pruned_mul(w[order], prune, group_size=size)
    want = explicit_joint_move(Finv, w, Q) if len(Q) else torch.zeros(n, dtype=torch.float64)
    assert torch.allclose(move, want[order], rtol=1e-9, atol=1e-12)
    dw = torch.empty_like(w)
    dw[order] = -move
    R = torch.ones(n, dtype=torch.bool)
    R[Q] = False
    assert torch.allclose(dw[Q], -w[Q], rtol=1e-12, atol=1e-12)
    assert torch.allclose((F_full @ dw)[R], torch.zeros(int(R.sum()), dtype=torch.float64), atol=1e-10)
    assert not bool(view.failed())
    v = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.allclose(view.diag(), Finv.diagonal()[order], rtol=1e-9)
    assert torch.allclose(view.fisher_diag(), F_full.diagonal()[order], rtol=1e-12)
    assert torch.allclose(view.mul(v[order]), (Finv @ v)[order], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 4, 2, 2), (5, 6)])
def test_kfac_units_of_several_channels_in_a_coupled_order_match_the_explicit_inverse(shape):
    """A coupled run's order (``OBSSolver._unit_permutation``): channels shuffled, two per unit, each unit's
    weights contiguous; the unit is the union of its channels' columns."""
    inv, F_full, Finv = random_kronecker(shape, seed=1)
    n, channels = F_full.shape[0], shape[1]
    index = torch.arange(n).view(shape).transpose(0, 1).reshape(channels, -1)
    channel_order = torch.randperm(channels, generator=torch.Generator().manual_seed(5))
    perm = index[channel_order].reshape(-1)
    size = 2 * n // channels
    groups = [perm[i * size:(i + 1) * size] for i in range(channels // 2)]
    view = inv.permuted(perm)
    w = torch.randn(n, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = view.group_solve(w[perm], group_size=size)
    assert torch.allclose(got, explicit_group_solve(Finv, w, groups)[perm], rtol=1e-9, atol=1e-12)
    prune = torch.tensor([True] + [False] * (len(groups) - 1))
    move = view.group_pruned_mul(w[perm], prune, group_size=size)
    assert torch.allclose(move, explicit_joint_move(Finv, w, groups[0])[perm], rtol=1e-9, atol=1e-12)
    assert torch.allclose(view.diag(), Finv.diagonal()[perm], rtol=1e-9)


def test_kfac_group_orders_are_refused_where_they_do_not_hold():
    inv, _, _ = random_kronecker((4, 3, 2, 2))
    w = torch.zeros(48, dtype=torch.float64)
    with pytest.raises(ValueError, match="groups whole filters"):
        inv.group_solve(w, group_size=16)
    perm, size = group_permutation(shape=(4, 3, 2, 2), granularity="channel")
    with pytest.raises(ValueError, match="groups whole channels"):
        inv.permuted(perm).group_solve(w, group_size=12)
    with pytest.raises(ValueError, match="no joint solve for single weights"):
        inv.permuted(perm).pruned_mul(w, torch.ones(48, dtype=torch.bool))


@pytest.mark.parametrize("granularity", ["filter", "channel"])
@pytest.mark.parametrize("joint", [True, False])
def test_kfac_filters_and_channels_through_the_solver_match_the_explicit_group_obs(granularity, joint):
    """One solver step with filter/channel masks: each conv is scored by w_Q^T ([F^-1]_QQ)^-1 w_Q, keeps
    exactly n_keep(0.5) units, and moves as the explicit joint (or summed) group OBS update says."""
    damp = 1e-3
    model = tiny_net(granularity, convs=2).double().eval()
    ms = MaskSet(model, k=1.0, granularity=granularity, scope="layer")
    x, y = data(12)
    f = kfac_factors(model, ms.layers, [(x, y)], samples=12, device=CPU)
    before = {n: layer.weight.detach().clone() for n, layer in ms.layers.items()}
    solver = OBSSolver(ms.layers, granularity=granularity, method=PRUNE_METHODS["kfac"],
                       fisher=FisherSettings(m=12, damp=damp))
    solver.probe(model, [(x, y)], samples=12)
    scores = solver.scores()
    masks = solver.prune_to(0.5, scope="layer", joint=joint)
    assert solver.record.solve == ("joint" if joint else "sum") and not solver.record.notes
    shift = damp ** 0.5
    for name, layer in ms.layers.items():
        A = f[name].A + shift * torch.eye(f[name].A.shape[0], dtype=torch.float64)
        G = f[name].G + shift * torch.eye(f[name].G.shape[0], dtype=torch.float64)
        Finv = torch.linalg.inv(torch.kron(G, A))
        shape = layer.weight.shape
        w = before[name].reshape(-1)
        perm, size = group_permutation(shape=shape, granularity=granularity)
        order = torch.arange(w.numel()) if perm is None else perm
        groups = [order[i * size:(i + 1) * size] for i in range(w.numel() // size)]
        u = explicit_group_solve(Finv, w, groups)
        stat = torch.stack([w[Q] @ u[Q] for Q in groups])
        got_scores = torch.stack([scores[name].reshape(-1)[Q].norm() for Q in groups])
        assert torch.allclose(got_scores, stat.sqrt(), rtol=1e-9), name  # a unit's L2 norm is sqrt(statistic)
        kept = torch.stack([masks[name].reshape(-1)[Q].all() for Q in groups])
        assert int(kept.sum()) == n_keep(0.5, len(groups))
        assert set(torch.topk(stat, int(kept.sum())).indices.tolist()) == set(kept.nonzero().reshape(-1).tolist())
        Q = torch.cat([groups[i] for i in range(len(groups)) if not kept[i]] + [torch.zeros(0, dtype=torch.long)])
        if joint:
            want = w - explicit_joint_move(Finv, w, Q) if len(Q) else w
        else:
            s = torch.zeros_like(w)
            s[Q] = u[Q]
            want = w - Finv @ s
        want = want * masks[name].reshape(-1)
        assert torch.allclose(layer.weight.detach().reshape(-1), want, rtol=1e-9, atol=1e-12), name
        assert (masks[name].reshape(-1) & (want != w)).any() == bool(len(Q))  # survivors move when units go
    assert solver.record.pruned > 0


# -- granularities and refusals --------------------------------------------------------------------------------
def test_granularities():
    assert PRUNE_METHODS["naivehess"].granularities == ("unstructured", "filter", "channel", "nm")
    assert PRUNE_METHODS["kfac"].granularities == ("unstructured", "filter", "channel", "nm")
    assert [PRUNE_METHODS["kfac"].joint_update(g) for g in ("unstructured", "filter", "channel", "nm")] == \
        [False, True, True, False]
    assert PRUNE_METHODS["kfac"].compensates and not PRUNE_METHODS["naivehess"].compensates
    assert PRUNE_METHODS["kfac"].reads_samples and PRUNE_METHODS["naivehess"].reads_samples


def test_kfac_refuses_a_grouped_conv_with_the_exclude_layers_hint():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 3)).double()
    to_masked(model, granularity="unstructured")
    ms = MaskSet(model, k=0.5, granularity="unstructured", scope="layer")
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(UserError, match="keep such layers dense with --exclude-layers 0$") as e:
        kfac_factors(model, ms.layers, [(x, torch.zeros(4, dtype=torch.long))], samples=4, device=CPU)
    assert "\n" not in str(e.value)


# -- through the trainer ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,granularity", [("naivehess", "unstructured"), ("naivehess", "filter"),
                                                ("naivehess", "channel"), ("kfac", "unstructured"),
                                                ("kfac", "filter"), ("kfac", "channel"),
                                                ("apoz", "filter"), ("meanact", "filter")])
def test_exact_per_layer_counts_after_each_event(method, granularity):
    model = tiny_net(granularity, convs=2)
    ms = MaskSet(model, k=0.3, granularity=granularity, scope="layer")
    t = trainer(model, ms, method, fisher_subsample_size=4, fisher_mini_bsz=2)
    loaders = tiny_loaders()
    units = ms.unit_counts()
    events = {e.epoch: e.sparsity for e in t.events}
    for epoch in range(4):
        t.set_epoch(epoch)
        t.prune_to(events[epoch], epoch=epoch, loaders=loaders)
        density = 0.3 if epoch == 3 else 1 - events[epoch]
        kept = [int((layer.mask if granularity == "unstructured" else kept_units(layer, granularity)).sum())
                for layer in ms.layers.values()]
        assert kept == [n_keep(density, u) for u in units], epoch
        for layer in ms.layers.values():
            assert not layer.weight[~layer.mask].any()
            if granularity == "filter":  # whole filters: a filter is kept entirely or not at all
                assert torch.equal(layer.mask.flatten(1).all(1), kept_units(layer, granularity))
    assert t.pop_notes()[-1].startswith(f"prune epoch 3 step 1/1: {method} (layer")


# -- train.py end to end: one event on the Digits config -------------------------------------------------------
@pytest.mark.parametrize("method", ["naivehess", "naivehess-probes", "kfac", "kfac-filter"])
def test_cli_digits_one_event_reaches_the_exact_count(tmp_path, method):
    from engine.checkpoint import load_checkpoint
    from models import build_model
    from tests.helpers.cli import run_ok

    torch.manual_seed(0)
    source = tmp_path / "dense.pth"
    torch.save(build_model("smallcnn", num_classes=10, in_channels=1).state_dict(), source)
    # naivehess costs one backward pass per weight: only fc2 (1,280 weights) is masked here
    # (Hutchinson's estimate, --hessian-probes, costs one Hessian-vector product per probe: every layer is masked)
    per_layer = ["--scope", "layer", "--no-woodbury-joint-sparsify"]
    extra = {"naivehess": ["--exclude-layers", "conv1,conv2,conv3,fc1", *per_layer],
             "naivehess-probes": ["--hessian-probes", "4", *per_layer],
             "kfac-filter": ["--layer-type", "filter", *per_layer]}.get(method, [])
    probes, filters = method.endswith("-probes"), method.endswith("-filter")
    method = method.removesuffix("-probes").removesuffix("-filter")
    run = run_ok(tmp_path, "--configs", "configs/Digits/woodfisher.yml", "--k", "0.5", "--prune-method", method,
                 "--prune-start", "0", "--prune-end", "0", "--epochs", "1", "--fisher-subsample-size", "8",
                 "--fisher-mini-bsz", "4", "--source-net", str(source), *extra)
    masks = load_checkpoint(os.path.join(run, "checkpoint", "checkpoint.pth.tar"))["masks"]
    if method == "naivehess" and not probes:
        assert list(masks) == ["fc2"] and int(masks["fc2"].sum()) == n_keep(0.5, masks["fc2"].numel())
    elif probes:  # per layer, every layer
        assert len(masks) == 5 and all(int(m.sum()) == n_keep(0.5, m.numel()) for m in masks.values())
    elif filters:  # whole filters of the three convs, per layer; the classifier stays plain
        assert list(masks) == ["conv1", "conv2", "conv3"]
        for m in masks.values():
            assert torch.equal(m.flatten(1).all(1), m.flatten(1).any(1))
            assert int(m.flatten(1).all(1).sum()) == n_keep(0.5, m.shape[0])
    else:  # one global selection over all five layers
        total = sum(m.numel() for m in masks.values())
        assert len(masks) == 5 and sum(int(m.sum()) for m in masks.values()) == n_keep(0.5, total)
    log = open(os.path.join(run, "run.log")).read()
    assert f"prune epoch 0 step 1/1: {method} (" in log and log.count("prune epoch") == 1
