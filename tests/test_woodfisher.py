"""The WoodFisher trainer: exact counts per schedule event, pruned weights stay zero, optimizer state
of pruned weights cleared, OBS update scaling, gradient collection, one-shot, CLI end to end."""
import dataclasses
import glob
import os
from functools import partial

import pytest
import torch
from torch import nn

import train
from configs.errors import UserError
from layers import MaskSet, n_keep, to_masked
from engine.checkpoint import load_checkpoint
from pruning.fisher_inverse import EmpiricalFisherInverse
from pruning.flops import flops_budget, flops_per_weight, largest_prefix_within
from pruning.obs import obs_statistic, obs_update
from configs.options import WoodFisherOptions
from trainers.base import RunSpec
from trainers.woodfisher import PRUNE_METHODS, WoodFisherTrainer, plan
from tests.helpers import tiny
from tests.helpers.tiny import tiny_net


def check_plan(*, mode="prune", layer_type="unstructured", k=0.1, scope="global", epochs=5, **options):
    """The WoodFisher trainer's option check, as train.py runs it (the typed options, then the run)."""
    return plan(WoodFisherOptions(**options), run=RunSpec(mode=mode, layer_type=layer_type, k=k, scope=scope,
                                                           epochs=epochs))


def wf_trainer(model, ms, weights, **options):
    return WoodFisherTrainer(model=model, maskset=ms, mode="prune", device=CPU, weight_optim=weights, progress=False,
                             options=WoodFisherOptions(**options))

CPU = torch.device("cpu")
FAST = ["--batch-size", "128", "--no-progress", "--data-fraction", "0.3", "--lr", "0.05"]


tiny_loaders = partial(tiny.tiny_loaders, 48, batch_size=8)
sgd = partial(tiny.sgd, lr=0.05, momentum=0.9, epochs=5)


def make(granularity="unstructured", k=0.1, scope="global", weights=None, **options):
    # Unstructured: conv 1->4 then linear 64->6, both masked. Filter/channel masks act on convolutions
    # only, so the structured model has two: conv 1->4 (16 MACs per weight on 4x4 inputs) and conv 4->4
    # with stride 2 (4 MACs per weight), then a plain linear 16->6.
    model = tiny_net(granularity, convs=1 if granularity == "unstructured" else 2)
    ms = MaskSet(model, k=k, granularity=granularity, scope=scope)
    defaults = dict(prune_start=0, prune_freq=1, prune_end=3, init_sparsity=0.2, fisher_subsample_size=6,
                    fisher_mini_bsz=4, fittable_params=16, fisher_damp=1e-4)
    defaults.update(options)
    trainer = wf_trainer(model, ms, weights or sgd(epochs=max(defaults["prune_end"] + 1, 1)), **defaults)
    return model, ms, trainer


def kept_units(ms, granularity):
    out = []
    for layer in ms.layers.values():
        m = layer.mask
        if granularity == "unstructured":
            out.append(int(m.sum()))
        elif granularity == "filter":
            out.append(int(m.flatten(1).any(1).sum()))
        else:
            out.append(int(m.transpose(0, 1).flatten(1).any(1).sum()))
    return out


def total_units(ms, granularity):
    return ms.unit_counts()


