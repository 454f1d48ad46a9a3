"""Masked layers, the selector, the straight-through gradient and dense export."""
import math

import pytest
import torch
from torch import nn

from layers import (MaskSet, MaskedConv2d, MaskedLinear, dense_state_dict, init_scores, masked_layers, n_keep,
                    select_masks, to_dense, to_masked, top_units)


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 5))


# -- counting rule ------------------------------------------------------------------------------
@pytest.mark.parametrize("k,n,expected", [(0.05, 432, 22), (0.1, 10, 1), (0.01, 1728, 18), (1.0, 7, 7),
                                          (0.5, 3, 2), (1e-6, 100, 1), (0.37, 1000, 370), (0.05, 11_164_352, 558_218)])
def test_n_keep_is_the_hydra_bip_rule(k, n, expected):
    assert n_keep(k, n) == expected
    assert n_keep(k, n) == max(1, n - int((1 - k) * n))


@pytest.mark.parametrize("k,n,expected", [(0.9, 10, 9), (0.9, 11_000_000, 9_900_000), (0.7, 10, 7), (0.2, 5, 1)])
def test_n_keep_rounds_away_float_noise(k, n, expected):
    # the public code keeps one more here (1 - 0.9 == 0.0999...98 in float64)
    assert n_keep(k, n) == expected


def test_n_keep_matches_sparsity_counts():
    for n in range(1, 400):
        for s in (0.05, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98):
            assert n_keep(1 - s, n) == max(1, n - math.floor(s * n + 1e-9)), (n, s)


@pytest.mark.parametrize("k", [0.0, -0.1, 1.01])
def test_n_keep_rejects_density_outside_unit_interval(k):
    with pytest.raises(ValueError):
        n_keep(k, 10)


def public_keep(values, k):
    """HYDRA/BiP's GetSubnet on a 1-D tensor (sort ascending, zero the first int((1 - k) N)) with a STABLE
    sort: their count, and the project's tie rule (their own torch.sort has no defined order at ties)."""
    _, idx = values.sort(stable=True)
    j = int((1 - k) * values.numel())
    keep = torch.ones(values.numel(), dtype=torch.bool)
    keep[idx[:j]] = False
    return keep


def test_top_units_ties_keep_the_highest_index():
    v = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0])
    assert top_units(v, 2).tolist() == [False, False, False, True, True]   # the example, k = 0.4
    assert top_units(v, 2).tolist() == public_keep(v, 0.4).tolist()
    v = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0, 0.5])
    assert top_units(v, 3).tolist() == [False, False, True, True, True, False]
    assert top_units(v, 4).tolist() == [False, True, True, True, True, False]
    assert top_units(torch.zeros(7), 3).tolist() == [False, False, False, False, True, True, True]
    assert top_units(v, 6).all() and top_units(v, 10).all()


@pytest.mark.parametrize("k", [0.05, 0.1, 0.25, 0.5, 0.75])
def test_tied_scores_give_the_stable_sort_mask(k):
    """Deliberately tied scores (few distinct values): the documented rule, entry by entry: the public
    count with a stable ascending sort deciding the ties."""
    g = torch.Generator().manual_seed(7)
    v = torch.randint(0, 5, (10_007,), generator=g).float()
    assert n_keep(k, v.numel()) == v.numel() - int((1 - k) * v.numel())
    assert torch.equal(top_units(v, n_keep(k, v.numel())), public_keep(v, k))
    scores = [v[:4007].view(4007, 1), v[4007:].view(6, 1000)]
    glob = select_masks(scores, k=k, granularity="unstructured", scope="global")
    assert torch.equal(torch.cat([m.flatten() for m in glob]), public_keep(v, k))


