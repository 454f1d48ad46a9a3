"""Unit criteria without curvature: FPGM (He et al. 2019) and first-order Taylor (Molchanov et al. 2019),
each against a hand computation in float64 on a tiny layer, through the solver and the WoodFisher trainer."""
import os
from functools import partial

import pytest
import torch

from configs.errors import UserError
from configs.options import WoodFisherOptions
from layers import MaskSet, n_keep
from pruning.methods import PRUNE_METHODS
from pruning.solver import FisherSettings, OBSSolver
from tests.helpers import tiny
from tests.helpers.tiny import tiny_net
from tests.test_coupling import TiedGrouped
from trainers.base import RunSpec
from trainers.woodfisher import WoodFisherTrainer, plan

CPU = torch.device("cpu")
tiny_loaders = partial(tiny.tiny_loaders, 48, batch_size=8)


def masked(granularity, *, seed=0):
    """tiny_net's two masked convs (1->4, 4->4) in float64 with random weights, all units alive."""
    model = tiny_net(granularity, convs=2, seed=seed).double()
    ms = MaskSet(model, k=0.5, granularity=granularity, scope="layer")
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for layer in ms.layers.values():
            layer.mask.fill_(True)
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64))
    return model, ms


def units_of(weight, granularity):
    """(n_units, unit_size): a filter's (dim 0) or an input channel's (dim 1) weights per row."""
    return weight.flatten(1) if granularity == "filter" else weight.transpose(0, 1).flatten(1)


def unit_values(scores, granularity):
    """What the selector ranks a unit by, squared: the sum of its weight-shaped scores squared (the statistic)."""
    return units_of(scores, granularity).square().sum(1)


def kept_units(layer, granularity):
    return units_of(layer.mask, granularity).any(1)


def check_kept_the_largest(ms, want, masks, before, granularity):
    """Each layer kept exactly its n_keep(0.5) units of largest ``want``; no compensation: the survivors keep
    their weights, the pruned ones are exactly 0."""
    for name, layer in ms.layers.items():
        n = want[name].numel()
        largest = torch.zeros(n, dtype=torch.bool)
        largest[want[name].topk(n_keep(0.5, n)).indices] = True
        assert torch.equal(kept_units(layer, granularity), largest), name
        assert torch.equal(layer.weight.detach(), before[name] * masks[name])


def trainer(model, ms, method, **options):
    defaults = dict(prune_method=method, prune_start=0, prune_freq=1, prune_end=3, init_sparsity=0.2,
                    fisher_subsample_size=6, fisher_mini_bsz=4, woodbury_joint_sparsify=False)
    defaults.update(options)
    return WoodFisherTrainer(model=model, maskset=ms, mode="prune", device=CPU, progress=False,
                             weight_optim=tiny.sgd(lr=0.05, momentum=0.9, epochs=defaults["prune_end"] + 1),
                             options=WoodFisherOptions(**defaults))


# -- FPGM ---------------------------------------------------------------------------------------------
def fpgm_by_hand(units, alive):
    """sum over the other alive units j of ||w_u - w_j||_2, 0 for a dead unit: explicit loops, float64."""
    n = units.shape[0]
    out = torch.zeros(n, dtype=torch.float64)
    for u in range(n):
        if alive[u]:
            out[u] = sum(float(torch.linalg.vector_norm(units[u] - units[j])) for j in range(n) if alive[j] and j != u)
    return out


@pytest.mark.parametrize("granularity", ["filter", "channel"])
def test_fpgm_scores_each_unit_by_its_sum_of_distances_and_prunes_the_smallest_sums(granularity):
    model, ms = masked(granularity)
    solver = OBSSolver(ms.layers, granularity=granularity, method=PRUNE_METHODS["fpgm"])
    scores = solver.scores()
    before = {n: layer.weight.detach().clone() for n, layer in ms.layers.items()}
    want = {}
    for name, layer in ms.layers.items():
        units = units_of(layer.weight.detach(), granularity)
        want[name] = fpgm_by_hand(units, torch.ones(units.shape[0], dtype=torch.bool))
        # against torch.cdist too, and what the selector ranks: sqrt(stat) per unit
        assert torch.allclose(want[name], torch.cdist(units, units).sum(1), rtol=1e-12)
        # atol: a lone unit's sum is 0, scored finfo.tiny so that an alive unit outranks a pruned one
        assert torch.allclose(unit_values(scores[name], granularity), want[name], rtol=1e-10, atol=1e-300)
    masks = solver.prune_to(0.5, scope="layer")
    check_kept_the_largest(ms, want, masks, before, granularity)
    assert solver.record.solve == "none" and solver.G is None