@pytest.mark.parametrize("granularity,method,joint,blocks", [
    ("unstructured", "woodfisher", True, "chunk"),
    ("unstructured", "woodfisher", False, "layer"),
    ("unstructured", "woodfisher", True, "all"),
    ("unstructured", "woodtaylor", True, "chunk"),
    ("unstructured", "diagfisher", True, "chunk"),
    ("unstructured", "magnitude", True, "chunk"),
    ("unstructured", "globalmagnitude", True, "chunk"),
    ("filter", "woodfisher", True, "chunk"),
    ("channel", "woodfisher", False, "layer"),
    ("channel", "diagfisher", True, "chunk"),
])
def test_exact_kept_counts_after_each_event(granularity, method, joint, blocks):
    k = 0.3 if granularity != "unstructured" else 0.1
    model, ms, trainer = make(granularity, k=k, prune_method=method, woodbury_joint_sparsify=joint,
                              fisher_blocks=blocks)
    loaders = tiny_loaders()
    scope = PRUNE_METHODS[method].scope or ("global" if joint else "layer")
    units = total_units(ms, granularity)
    events = {e.epoch: e.sparsity for e in trainer.events}
    assert sorted(events) == [0, 1, 2, 3] and events[3] == pytest.approx(1 - k)
    previous = list(units)
    for epoch in range(4):
        trainer.set_epoch(epoch)
        trainer.train_epoch(epoch, loaders)
        density = k if epoch == 3 else 1 - events[epoch]
        kept = kept_units(ms, granularity)
        if scope == "global":
            assert sum(kept) == n_keep(density, sum(units)), (epoch, kept)
        else:
            assert kept == [n_keep(density, u) for u in units], (epoch, kept)
        assert all(a <= b for a, b in zip(kept, previous))  # nothing revived
        previous = kept
        for layer in ms.layers.values():  # masks are whole units, and pruned weights are exactly zero
            assert torch.equal(layer.weight[~layer.mask], torch.zeros(int((~layer.mask).sum())))
            if granularity == "filter":
                assert torch.equal(layer.mask.flatten(1).all(1), layer.mask.flatten(1).any(1))
            if granularity == "channel":
                m = layer.mask.transpose(0, 1).flatten(1)
                assert torch.equal(m.all(1), m.any(1))
    # the unit sparsity reached is exactly what the kept counts say (whole filters/channels are coarse)
    assert len(trainer.history) == 4 and trainer.history[-1]["sparsity"] == pytest.approx(1 - sum(kept) / sum(units))


def test_recompute_substeps_start_from_the_current_sparsity():
    model, ms, trainer = make(recompute_num=3, prune_end=1, init_sparsity=0.3)
    loaders = tiny_loaders()
    trainer.prune_to(0.3, epoch=0, loaders=loaders)
    assert [round(r["target"], 6) for r in trainer.history] == [0.1, 0.2, 0.3]
    trainer.prune_to(0.9, epoch=1, loaders=loaders)  # from 0.3 (current), not from 0
    assert [round(r["target"], 6) for r in trainer.history[3:]] == [0.5, 0.7, 0.9]
    assert sum(kept_units(ms, "unstructured")) == n_keep(0.1, 36 + 384)


def test_pruned_weights_stay_exactly_zero_and_momentum_is_cleared(monkeypatch):
    model, ms, trainer = make(weights=sgd(lr=0.1, momentum=0.9, wd=0.05), prune_end=3)
    loaders = tiny_loaders()
    layers = list(ms.layers.values())
    for batch in loaders.train:  # dense steps first: momentum buffers are non-zero everywhere
        trainer.step(batch)
    opt = trainer.optimizers["optimizer"]
    assert all(bool((opt.state[l.weight]["momentum_buffer"] != 0).all()) for l in layers)
    trainer.prune_to(0.6, epoch=0, loaders=loaders)
    for l in layers:
        pruned = ~l.mask
        assert int(pruned.sum()) > 0
        assert bool((opt.state[l.weight]["momentum_buffer"][pruned] == 0).all())  # cleared
        assert bool((opt.state[l.weight]["momentum_buffer"][l.mask] != 0).any())  # the rest kept
    # Masks are re-applied after every step: with the state clearing disabled, a second event leaves
    # stale momentum on the newly pruned weights, and still they stay exactly zero.
    monkeypatch.setattr(trainer, "clear_pruned_state", lambda: None)
    trainer.prune_to(0.8, epoch=1, loaders=loaders)
    assert any(bool((opt.state[l.weight]["momentum_buffer"][~l.mask] != 0).any()) for l in layers)
    for _ in range(3):
        for batch in loaders.train:
            trainer.step(batch)
    for l in layers:
        assert torch.equal(l.weight[~l.mask], torch.zeros(int((~l.mask).sum())))
        assert bool((l.weight[l.mask] != 0).all())