def test_count_rule_differs_from_the_public_code_exactly_where_documented():
    from layers.selector import public_count_differs, public_n_keep
    # k = 0.9: every multiple of 10 (every 10-class classifier), k = 0.8: every multiple of 5
    assert all(public_count_differs(0.9, n) for n in range(10, 20_000, 10))
    assert not any(public_count_differs(0.9, n) for n in range(1, 20_000) if n % 10)
    assert all(public_count_differs(0.8, n) for n in range(5, 20_000, 5))
    assert (n_keep(0.9, 5120), public_n_keep(0.9, 5120)) == (4608, 4609)
    for k in (0.5, 0.1, 0.05, 0.01, 0.64, 0.512, 0.2097, 0.0092):
        assert not any(public_count_differs(k, n) for n in range(1, 20_000)), k


def test_top_units_large_counts_use_both_sides():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(10_001, generator=g)
    for count in (1, 17, 5000, 5001, 9000, 10_000):
        keep = top_units(v, count)
        assert int(keep.sum()) == count
        assert v[keep].min() >= v[~keep].max() if count < v.numel() else True


# -- exact counts for every granularity and scope --------------------------------------------------
SHAPES = [(8, 3, 3, 3), (6, 8, 3, 3), (5, 6)]


def random_scores(seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=g) for s in SHAPES]
    if ties:  # quantised scores: many exact ties, also across layers
        out = [torch.round(s * 2) / 2 for s in out]
    return out


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [0.05, 0.3, 0.5, 0.77, 1.0])
def test_unstructured_counts(k, ties):
    scores = random_scores(ties=ties)
    per_layer = select_masks(scores, k=k, granularity="unstructured", scope="layer")
    for s, m in zip(scores, per_layer):
        assert int(m.sum()) == n_keep(k, s.numel())
        assert m.shape == s.shape and m.dtype == torch.bool
    glob = select_masks(scores, k=k, granularity="unstructured", scope="global")
    total = sum(s.numel() for s in scores)
    assert sum(int(m.sum()) for m in glob) == n_keep(k, total)
    # global keeps the largest |s| overall
    kept = torch.cat([s.abs().flatten()[m.flatten()] for s, m in zip(scores, glob)])
    dropped = torch.cat([s.abs().flatten()[~m.flatten()] for s, m in zip(scores, glob)])
    if dropped.numel():
        assert kept.min() >= dropped.max()


@pytest.mark.parametrize("granularity,dim", [("filter", 0), ("channel", 1)])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("k", [0.2, 0.5, 0.9])
def test_structured_counts_and_shape(granularity, dim, scope, k):
    scores = random_scores(seed=3)
    masks = select_masks(scores, k=k, granularity=granularity, scope=scope)
    units_kept = []
    for s, m in zip(scores, masks):
        unit_mask = m.transpose(0, dim).flatten(1)
        # whole units: every row of a unit is all-True or all-False
        assert (unit_mask.all(dim=1) | (~unit_mask).any(dim=1) & (~unit_mask).all(dim=1)).all()
        units_kept.append(int(unit_mask.all(dim=1).sum()))
        if scope == "layer":
            assert units_kept[-1] == n_keep(k, s.shape[dim])
    if scope == "global":
        assert sum(units_kept) == n_keep(k, sum(s.shape[dim] for s in scores))


def test_filter_units_ranked_by_l2_norm():
    s = torch.zeros(3, 2, 1, 1)
    s[0] = torch.tensor([3.0, 0.0]).view(2, 1, 1)   # L2 3, L1 3
    s[1] = torch.tensor([2.0, 2.0]).view(2, 1, 1)   # L2 2.83, L1 4
    s[2] = torch.tensor([1.0, 1.0]).view(2, 1, 1)
    m = select_masks([s], k=0.34, granularity="filter", scope="layer")[0]
    assert m[:, 0, 0, 0].tolist() == [True, True, False]  # n_keep(0.34, 3) = 2
    m = select_masks([s], k=0.3, granularity="filter", scope="layer")[0]
    assert m[:, 0, 0, 0].tolist() == [True, False, False]