def test_fpgm_leaves_a_pruned_filter_out_of_the_others_sums():
    """A dead filter (weights zeroed) scores 0 and would otherwise count as a point at the origin."""
    model, ms = masked("filter", seed=3)
    layer = ms.layers["0"]
    with torch.no_grad():
        layer.mask[1] = False
        layer.weight[1] = 0
    stat = unit_values(OBSSolver(ms.layers, granularity="filter", method=PRUNE_METHODS["fpgm"]).scores()["0"], "filter")
    units = units_of(layer.weight.detach(), "filter")
    alive = torch.tensor([True, False, True, True])
    want = fpgm_by_hand(units, alive)
    with_dead = fpgm_by_hand(units, torch.ones(4, dtype=torch.bool))
    with_dead[1] = 0
    assert stat[1] == 0 and torch.allclose(stat, want, rtol=1e-10, atol=0)
    assert not torch.allclose(stat, with_dead, rtol=1e-3)


# -- TaylorFO -----------------------------------------------------------------------------------------
def taylor_by_hand(G, ms, granularity):
    """mean over rows r of (sum over the unit's weights q of g_{r,q} w_q)^2, per layer: explicit loops."""
    out, start = {}, 0
    for name, layer in ms.layers.items():
        w = layer.weight.detach()
        d = w.numel()
        g = G[:, start:start + d].reshape(G.shape[0], *w.shape)
        n = w.shape[0] if granularity == "filter" else w.shape[1]
        values = torch.zeros(n, dtype=torch.float64)
        for u in range(n):
            for r in range(G.shape[0]):
                if granularity == "filter":
                    values[u] += float((g[r, u] * w[u]).sum()) ** 2
                else:
                    values[u] += float((g[r, :, u] * w[:, u]).sum()) ** 2
            values[u] /= G.shape[0]
        out[name] = values
        start += d
    return out


@pytest.mark.parametrize("granularity", ["filter", "channel"])
def test_taylorfo_is_the_mean_squared_first_order_term_of_each_unit_over_the_gradient_rows(granularity):
    model, ms = masked(granularity, seed=1)
    m = 5
    solver = OBSSolver(ms.layers, granularity=granularity, method=PRUNE_METHODS["taylorfo"],
                       fisher=FisherSettings(m=m))
    G = torch.randn(m, solver.num_weights, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    solver.add_gradients(G)
    scores = solver.scores()
    want = taylor_by_hand(G, ms, granularity)
    for name in ms.layers:
        assert torch.allclose(unit_values(scores[name], granularity), want[name], rtol=1e-10, atol=1e-300), name
    # the rows only: no inverse was built, and the update only zeroes
    assert all(solver._prepare(i).inverse is None for i in range(len(solver.groups)))
    before = {n: layer.weight.detach().clone() for n, layer in ms.layers.items()}
    masks = solver.prune_to(0.5, scope="layer", scores=scores)
    check_kept_the_largest(ms, want, masks, before, granularity)
    # beyond G, at most its columns reordered into channel order (a copy; filters need none): never an inverse
    staged = 0 if granularity == "filter" else G.numel() * G.element_size()
    assert solver.record.solve == "none" and solver.record.inverse_peak_bytes == staged


def test_taylorfo_needs_the_gradient_rows_but_no_inverse():
    method = PRUNE_METHODS["taylorfo"]
    assert method.fisher == "rows" and not method.builds_inverse and not method.compensates
    model, ms = masked("filter")
    with pytest.raises(ValueError, match="needs gradients"):
        OBSSolver(ms.layers, granularity="filter", method=method).scores()
    # the run's memory estimate counts the m x D rows for taylorfo, nothing for fpgm (no gradients at all)
    common = dict(per_sample_bytes=1000, batch_size=8, model_bytes=10_000, masked_weights=50_000, on_gpu=False)
    base = WoodFisherTrainer.memory_needs(**common, options=WoodFisherOptions(prune_method="magnitude"))
    taylor = WoodFisherTrainer.memory_needs(**common, options=WoodFisherOptions(prune_method="taylorfo",
                                                                                fisher_subsample_size=7))
    fpgm = WoodFisherTrainer.memory_needs(**common, options=WoodFisherOptions(prune_method="fpgm"))
    assert fpgm == base and len(taylor) > len(base)
    assert any(need.bytes == 7 * 50_000 * 4 and "Fisher gradients" in need.what for need in taylor)


# -- through the trainer --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fpgm", "taylorfo"])
@pytest.mark.parametrize("granularity", ["filter", "channel"])
def test_exact_per_layer_counts_after_each_event(method, granularity):
    model = tiny_net(granularity, convs=2)
    ms = MaskSet(model, k=0.3, granularity=granularity, scope="layer")
    t = trainer(model, ms, method)
    loaders = tiny_loaders()
    units = ms.unit_counts()
    events = {e.epoch: e.sparsity for e in t.events}
    previous = list(units)
    for epoch in range(4):
        t.set_epoch(epoch)
        t.prune_to(events[epoch], epoch=epoch, loaders=loaders)
        density = 0.3 if epoch == 3 else 1 - events[epoch]
        kept = [int(kept_units(layer, granularity).sum()) for layer in ms.layers.values()]
        assert kept == [n_keep(density, u) for u in units], (epoch, kept)
        assert all(a <= b for a, b in zip(kept, previous))
        previous = kept
        for layer in ms.layers.values():  # whole units, pruned weights exactly zero
            u = units_of(layer.mask, granularity)
            assert torch.equal(u.all(1), u.any(1))
            assert not layer.weight[~layer.mask].any()
    line = t.pop_notes()[-1]
    assert line.startswith(f"prune epoch 3 step 1/1: {method} (layer")
    assert ("no inverse, update none" in line) == (method == "taylorfo") and "damp" not in line


@pytest.mark.parametrize("method", ["fpgm", "taylorfo"])
def test_unit_criteria_refuse_single_weights_with_one_line(method):
    assert PRUNE_METHODS[method].granularities == ("filter", "channel")
    model = tiny_net("unstructured", convs=1)
    ms = MaskSet(model, k=0.5, granularity="unstructured", scope="layer")
    with pytest.raises(UserError, match=f"--prune-method {method} does not support --layer-type unstructured") as e:
        trainer(model, ms, method, prune_end=1)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=f"--prune-method {method} does not support --layer-type nm") as e:
        plan(WoodFisherOptions(prune_method=method, prune_end=1),
             run=RunSpec(mode="prune", layer_type="nm", k=0.5, scope="layer", epochs=2))
    assert "\n" not in str(e.value)