def test_pruned_weights_stay_zero_under_adam():
    model, ms, trainer = make(weights=sgd(lr=0.05, optimizer="adam", wd=0.01), prune_end=3)
    loaders = tiny_loaders()
    for batch in loaders.train:
        trainer.step(batch)
    trainer.prune_to(0.7, epoch=0, loaders=loaders)
    for batch in loaders.train:
        trainer.step(batch)
    for l in ms.layers.values():
        assert torch.equal(l.weight[~l.mask], torch.zeros(int((~l.mask).sum())))


@pytest.mark.parametrize("method", ["woodfisher", "woodtaylor"])
def test_scale_zero_leaves_survivors_untouched(method):
    weights = {}
    for scale in (0.0, 1.0):
        model, ms, trainer = make(prune_method=method, scale_prune_update=scale)
        before = {n: l.weight.detach().clone() for n, l in ms.layers.items()}
        trainer.prune_to(0.5, epoch=0, loaders=tiny_loaders())
        weights[scale] = {n: l.weight.detach().clone() for n, l in ms.layers.items()}
        masks = {n: l.mask.clone() for n, l in ms.layers.items()}
        for n in before:
            assert bool((weights[scale][n][~masks[n]] == 0).all())
            if scale == 0.0:
                assert torch.equal(weights[scale][n][masks[n]], before[n][masks[n]])
    # ... while with scale 1 the OBS update does move the survivors
    assert any(not torch.equal(weights[0.0][n], weights[1.0][n]) for n in weights[0.0])


def test_gradient_rows_are_minibatch_means_with_pruned_columns_zero():
    model, ms, trainer = make(fisher_subsample_size=3, fisher_mini_bsz=5)
    loaders = tiny_loaders()
    layers = list(ms.layers.values())
    with torch.no_grad():
        layers[1].mask[0, :10] = False
    G = trainer.collect_gradients(loaders, epoch=0)
    assert G.shape == (3, 36 + 384)
    # the same rows with mini-batches split into chunks of 2 (accumulated in place)
    chunked = wf_trainer(model, ms, sgd(epochs=4), prune_end=3, fisher_subsample_size=3, fisher_mini_bsz=5,
                         max_mini_bsz=2)
    torch.testing.assert_close(chunked.collect_gradients(loaders, epoch=0), G, rtol=1e-5, atol=1e-7)
    # row 0 by hand: the mean loss gradient over the first 5 samples of the Fisher stream, in eval mode
    batch = next(trainer.fisher_batches(loaders, epoch=0, substep=0))
    batch = batch[0][:5], batch[1][:5]
    model.eval()
    loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
    grads = torch.autograd.grad(loss, [l.weight for l in layers])
    torch.testing.assert_close(G[0], torch.cat([g.reshape(-1) for g in grads]), rtol=1e-5, atol=1e-7)
    assert bool((G[:, 36:46] == 0).all()) and bool((G[:, 46:] != 0).any())


def test_true_fisher_samples_labels_from_the_model_reproducibly():
    model, ms, trainer = make(true_fisher=True, fisher_subsample_size=4, fisher_mini_bsz=3)
    loaders = tiny_loaders()
    G = trainer.collect_gradients(loaders, epoch=0)
    torch.testing.assert_close(trainer.collect_gradients(loaders, epoch=0), G, rtol=0, atol=0)  # seeded
    empirical = wf_trainer(model, ms, sgd(epochs=4), prune_end=3, fisher_subsample_size=4, fisher_mini_bsz=3)
    assert not torch.allclose(empirical.collect_gradients(loaders, epoch=0), G)