def test_layer_floor_keeps_every_layer_alive_and_total_exact():
    scores = [torch.full((4, 4), 0.01), torch.randn(50, 50) + 10]
    plain = select_masks(scores, k=0.1, granularity="unstructured", scope="global")
    assert int(plain[0].sum()) == 0
    floored = select_masks(scores, k=0.1, granularity="unstructured", scope="global", min_units=3)
    assert int(floored[0].sum()) == 3
    assert sum(int(m.sum()) for m in floored) == n_keep(0.1, 16 + 2500)


# -- masked layers ---------------------------------------------------------------------------------
def test_straight_through_gradient_matches_hand_computation():
    torch.manual_seed(0)
    layer = MaskedLinear(4, 3, bias=False)
    layer.popup_scores.requires_grad_(True)
    layer.weight.requires_grad_(True)
    with torch.no_grad():
        layer.popup_scores.copy_(torch.randn(3, 4))
        layer.popup_scores[0, 0] = 0.0  # sign(0) = 0: no gradient, as |s| has none there
        layer.mask.copy_(torch.rand(3, 4) > 0.5)
    x = torch.randn(5, 4)
    upstream = torch.randn(5, 3)
    (layer(x) * upstream).sum().backward()
    g_eff = upstream.t() @ x  # dL/d(w*m) for y = x (w*m)^T
    torch.testing.assert_close(layer.popup_scores.grad, torch.sign(layer.popup_scores.detach()) * layer.weight.detach() * g_eff)
    torch.testing.assert_close(layer.weight.grad, layer.mask * g_eff)
    assert layer.popup_scores.grad[0, 0] == 0


def test_forward_uses_masked_weight_without_score_grad():
    torch.manual_seed(0)
    conv = MaskedConv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        conv.mask.copy_(torch.rand_like(conv.weight) > 0.5)
    x = torch.randn(2, 2, 5, 5)
    ref = nn.functional.conv2d(x, conv.weight * conv.mask, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), ref)


def test_masked_model_at_k_one_equals_dense_model():
    dense = tiny_net().eval()
    masked = to_masked(tiny_net(), granularity="unstructured").eval()
    ms = MaskSet(masked, k=1.0, granularity="unstructured", scope="global")
    assert all(l.mask.all() for l in ms.layers.values())
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(masked(x), dense(x))
    assert len(ms.layers) == 3