# -- coupled filter masks ---------------------------------------------------------------------------------
def test_fpgm_ranks_a_coupled_unit_by_the_sum_of_its_filters_distance_sums():
    """Each filter scores within its layer; a unit by the sum over its member filters (of every layer)."""
    from deploy.slim import dependency_groups
    from layers import build_maskset, to_masked
    from layers.maskset import dense_masks

    torch.manual_seed(0)
    model = TiedGrouped().double()
    groups = dependency_groups(model, example=torch.zeros(1, 2, 6, 6, dtype=torch.float64))
    to_masked(model, granularity="filter")
    ms, _ = build_maskset(model, granularity="filter", k=0.5, scope="global", coupled=groups)
    ms.set_masks(dense_masks(ms.layers))
    coupling = ms.coupling
    solver = OBSSolver(ms.layers, granularity="filter", method=PRUNE_METHODS["fpgm"], coupling=coupling)
    got = coupling.unit_scores(solver.scores()).square()
    want = torch.zeros(coupling.units, dtype=torch.float64)
    for name, layer in ms.layers.items():
        units = units_of(layer.weight.detach(), "filter")
        per_filter = fpgm_by_hand(units, torch.ones(units.shape[0], dtype=torch.bool))
        want.index_add_(0, coupling.unit_of[name], per_filter)
    assert coupling.tied() == 4 and torch.allclose(got, want, rtol=1e-10, atol=0)
    masks = solver.prune_to(0.5, scope="global")
    assert int(coupling.alive_units(masks)) == n_keep(0.5, coupling.units)


# -- train.py end to end ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fpgm", "taylorfo"])
def test_cli_digits_prunes_half_the_filters_of_every_layer(tmp_path, method):
    from engine.checkpoint import load_checkpoint
    from models import build_model
    from tests.helpers.cli import run_ok

    torch.manual_seed(0)
    source = tmp_path / "dense.pth"
    torch.save(build_model("smallcnn", num_classes=10, in_channels=1).state_dict(), source)
    run = run_ok(tmp_path, "--configs", "configs/Digits/woodfisher.yml", "--layer-type", "filter", "--k", "0.5",
                 "--prune-method", method, "--scope", "layer", "--no-woodbury-joint-sparsify", "--prune-end", "1",
                 "--prune-freq", "1", "--fisher-subsample-size", "8", "--fisher-mini-bsz", "4",
                 "--source-net", str(source))
    masks = load_checkpoint(os.path.join(run, "checkpoint", "checkpoint.pth.tar"))["masks"]
    for name, mask in masks.items():
        if mask.dim() == 4:  # the convs: exactly half of each layer's filters, whole
            assert int(mask.flatten(1).any(1).sum()) == n_keep(0.5, mask.shape[0]), name
    log = open(os.path.join(run, "run.log")).read()
    assert f": {method} (layer" in log and "filter sparsity" in log