def test_one_shot_prunes_once_and_takes_no_optimizer_step(monkeypatch):
    model, ms, trainer = make(one_shot=True, k=0.25, weights=sgd(epochs=1))
    opt = trainer.optimizers["optimizer"]
    calls = []
    monkeypatch.setattr(opt, "step", lambda *a, **kw: calls.append(1))
    bn = model[1].running_mean.clone()
    trainer.set_epoch(0)
    metrics = trainer.train_epoch(0, tiny_loaders())
    assert calls == [] and not opt.state
    assert torch.equal(model[1].running_mean, bn)  # no training-mode forward either
    assert len(trainer.history) == 1
    assert sum(kept_units(ms, "unstructured")) == n_keep(0.25, 420)
    assert set(metrics) == {"loss", "top1", "top5"}


@pytest.mark.parametrize("kwargs,needle", [
    (dict(prune_method="woodtaylor", layer_type="filter"), "does not support --layer-type filter"),
    (dict(prune_method="woodfishr"), "did you mean 'woodfisher'"),
    (dict(layer_type="channel", fisher_blocks="all"), "whole-layer Fisher blocks"),
    (dict(flops_power=-1.0), "--flops-power must be a finite number >= 0"),
    (dict(flops_target=0.3), "leave --k at 1"),
    (dict(flops_target=0.3, k=1.0, target_sparsity=0.5), "pass only --flops-target"),
    (dict(flops_target=1.0, k=1.0), "nothing to prune"),
    (dict(flops_target=1.5, k=1.0), "in (0, 1)"),
    (dict(flops_target=0.3, k=1.0, prune_method="magnitude"), "--prune-method globalmagnitude"),
    (dict(flops_target=0.3, k=1.0, woodbury_joint_sparsify=False), "drop --no-woodbury-joint-sparsify"),
    (dict(flops_target=0.3, k=1.0, init_sparsity=0.8), "FLOPs sparsity"),
    (dict(target_sparsity=0.8), "disagrees with --k"),
    (dict(prune_end=9), "--epochs 10"),
    (dict(prune_start=4, prune_end=2), "--prune-end"),
    (dict(one_shot=True), "--epochs 1"),
    (dict(scope="layer"), "--no-woodbury-joint-sparsify"),
    (dict(mode="finetune"), "--exp-mode prune"),
])
def test_bad_combinations_are_user_errors(kwargs, needle):
    settings = dict(prune_end=3)
    settings.update(kwargs)
    with pytest.raises(UserError) as info:
        check_plan(**settings)
    assert needle in str(info.value)


@pytest.mark.parametrize("dataset", ["Digits", "CIFAR10", "ImageNet"])
def test_shipped_configs_pass_the_woodfisher_checks(dataset):
    from configs.schema import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(["--configs", os.path.join(root, "configs", dataset, "woodfisher.yml"), "--source-net", "x"])
    assert cfg.trainer == "woodfisher"
    settled = plan(WoodFisherOptions.of(cfg), run=RunSpec(mode=cfg.exp_mode, layer_type=cfg.layer_type, k=cfg.k,
                                                           scope=cfg.scope, epochs=cfg.epochs))
    assert settled.events[-1].sparsity == pytest.approx(1 - cfg.k)


# -- train.py end to end on Digits (source: the session's digits_pretrained, tests/conftest.py) ---
def test_cli_end_to_end_reaches_the_exact_target(tmp_path, digits_pretrained):
    args = ["--result-dir", str(tmp_path), "--exp-name", "w", "--exp-mode", "prune", "--trainer", "woodfisher",
            "--k", "0.2", "--source-net", digits_pretrained, "--epochs", "2", "--prune-start", "0", "--prune-freq", "1",
            "--prune-end", "1", "--init-sparsity", "0.5", "--fisher-subsample-size", "8", "--fisher-mini-bsz", "4",
            "--fittable-params", "256", "--disable-wdecay-after-prune", *FAST]
    assert train.main(args) == 0
    run_dir = glob.glob(str(tmp_path / "w" / "prune" / "*"))[0]
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):  # model_best only among epochs at the target
        ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint", name))
        assert ckpt["epoch"] == 2 and ckpt["masks_frozen"] is True
        masks = ckpt["masks"]
        total = sum(m.numel() for m in masks.values())
        assert sum(int(m.sum()) for m in masks.values()) == n_keep(0.2, total)
        for layer, mask in masks.items():
            w = ckpt["state_dict"][f"{layer}.weight"]
            assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
        assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 0.0  # disabled after the last event
    log = open(os.path.join(run_dir, "run.log")).read()
    assert log.count("prune epoch") == 2 and "peak memory" in log