@pytest.mark.parametrize("granularity", ["unstructured", "filter", "channel"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_dense_export_round_trip(granularity, scope):
    model = to_masked(tiny_net(), granularity=granularity)
    ms = MaskSet(model, k=0.4, granularity=granularity, scope=scope)
    init_scores(ms.layers, kind="kaiming_normal")
    model.eval()
    x = torch.randn(3, 3, 6, 6)
    expected = model(x)
    masks = ms.masks()
    # the exported state dict loads strictly into the plain architecture and computes the same
    plain = tiny_net().eval()
    plain.load_state_dict(dense_state_dict(model), strict=True)
    torch.testing.assert_close(plain(x), expected)
    for name, m in masks.items():
        assert torch.equal(plain.get_submodule(name).weight != 0, m & (model.get_submodule(name).weight != 0))
    # and to_dense gives the same function with plain layers
    back = to_dense(model)
    assert not masked_layers(back)
    torch.testing.assert_close(back(x), expected)


def test_maskset_reselects_only_when_scores_change():
    model = to_masked(tiny_net(), granularity="unstructured")
    ms = MaskSet(model, k=0.3, granularity="unstructured", scope="global")
    x = torch.randn(2, 3, 6, 6)
    model(x)
    first = ms.selections
    model(x)
    model(x)
    assert ms.selections == first  # no score change, no selection
    layer = next(iter(ms.layers.values()))
    old = layer.mask.clone()
    with torch.no_grad():
        layer.popup_scores.mul_(-100.0).add_(torch.randn_like(layer.popup_scores))
    model(x)
    assert ms.selections == first + 1
    assert not torch.equal(old, layer.mask)
    assert sum(int(l.mask.sum()) for l in ms.layers.values()) == n_keep(0.3, sum(l.mask.numel() for l in ms.layers.values()))


def test_maskset_selects_when_built_and_remove_detaches_it():
    model = to_masked(tiny_net(), granularity="unstructured")
    ms = MaskSet(model, k=0.3, granularity="unstructured", scope="global")
    total = sum(l.mask.numel() for l in ms.layers.values())
    # selected at once: exactly n_keep masks before any forward or step(), the top-k of the scores
    assert ms.selections == 1
    assert sum(int(l.mask.sum()) for l in ms.layers.values()) == n_keep(0.3, total)
    ref = select_masks([l.popup_scores for l in ms.layers.values()], k=0.3, granularity="unstructured",
                       scope="global")
    assert all(torch.equal(l.mask, r) for l, r in zip(ms.layers.values(), ref))
    ms.remove()
    ms.remove()  # idempotent
    layer = next(iter(ms.layers.values()))
    before = layer.mask.clone()
    with torch.no_grad():
        layer.popup_scores.mul_(-100.0).add_(torch.randn_like(layer.popup_scores))  # a new ranking
    model(torch.randn(2, 3, 6, 6))
    assert ms.selections == 1 and torch.equal(layer.mask, before)  # no hook: the forward selects nothing
    assert ms.step() and not torch.equal(layer.mask, before)  # an explicit step still follows the scores


def test_frozen_maskset_keeps_explicit_masks():
    model = to_masked(tiny_net(), granularity="unstructured")
    ms = MaskSet(model, k=0.3, granularity="unstructured", scope="layer")
    explicit = {n: torch.rand_like(l.weight) > 0.5 for n, l in ms.layers.items()}
    ms.set_masks(explicit)
    with torch.no_grad():
        for l in ms.layers.values():
            l.popup_scores.add_(1.0)
    model(torch.randn(1, 3, 6, 6))
    for n, l in ms.layers.items():
        assert torch.equal(l.mask, explicit[n])


def test_scaled_score_init_is_a_new_tensor():
    model = to_masked(tiny_net(), granularity="unstructured")
    layers = masked_layers(model)
    init_scores(layers, kind="scaled")
    for layer in layers.values():
        fan_in = layer.weight[0].numel()
        w = layer.weight.detach()
        torch.testing.assert_close(layer.popup_scores.detach(), math.sqrt(6 / fan_in) * w / w.abs().max())
        assert layer.popup_scores.data_ptr() != layer.weight.data_ptr()
        with torch.no_grad():
            layer.popup_scores.add_(1.0)
        assert not torch.equal(layer.popup_scores.detach(), layer.weight.detach())


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_incremental_selection_equals_reference_as_scores_drift(scope, sync_free):
    """MaskSet's selector gives exactly select_masks' masks, ties included, with either kernel (the CPU's
    host-bracketing one and the sync-free one of the other devices), and so does every layer's multiplier."""
    torch.manual_seed(0)
    model = to_masked(tiny_net(), granularity="unstructured")
    ms = MaskSet(model, k=0.3, granularity="unstructured", scope=scope, sync_free=sync_free)
    assert ms._incremental is not None
    g = torch.Generator().manual_seed(5)
    for it in range(25):
        with torch.no_grad():
            for layer in ms.layers.values():
                layer.popup_scores.add_(0.02 * torch.randn(layer.popup_scores.shape, generator=g))
                if it % 6 == 5:  # quantise: many exact ties at the threshold
                    layer.popup_scores.copy_(torch.round(layer.popup_scores * 8) / 8)
                if it == 12:  # a big jump: the threshold moves far
                    layer.popup_scores.mul_(30.0)
        ms.step()
        ref = select_masks([l.popup_scores for l in ms.layers.values()], k=0.3, granularity="unstructured",
                           scope=scope)
        for layer, m in zip(ms.layers.values(), ref):
            assert torch.equal(layer.mask, m), it
            assert torch.equal(layer.multiplier(), m.to(layer.weight.dtype)), it
    ms.check_finite()  # no NaN was seen


@pytest.mark.parametrize("granularity", ["unstructured", "filter"])
def test_sync_free_selection_reports_nan_scores_when_asked(granularity):
    """The sync-free selection cannot stop the step at a NaN score (that would read the device): it keeps a flag
    that check_finite, called by the trainer on the steps that print, turns into the usual error."""
    model = to_masked(tiny_net(), granularity=granularity)
    ms = MaskSet(model, k=0.5, granularity=granularity, scope="global", sync_free=True)
    ms.check_finite()
    with torch.no_grad():
        next(iter(ms.layers.values())).popup_scores[0].fill_(float("nan"))
    ms.step()
    with pytest.raises(FloatingPointError, match="importance scores became NaN"):
        ms.check_finite()


def test_straight_through_gradient_with_cached_signed_weights_equals_the_formula():
    """dL/ds = sign(s) * w * dL/d(w m) and dL/dw = m * dL/d(w m), in float64, when the signed weights are the mask
    set's (computed before the forward for all layers) and after the weights moved (BiP's lower step), where a stale
    cache would give the old weights' product."""
    torch.manual_seed(0)
    model = to_masked(tiny_net(), granularity="unstructured").double()
    ms = MaskSet(model, k=0.5, granularity="unstructured", scope="global")
    layers = list(ms.layers.values())
    for layer in layers:
        layer.popup_scores.requires_grad_(True)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    for move in (False, True):
        if move:
            with torch.no_grad():
                for layer in layers:
                    layer.weight.add_(torch.randn_like(layer.weight))
        model.zero_grad(set_to_none=True)
        # the effective weight w * m of each layer, its gradient read through a tensor hook
        effective = {}
        originals = {}
        for layer in layers:
            originals[layer] = layer.masked_weight

            def wrapped(layer=layer):
                out = originals[layer]()
                out.retain_grad()
                effective[layer] = out
                return out
            layer.masked_weight = wrapped
        model(x).square().sum().backward()
        for layer in layers:
            del layer.masked_weight
            g = effective[layer].grad
            torch.testing.assert_close(layer.popup_scores.grad, torch.sign(layer.popup_scores) * layer.weight * g,
                                       rtol=0, atol=1e-14)
            torch.testing.assert_close(layer.weight.grad, layer.mask.double() * g, rtol=0, atol=1e-14)


def test_incremental_selection_needs_few_passes_for_small_drift():
    from layers.selector import IncrementalTopK
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(1000, generator=g), torch.randn(3000, generator=g)]
    masks = [torch.empty(1000, dtype=torch.bool), torch.empty(3000, dtype=torch.bool)]
    sel = IncrementalTopK()
    sel.select_into(scores, masks, 200)
    for _ in range(5):
        scores = [s + 1e-3 * torch.randn(s.shape, generator=g) for s in scores]
        before = sel.passes
        sel.select_into(scores, masks, 200)
        assert sel.passes - before <= 4
        ref = select_masks(scores, k=200 / 4000, granularity="unstructured", scope="global")
        assert all(torch.equal(m, r) for m, r in zip(masks, ref))


def test_incremental_selection_reads_the_host_as_often_for_50_layers_as_for_2(monkeypatch):
    """Each host read (item/int/float/bool/tolist) waits for a GPU's queue: a re-selection must make a
    few, whatever the number of layers (it made several per layer per counting pass)."""
    from layers.selector import IncrementalTopK
    counts = {}
    for layers in (2, 50):
        g = torch.Generator().manual_seed(0)
        scores = [torch.randn(4000 // layers, generator=g) for _ in range(layers)]
        masks = [torch.empty_like(s, dtype=torch.bool) for s in scores]
        sel = IncrementalTopK()
        sel.select_into(scores, masks, 400)
        scores = [s + 1e-3 * torch.randn(s.shape, generator=g) for s in scores]
        calls = []
        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            original = getattr(torch.Tensor, name)

            def counted(self, *a, _original=original, **kw):
                calls.append(name)
                return _original(self, *a, **kw)
            monkeypatch.setattr(torch.Tensor, name, counted)
        sel.select_into(scores, masks, 400)
        monkeypatch.undo()
        counts[layers] = len(calls)
        ref = select_masks(scores, k=400 / sum(s.numel() for s in scores), granularity="unstructured",
                           scope="global")
        assert all(torch.equal(m, r) for m, r in zip(masks, ref))
    assert counts[2] == counts[50] <= 6, counts


def test_torchvision_model_converts_and_exports():
    import torchvision

    torch.manual_seed(0)
    dense = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    masked = to_masked(torchvision.models.resnet18(weights=None, num_classes=7), granularity="filter")
    masked.load_state_dict(dense.state_dict(), strict=False)  # test set-up only: scores/masks are new
    masked.eval()
    ms = MaskSet(masked, k=1.0, granularity="filter", scope="layer")
    assert len(ms.layers) == 20  # 20 convs; the classifier fc stays plain under filter masks (BiP)
    assert type(masked.fc) is nn.Linear
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(masked(x), dense(x))
    ms.k = 0.5
    ms.step(force=True)
    plain = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    plain.load_state_dict(dense_state_dict(masked), strict=True)
    torch.testing.assert_close(plain(x), masked(x))


@pytest.mark.parametrize("granularity", ["filter", "channel"])
def test_structured_masks_leave_linear_layers_plain_and_keep_every_class(granularity):
    model = to_masked(tiny_net(), granularity=granularity)
    assert type(model[7]) is nn.Linear and isinstance(model[0], MaskedConv2d)
    ms = MaskSet(model, k=0.2, granularity=granularity, scope="global")
    assert list(ms.layers) == ["0", "3"]
    # every class keeps its full row of the classifier: no output is constant
    x = torch.randn(16, 3, 6, 6)
    assert (model(x).std(0) > 0).all()
    assert type(to_masked(tiny_net(), granularity="unstructured")[7]) is MaskedLinear


@pytest.mark.parametrize("granularity", ["filter", "channel"])
def test_structured_global_selection_never_empties_a_layer_by_default(granularity):
    # layer "3"'s scores are tiny: without the default floor of one unit it would lose every unit
    model = to_masked(tiny_net(), granularity=granularity)
    ms = MaskSet(model, k=0.3, granularity=granularity, scope="global")
    assert ms.min_units == 1
    with torch.no_grad():
        ms.layers["0"].popup_scores.normal_().add_(10)
        ms.layers["3"].popup_scores.normal_().mul_(1e-3)
    ms.step(force=True)
    dim = 0 if granularity == "filter" else 1
    units = [l.mask.transpose(0, dim).flatten(1).all(1) for l in ms.layers.values()]
    assert [int(u.sum()) for u in units][1] == 1
    assert sum(int(u.sum()) for u in units) == n_keep(0.3, sum(u.numel() for u in units))
    ms0 = MaskSet(to_masked(tiny_net(), granularity=granularity), k=0.3, granularity=granularity, scope="global",
                  min_units=0)
    assert ms0.min_units == 0


@pytest.mark.parametrize("floor", [5, 1_000_000_000])
def test_floors_above_the_budget_are_refused(floor):
    from layers import SelectionError
    model = to_masked(tiny_net(), granularity="filter")   # 8 + 6 filters; k = 0.5 keeps 7
    with pytest.raises(SelectionError, match="--layer-floor"):
        MaskSet(model, k=0.5, granularity="filter", scope="global", min_units=floor)
    MaskSet(to_masked(tiny_net(), granularity="filter"), k=0.5, granularity="filter", scope="global", min_units=3)
