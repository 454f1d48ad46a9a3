"""The OBS solver and its batched gradient rows: against sequential autograd and fp64 brute force."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from layers import MaskSet, n_keep, select_masks, to_masked
from pruning.fisher_inverse import EmpiricalFisherInverse
from pruning.gradients import collect_gradients
from pruning.methods import PRUNE_METHODS
from pruning.obs import obs_statistic, obs_update
from layers import dense_masks
from pruning.solver import FisherSettings, OBSSolver


def odd_net(granularity="unstructured"):
    """Convs with stride, padding, dilation, groups and reflect padding, BatchNorm, a linear layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(24, 5))
    to_masked(model, granularity=granularity)
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def data(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g)


def sequential_rows(model, layers, x, y, b):
    """The public code's way: one forward/backward per row, model in eval mode."""
    model.eval()
    rows = []
    for r in range(len(y) // b):
        loss = nn.functional.cross_entropy(model(x[r * b:(r + 1) * b]), y[r * b:(r + 1) * b])
        grads = torch.autograd.grad(loss, [layer.weight for layer in layers.values()])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("b,max_samples", [(1, None), (4, None), (4, 2), (5, 2), (8, None)])
def test_gradient_rows_equal_one_backward_per_row(b, max_samples):
    model = odd_net()
    ms = MaskSet(model, k=0.5, granularity="unstructured", scope="global")
    ms.step(force=True)
    for layer in ms.layers.values():
        layer.popup_scores.requires_grad_(False)
    x, y = data()
    batches = [(x[i:i + 7], y[i:i + 7]) for i in range(0, 40, 7)]  # batch sizes unrelated to the rows
    model.train()
    G = collect_gradients(model, ms.layers, iter(batches), rows=40 // b, samples_per_row=b, max_samples=max_samples,
                          budget_bytes=3000)  # a tiny budget: many passes, rows split across them
    assert model.training  # put back in the mode it was in
    ref = sequential_rows(model, ms.layers, x, y, b)
    torch.testing.assert_close(G, ref, rtol=1e-5, atol=1e-7)
    alive = torch.cat([layer.mask.reshape(-1) for layer in ms.layers.values()])
    assert bool((G[:, ~alive] == 0).all()) and bool((G[:, alive] != 0).any())


def test_gradient_rows_need_enough_samples():
    model = odd_net()
    x, y = data(n=10)
    with pytest.raises(ValueError, match="ended after"):
        collect_gradients(model, {"0": model[0]}, iter([(x, y)]), rows=4, samples_per_row=3)


def quadratic_setup(m=6, seed=0):
    """A model-free solver: two linear layers, with G given by hand and its explicit block Fisher."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Linear(4, 3, bias=False))
    to_masked(model, granularity="unstructured")
    model = model.double()
    layers = {"0": model[0], "1": model[1]}
    G = torch.randn(m, 20 + 12, dtype=torch.float64) * 0.3
    return model, layers, G


def explicit_F(G, starts, size, damp):
    m = G.shape[0]
    blocks = []
    for a, b in starts:
        for c0 in range(a, b, size):
            Gb = G[:, c0:min(c0 + size, b)]
            blocks.append(damp * torch.eye(Gb.shape[1], dtype=torch.float64) + Gb.T @ Gb / m)
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("block", [8, 3, 100])  # dual, primal, whole layer
def test_compensate_is_the_joint_obs_optimum_per_block(block):
    model, layers, G = quadratic_setup()
    damp = 1e-3
    solver = OBSSolver(layers, granularity="unstructured", method=PRUNE_METHODS["woodfisher"],
                       fisher=FisherSettings(m=6, damp=damp, block_size=block))
    solver.add_gradients(G)
    w = torch.cat([layer.weight.detach().reshape(-1) for layer in layers.values()])
    new = {"0": torch.rand(4, 5, generator=torch.Generator().manual_seed(3)) > 0.4,
           "1": torch.rand(3, 4, generator=torch.Generator().manual_seed(4)) > 0.6}
    record = solver.compensate(new)
    assert record.solve == "joint" and record.pruned == int(sum((~m).sum() for m in new.values()))
    F = explicit_F(G, [(0, 20), (20, 32)], block, damp)
    Q = torch.cat([(~new["0"]).reshape(-1), (~new["1"]).reshape(-1)]).nonzero().squeeze(1)
    # brute force over the whole (block-diagonal) F: the KKT system of min 1/2 dw^T F dw, w_Q + dw_Q = 0
    E = torch.zeros(32, len(Q), dtype=torch.float64)
    E[Q, torch.arange(len(Q))] = 1.0
    kkt = torch.cat([torch.cat([F, E], 1), torch.cat([E.T, torch.zeros(len(Q), len(Q), dtype=torch.float64)], 1)])
    dw = torch.linalg.solve(kkt, torch.cat([torch.zeros(32, dtype=torch.float64), -w[Q]]))[:32]
    after = torch.cat([layer.weight.detach().reshape(-1) for layer in layers.values()])
    torch.testing.assert_close(after, (w + dw).masked_fill(torch.isin(torch.arange(32), Q), 0.0), rtol=1e-7, atol=1e-9)
    for name, layer in layers.items():
        assert torch.equal(layer.mask, new[name])


def test_a_fisher_that_float64_cannot_factor_is_a_floating_point_error_and_a_revival_a_value_error():
    """Collinear gradient rows of norm ~1e12 (an eval-mode model whose gradients exploded): lambda is lost
    next to them and the factorisation fails; that is the data's doing (one line, exit 1 from train.py),
    unlike masks that revive pruned weights (the caller's)."""
    model, layers, G = quadratic_setup()
    direction = G[:1] / G[:1].norm()
    solver = OBSSolver(layers, granularity="unstructured", method=PRUNE_METHODS["woodfisher"],
                       fisher=FisherSettings(m=6, damp=1e-5, block_size=8))
    solver.add_gradients(1e12 * direction.expand(6, -1) * torch.arange(1.0, 7.0, dtype=G.dtype)[:, None])
    new = {"0": torch.ones(4, 5, dtype=torch.bool), "1": torch.ones(3, 4, dtype=torch.bool)}
    new["0"][0, :3] = False
    with pytest.raises(FloatingPointError, match="not positive definite in float64"):
        solver.compensate(new)
    model, layers, G = quadratic_setup()
    solver = OBSSolver(layers, granularity="unstructured", method=PRUNE_METHODS["woodfisher"],
                       fisher=FisherSettings(m=6, damp=1e-3, block_size=8))
    solver.add_gradients(G)
    layers["0"].mask[0, 0] = False
    with pytest.raises(ValueError, match="revive pruned weights"):
        solver.compensate({"0": torch.ones(4, 5, dtype=torch.bool), "1": torch.ones(3, 4, dtype=torch.bool)})


def test_sum_update_and_the_joint_limit_fallback_say_which():
    model, layers, G = quadratic_setup()
    new = {"0": torch.ones(4, 5, dtype=torch.bool), "1": torch.ones(3, 4, dtype=torch.bool)}
    new["0"][0, :3] = False
    solver = OBSSolver(layers, granularity="unstructured", method=PRUNE_METHODS["woodfisher"],
                       fisher=FisherSettings(m=6, damp=1e-3, block_size=8, joint_limit=2))
    solver.add_gradients(G)
    w = [layer.weight.detach().clone() for layer in layers.values()]
    record = solver.compensate(new)
    assert record.solve == "sum" and "sum of single updates" in record.notes[0]
    inv = EmpiricalFisherInverse(G[:, :20], block_size=8, damp=1e-3)
    expected = obs_update(weight=w[0], fisher_inverse=inv, prune=~new["0"], joint=False)
    torch.testing.assert_close(layers["0"].weight.detach(), expected, rtol=1e-9, atol=1e-12)


def test_prune_to_is_statistic_then_shared_selector_then_update():
    model, layers, G = quadratic_setup()
    solver = OBSSolver(layers, granularity="unstructured", method=PRUNE_METHODS["woodfisher"],
                       fisher=FisherSettings(m=6, damp=1e-3, block_size=8))
    solver.add_gradients(G)
    w = [layer.weight.detach().clone() for layer in layers.values()]
    invs = [EmpiricalFisherInverse(G[:, :20], block_size=8, damp=1e-3),
            EmpiricalFisherInverse(G[:, 20:], block_size=8, damp=1e-3)]
    stats = [obs_statistic(weight=wi, fisher_inverse=inv) for wi, inv in zip(w, invs)]
    expected = select_masks(stats, k=0.3, granularity="unstructured", scope="global")
    masks = solver.prune_to(0.3, scope="global")
    assert sum(int(m.sum()) for m in masks.values()) == n_keep(0.3, 32)
    for name, exp, wi, inv in zip(layers, expected, w, invs):
        assert torch.equal(masks[name], exp)
        torch.testing.assert_close(layers[name].weight.detach(),
                                   obs_update(weight=wi, fisher_inverse=inv, prune=~exp, joint=True), rtol=1e-9, atol=1e-12)


def test_filter_update_moves_the_other_filters_of_a_wide_layer():
    """A filter of 576 weights is wider than the 512-weight chunks: with chunk blocks it would be a
    block of its own and its update would move nothing. Whole-layer blocks let it compensate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 6, 3, bias=False))
    to_masked(model, granularity="filter")
    layers = {"0": model[0]}
    G = torch.randn(16, 6 * 576) * 0.1
    solver = OBSSolver(layers, granularity="filter", method=PRUNE_METHODS["woodfisher"],
                       fisher=FisherSettings(m=16, damp=1e-4, block_size=512))
    solver.add_gradients(G)
    before = model[0].weight.detach().clone()
    new = dense_masks(layers)
    new["0"][2] = False
    solver.compensate(new)
    after = model[0].weight.detach()
    assert bool((after[2] == 0).all())
    assert not torch.equal(after[[0, 1, 3, 4, 5]], before[[0, 1, 3, 4, 5]])


def test_one_host_synchronisation_per_step_whatever_the_number_of_layers(monkeypatch):
    """Reading a tensor on the host (item/tolist/bool/int/float) is what stalls a GPU: count them."""
    counts = {}
    for depth in (2, 6):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(6, 6, bias=False) for _ in range(depth)])
        to_masked(model, granularity="unstructured")
        layers = {str(i): model[i] for i in range(depth)}
        solver = OBSSolver(layers, granularity="unstructured", method=PRUNE_METHODS["woodfisher"],
                           fisher=FisherSettings(m=4, damp=1e-3, block_size=10))
        solver.add_gradients(torch.randn(4, 36 * depth))
        calls = []
        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            original = getattr(torch.Tensor, name)

            def counted(self, *a, _original=original, **kw):
                calls.append(1)
                return _original(self, *a, **kw)
            monkeypatch.setattr(torch.Tensor, name, counted)
        solver.prune_to(0.5, scope="global")
        monkeypatch.undo()
        counts[depth] = len(calls)
    assert counts[2] == counts[6] <= 2, counts


@pytest.mark.parametrize("free_bytes", [0, 2**40])
def test_inverses_are_kept_for_the_update_where_memory_is_free_and_rebuilt_alike_where_not(monkeypatch, free_bytes):
    """Primal blocks (c <= m) weigh more than their columns of G; with little free memory the budget is G's
    size and the update rebuilds them from G, with plenty the statistic's inverses are kept. The step's
    masks and weights are the same bits either way."""
    def run(free):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 5, bias=False), nn.Linear(5, 8, bias=False))
        to_masked(model, granularity="unstructured")
        layers = {"0": model[0], "1": model[1]}
        solver = OBSSolver(layers, granularity="unstructured", method=PRUNE_METHODS["woodfisher"],
                           fisher=FisherSettings(m=8, damp=1e-3, block_size=8))
        solver.add_gradients(torch.randn(8, 80, generator=torch.Generator().manual_seed(1)))
        built = []
        original = EmpiricalFisherInverse.__init__

        def counted(self, *a, **kw):
            built.append(1)
            original(self, *a, **kw)
        monkeypatch.setattr(EmpiricalFisherInverse, "__init__", counted)
        monkeypatch.setattr("pruning.solver.available_bytes", lambda device: free)
        masks = solver.prune_to(0.4, scope="global")
        monkeypatch.undo()
        return len(built), masks, [layer.weight.detach().clone() for layer in layers.values()]

    # 2 layers of 5 blocks of 8 x 8 (+ diag vectors): 3,200 bytes kept per layer, G is 8 x 80 x 4 = 2,560
    built, masks, weights = run(free_bytes)
    assert built == (4 if free_bytes == 0 else 2)  # rebuilt for the update, or kept from the statistic
    _, ref_masks, ref_weights = run(2**40 - free_bytes)
    assert all(torch.equal(masks[n], ref_masks[n]) for n in masks)
    assert all(torch.equal(a, b) for a, b in zip(weights, ref_weights))


def test_free_host_memory_is_what_a_cgroup_limit_leaves(tmp_path):
    from pruning.free_memory import cgroup_free_bytes
    assert cgroup_free_bytes(str(tmp_path)) is None  # nothing readable
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("1000\n")
    assert cgroup_free_bytes(str(tmp_path)) is None  # v2, no limit
    (tmp_path / "memory.max").write_text("4096\n")
    assert cgroup_free_bytes(str(tmp_path)) == 3096
    (tmp_path / "memory.current").write_text("5000\n")
    assert cgroup_free_bytes(str(tmp_path)) == 0
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("10\n")
    assert cgroup_free_bytes(str(v1)) is None  # v1's "no limit"
    (v1 / "memory" / "memory.limit_in_bytes").write_text("100\n")
    assert cgroup_free_bytes(str(v1)) == 90