def test_cli_unsupported_combination_exits_2_and_writes_nothing(tmp_path, capsys, digits_pretrained):
    code = train.main(["--result-dir", str(tmp_path / "res"), "--exp-mode", "prune", "--trainer", "woodfisher",
                       "--k", "0.5", "--source-net", digits_pretrained, "--layer-type", "filter", "--prune-method",
                       "woodtaylor", "--epochs", "2", "--prune-end", "1", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "woodtaylor" in err and err.count("\n") == 1
    assert not (tmp_path / "res").exists()


# -- FLOPs-aware pruning (--flops-power, --flops-target) ---------------------------------------------
def test_flops_per_weight_by_hand():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False),  # 5x6 -> 5x6: 30 MACs per weight
                          nn.BatchNorm2d(4),
                          nn.Conv2d(4, 2, 3, stride=2, padding=1),  # -> 3x3: 9
                          nn.Flatten(), nn.Linear(18, 3))  # 1 per sample
    to_masked(model, granularity="unstructured")
    model.train()
    layers = MaskSet(model, k=1.0, granularity="unstructured", scope="global").layers
    bn = model[1].running_mean.clone()
    assert flops_per_weight(model, example=torch.randn(2, 1, 5, 6), layers=layers) == {"0": 30, "2": 9, "4": 1}
    assert model.training and torch.equal(model[1].running_mean, bn)  # eval-mode probe, mode restored

    class Shared(nn.Module):  # a linear layer on a sequence (7 positions), called twice
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)

        def forward(self, x):
            return self.fc(self.fc(x))

    shared = Shared()
    assert flops_per_weight(shared, example=torch.randn(3, 7, 5), layers={"fc": shared.fc}) == {"fc": 14}


def test_flops_budget_and_prefix_search():
    assert flops_budget(0.3, 1000) == 300 and flops_budget(0.29, 100) == 29  # 28.999999999999996 -> 29
    assert flops_budget(1.0, 7) == 7
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        costs = torch.randint(0, 20, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)
        budget = int(torch.randint(0, int(costs.sum()) + 5, (1,), generator=g))
        n = largest_prefix_within(costs, budget)
        assert int(costs[:n].sum()) <= budget  # within the budget ...
        assert n == costs.numel() or int(costs[:n + 1].sum()) > budget  # ... and the next unit would exceed it
    assert largest_prefix_within(torch.tensor([5, 1, 1]), 4) == 0  # a prefix: the cheap units later do not count
    assert largest_prefix_within(torch.tensor([5, 1, 1]), 6) == 2


def two_layer_trainer(*, method="globalmagnitude", flops_power=0.0, granularity="unstructured", k=0.5):
    """Conv 1->2 (18 weights, 16 MACs each on 4x4 inputs) then linear 32->4 (128 weights, 1 MAC each);
    conv weights 0.5, linear weights 0.4: by magnitude alone the linear layer's weights go first."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(32, 4, bias=False))
    to_masked(model, granularity=granularity)
    with torch.no_grad():
        model[0].weight.fill_(0.5)
        model[2].weight.fill_(0.4)
    ms = MaskSet(model, k=k, granularity=granularity, scope="global")
    trainer = wf_trainer(model, ms, sgd(epochs=2), prune_method=method, prune_end=1, flops_power=flops_power)
    return ms, trainer


def test_flops_power_prunes_the_flop_heavy_layer_first():
    loaders = tiny_loaders()
    pruned = {}
    for power in (0.0, 0.5, 1.0):
        ms, trainer = two_layer_trainer(flops_power=power)
        trainer.prune_to(0.07, epoch=0, loaders=loaders)  # floor(0.07 * 146) = 10 weights pruned
        assert trainer.flops == ({"0": 16, "2": 1} if power else None)  # measured only when used
        pruned[power] = [int((~l.mask).sum()) for l in ms.layers.values()]
    assert pruned[0.0] == [0, 10]  # 0.4^2 < 0.5^2: the linear layer loses
    assert pruned[0.5] == pruned[1.0] == [10, 0]  # 0.25 / 16^p < 0.16: the FLOP-heavy conv loses


@pytest.mark.parametrize("method,granularity", [
    ("woodfisher", "unstructured"), ("woodtaylor", "unstructured"), ("diagfisher", "unstructured"),
    ("magnitude", "unstructured"), ("woodfisher", "filter"), ("diagfisher", "channel"),
    ("globalmagnitude", "filter"),
])
def test_flops_power_keeps_the_count_and_moves_pruning_to_heavy_layers(method, granularity):
    loaders = tiny_loaders()
    k = 0.5 if granularity != "unstructured" else 0.4
    conv_kept, kept = {}, {}
    for power in (0.0, 1.0):
        model, ms, trainer = make(granularity, k=k, prune_method=method, flops_power=power, prune_end=1)
        trainer.prune_to(1 - k, epoch=1, loaders=loaders)
        kept[power] = kept_units(ms, granularity)
        conv_kept[power] = kept[power][0]
    units = total_units(ms, granularity)
    scope = PRUNE_METHODS[method].scope or "global"
    for power in kept:  # the unit count is still n_keep at the event's density
        if scope == "global":
            assert sum(kept[power]) == n_keep(k, sum(units))
        else:
            assert kept[power] == [n_keep(k, u) for u in units]
    if scope == "global" and granularity != "channel":  # the first conv (16 MACs per weight) loses more
        assert conv_kept[1.0] < conv_kept[0.0], conv_kept
    elif scope == "global":  # its single input channel: never more than without the weighting
        assert conv_kept[1.0] <= conv_kept[0.0], conv_kept
    else:  # per layer a constant factor changes nothing
        assert conv_kept[1.0] == conv_kept[0.0]


def kept_flops(ms, flops):
    return sum(int(l.mask.sum()) * flops[n] for n, l in ms.layers.items())


def test_flops_target_search_meets_the_budget_with_a_single_update(monkeypatch):
    model, ms, trainer = make(k=1.0, flops_target=0.4, prune_end=1, init_sparsity=0.3)
    loaders = tiny_loaders()
    G = trainer.collect_gradients(loaders, epoch=1)
    monkeypatch.setattr(trainer, "collect_gradients", lambda *a, **kw: G.clone())  # the same G for our check
    calls = []
    update = trainer.method.update

    def counting_update(**kwargs):
        calls.append(1)
        return update(**kwargs)

    trainer.method = dataclasses.replace(trainer.method, update=counting_update)
    layers = list(ms.layers.values())
    w0 = [l.weight.detach().clone() for l in layers]
    final = trainer.events[-1].sparsity
    trainer.prune_to(final, epoch=1, loaders=loaders)
    # ONE update per Fisher unit (here: per layer) for the whole event, not one per search step
    assert len(calls) == len(trainer.solver().groups) == 2
    flops = {"0": 16, "4": 1}  # conv 1->4 on 4x4 inputs, then the linear layer
    assert trainer.flops == flops
    dense = 36 * 16 + 384 * 1
    budget = int(0.4 * dense)  # 384
    kept = kept_flops(ms, flops)
    record = trainer.history[-1]
    assert record["flops_budget"] == budget and record["flops_kept"] == pytest.approx(kept / dense)
    assert kept <= budget < kept + record["flops_next"]
    # The same by hand: rank all weights by the OBS statistic of the same Fisher; the kept set is the
    # longest prefix within the budget, and the next weight in rank order would exceed it.
    invs = [EmpiricalFisherInverse(G[:, :36], block_size=16, damp=1e-4),
            EmpiricalFisherInverse(G[:, 36:], block_size=16, damp=1e-4)]
    stat = torch.cat([obs_statistic(weight=w, fisher_inverse=inv).reshape(-1) for w, inv in zip(w0, invs)])
    cost = torch.tensor([16] * 36 + [1] * 384)
    order = torch.sort(stat, descending=True, stable=True).indices
    n = int(torch.cat([l.mask.reshape(-1) for l in layers]).sum())
    cumulative = torch.cumsum(cost[order], 0)
    assert int(cumulative[n - 1]) == kept <= budget < int(cumulative[n])
    expected_keep = torch.zeros(420, dtype=torch.bool)
    expected_keep[order[:n]] = True
    assert torch.equal(torch.cat([l.mask.reshape(-1) for l in layers]), expected_keep)
    # ... and the weights are exactly one (joint, the default) OBS update's result for that set
    for layer, w, inv in zip(layers, w0, invs):
        one = obs_update(weight=w, fisher_inverse=inv, prune=~layer.mask, joint=True)
        torch.testing.assert_close(layer.weight.detach(), one, rtol=1e-5, atol=1e-6)
    assert "FLOPs kept 100.00% -> " in trainer.pop_notes()[-1]


def test_flops_target_schedule_runs_over_flops_with_groups():
    model, ms, trainer = make("filter", k=1.0, prune_method="diagfisher", flops_target=0.5, flops_power=0.5,
                              init_sparsity=0.2, prune_end=2, recompute_num=2)
    loaders = tiny_loaders()
    assert trainer.flops is None or trainer.flops == {"0": 16, "3": 4}
    dense = 36 * 16 + 144 * 4
    for epoch, event in enumerate(trainer.events):
        trainer.set_epoch(epoch)
        trainer.prune_to(event.sparsity, epoch=epoch, loaders=loaders)
        kept = kept_flops(ms, trainer.flops)
        budget = flops_budget(0.5 if epoch == 2 else 1 - event.sparsity, dense)
        assert kept <= budget
        steps = [r for r in trainer.history if r["epoch"] == epoch]
        # Whole filters are coarse (144 FLOPs per conv filter): a step may already be below the next
        # event's budget, and then that event has nothing to do.
        if steps:
            assert len(steps) == 2 and steps[-1]["flops_budget"] == budget
            assert kept <= budget < kept + steps[-1]["flops_next"]
        for layer in ms.layers.values():  # whole filters
            assert torch.equal(layer.mask.flatten(1).all(1), layer.mask.flatten(1).any(1))
    assert [r["epoch"] for r in trainer.history] == [0, 0, 1, 1]
    assert trainer.history[0]["target"] == pytest.approx(0.1)  # sub-steps from the current FLOPs sparsity 0


def test_cli_flops_target_end_to_end(tmp_path, digits_pretrained):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["--configs", os.path.join(root, "configs", "Digits", "woodfisher.yml"), "--source-net", digits_pretrained,
            "--epochs", "2", "--prune-end", "1", "--data-fraction", "0.3", "--no-progress",
            "--result-dir", str(tmp_path), "--flops-target", "0.3", "--k", "1.0",
            "--fisher-subsample-size", "16"]  # the gradients are most of the time: 16 of them keep the test light
    assert train.main(args) == 0
    run_dir = glob.glob(str(tmp_path / "*" / "prune" / "*"))[0]
    from models import build_model

    model = to_masked(build_model("smallcnn", num_classes=10, in_channels=1, image_size=8), granularity="unstructured")
    layers = MaskSet(model, k=1.0, granularity="unstructured", scope="global").layers
    flops = flops_per_weight(model, example=torch.zeros(1, 1, 8, 8), layers=layers)
    assert flops == {"conv1": 64, "conv2": 64, "conv3": 16, "fc1": 1, "fc2": 1}
    dense = sum(l.weight.numel() * flops[n] for n, l in layers.items())
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):  # model_best only at the final masks
        ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint", name))
        assert ckpt["epoch"] == 2
        masks = ckpt["masks"]
        kept = sum(int(m.sum()) * flops[n] for n, m in masks.items())
        assert 0.29 < kept / dense <= 0.3
    log = open(os.path.join(run_dir, "run.log")).read()
    events = [line for line in log.splitlines() if "prune epoch" in line]
    assert sum("FLOPs kept" in line for line in events) == 2 and "(target 30.00%)" in log


def test_cli_flops_target_with_a_weight_target_exits_2(tmp_path, capsys, digits_pretrained):
    code = train.main(["--result-dir", str(tmp_path / "res"), "--exp-mode", "prune", "--trainer", "woodfisher",
                       "--k", "0.5", "--flops-target", "0.3", "--source-net", digits_pretrained, "--epochs", "2",
                       "--prune-end", "1", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "--k" in err and err.count("\n") == 1
    assert not (tmp_path / "res").exists()


def test_each_method_has_its_own_default_damp():
    common = dict(epochs=2, prune_end=1)
    assert check_plan(**common).damp == 1e-5
    # WoodTaylor's Newton step collapses the network at 1e-5 (Digits: chance accuracy); 1 works
    assert check_plan(**common, prune_method="woodtaylor").damp == 1.0
    assert check_plan(**common, prune_method="woodtaylor", fisher_damp=1e-3).damp == 1e-3


@pytest.mark.parametrize("method,kept", [("l1", [1, 0, 1, 0]), ("magnitude", [0, 1, 0, 1])])
def test_l1_ranks_filters_by_the_sum_of_their_absolute_weights(method, kept):
    """Li et al. 2017: even filters (all weights 0.4: L1 3.6 / 14.4, L2 1.2 / 2.4 in the 1- and 4-channel convs)
    beat odd ones (one weight of 3: L1 3, L2 3) by L1 and lose by the L2 norm that magnitude ranks units by."""
    model = tiny_net("filter", width=4, convs=2)
    with torch.no_grad():
        for conv in (model[0], model[3]):
            conv.weight.zero_()
            conv.weight[0::2] = 0.4
            conv.weight[1::2, 0, 0, 0] = 3.0
    ms = MaskSet(model, k=0.5, granularity="filter", scope="layer")
    trainer = wf_trainer(model, ms, sgd(epochs=2), prune_method=method, prune_start=0, prune_freq=1, prune_end=1,
                         init_sparsity=0.5)
    trainer.prune_to(0.5, epoch=0, loaders=tiny_loaders())
    assert [[int(v) for v in layer.mask.flatten(1).any(1)] for layer in ms.layers.values()] == [kept, kept]


def test_l1_is_a_unit_criterion_and_refuses_single_weights():
    from pruning.methods import PRUNE_METHODS
    assert PRUNE_METHODS["l1"].granularities == ("filter", "channel")
    with pytest.raises(UserError, match="--prune-method l1 does not support --layer-type unstructured"):
        make("unstructured", prune_method="l1")


def test_random_prunes_the_same_weights_for_the_same_weights_and_not_by_magnitude():
    def masks(seed_of_weights):
        model, ms, trainer = make("unstructured", k=0.5, prune_method="random", prune_end=1)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed_of_weights)
            for layer in ms.layers.values():
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
        before = {n: l.weight.detach().clone() for n, l in ms.layers.items()}
        trainer.prune_to(0.5, epoch=0, loaders=tiny_loaders())
        return {n: l.mask.clone() for n, l in ms.layers.items()}, before

    a, weights = masks(0)
    b, _ = masks(0)
    c, _ = masks(1)
    assert all(torch.equal(a[n], b[n]) for n in a)  # a function of the weights: ranks, resume, reruns agree
    assert any(not torch.equal(a[n], c[n]) for n in a)
    for name, w in weights.items():  # per layer, exact; and not the magnitude order
        assert int(a[name].sum()) == n_keep(0.5, a[name].numel())
        by_size = w.abs() >= w.abs().flatten().kthvalue(w.numel() - n_keep(0.5, w.numel()) + 1).values
        assert int(by_size.sum()) == int(a[name].sum()) and not torch.equal(a[name], by_size)
