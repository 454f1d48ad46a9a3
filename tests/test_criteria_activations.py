"""Criteria that read the model: APoZ (Hu et al. 2016) and mean activation (Molchanov et al. 2017) from the
post-ReLU outputs on calibration samples, Network Slimming (Liu et al. 2017) from BatchNorm gammas, and the
--bn-l1 penalty; each against a hand computation on a tiny layer, through the solver, the WoodFisher trainer
and train.py."""
import os
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from configs.errors import UserError
from configs.options import WoodFisherOptions
from layers import MaskSet, n_keep, to_masked
from pruning.activations import UnitProbe, activation_stats, batchnorm_gammas, followers
from pruning.methods import PRUNE_METHODS
from pruning.obs import apoz_statistic, meanact_statistic, slimming_statistic
from pruning.solver import OBSSolver
from tests.helpers import tiny
from tests.helpers.tiny import tiny_net
from trainers.base import BaseTrainer, RunSpec
from trainers.woodfisher import WoodFisherTrainer, plan

CPU = torch.device("cpu")
tiny_loaders = partial(tiny.tiny_loaders, 48, batch_size=8)
NEW = ("apoz", "meanact", "slimming")


def kept_filters(layer):
    return layer.mask.flatten(1).any(1)


def trainer(model, ms, method, **options):
    defaults = dict(prune_method=method, prune_start=0, prune_freq=1, prune_end=3, init_sparsity=0.2,
                    fisher_subsample_size=6, fisher_mini_bsz=4, woodbury_joint_sparsify=method == "slimming")
    defaults.update(options)
    return WoodFisherTrainer(model=model, maskset=ms, mode="prune", device=CPU, progress=False,
                             weight_optim=tiny.sgd(lr=0.05, momentum=0.9, epochs=defaults["prune_end"] + 1),
                             options=WoodFisherOptions(**defaults))


class TwoBN(nn.Module):
    """conv(1->4)-BN-ReLU, conv(4->6)-BN-F.relu (a functional ReLU), pool, linear: two convs with a BatchNorm."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1, self.act = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


class Residual(nn.Module):
    """conv -> BN -> + x -> ReLU: the filter has no ReLU of its own (the add comes first)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 1, 3, padding=1, bias=False), nn.BatchNorm2d(1), nn.Linear(1, 6)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x)) + x).mean((2, 3)))


# -- the statistics on hand-made numbers ---------------------------------------------------------------------
def test_apoz_and_meanact_from_hand_made_counts():
    """Four filters, 8 outputs each: zeros 0, 2, 8, 5 -> 1 - APoZ = 1, 0.75, 0 (alive: finfo.tiny), 0.375."""
    probe = UnitProbe(zeros=torch.tensor([0.0, 2, 8, 5], dtype=torch.float64),
                      total=torch.tensor([4.0, 1, 0, 2], dtype=torch.float64), count=8)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    apoz = apoz_statistic(weight=w, group_size=18, probe=probe)
    tiny_ = torch.finfo(torch.float64).tiny
    assert torch.equal(apoz, torch.tensor([1.0, 0.75, tiny_, 0.375], dtype=torch.float64))
    mean = meanact_statistic(weight=w, group_size=18, probe=probe, mask=torch.tensor([True, True, True, False]))
    assert torch.equal(mean, torch.tensor([0.5, 0.125, tiny_, 0.0], dtype=torch.float64))  # filter 3 pruned: 0
    gamma = slimming_statistic(weight=w, group_size=18, probe=UnitProbe(gamma=torch.tensor([-2.0, 0.5, 0.0, 1.0])))
    assert torch.equal(gamma, torch.tensor([2.0, 0.5, tiny_, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="apoz needs probe"):
        apoz_statistic(weight=w, group_size=18)


def test_activation_counts_of_an_identity_conv_are_the_zeros_of_the_hand_made_inputs():
    """A 1x1 identity conv then ReLU: the activation is relu(x), so its zeros are the inputs <= 0."""
    model = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).double()
    to_masked(model, granularity="filter")
    ms = MaskSet(model, k=0.5, granularity="filter", scope="layer")
    with torch.no_grad():
        ms.layers["0"].mask.fill_(True)
        ms.layers["0"].weight.copy_(torch.eye(2, dtype=torch.float64).view(2, 2, 1, 1))
    # channel 0: 1, -1, 0, 2 | 3, 0, 0, -5 -> 5 zeros of 8, sum 6; channel 1: all positive except one -> 1 zero, sum 14
    x = torch.tensor([[[[1.0, -1], [0, 2]], [[1, 2], [3, -4]]],
                      [[[3.0, 0], [0, -5]], [[1, 2], [3, 2]]]], dtype=torch.float64)
    batches = [(x[:1], torch.zeros(1)), (x[1:], torch.zeros(1)), (x, torch.zeros(2))]  # the third is not read
    probe = activation_stats(model, ms.layers, batches, samples=2, device=CPU, criterion="apoz")["0"]
    assert probe.count == 8 and torch.equal(probe.zeros, torch.tensor([5.0, 1.0], dtype=torch.float64))
    assert torch.equal(probe.total, torch.tensor([6.0, 14.0], dtype=torch.float64))
    assert model.training  # restored


def test_activation_counts_equal_the_relu_outputs_of_conv_bn_relu_in_eval_mode():
    """tiny_net: conv -> BN -> ReLU module, conv -> ReLU module; counts from explicit forwards, BN in eval mode."""
    model = tiny_net("filter", convs=2).double()
    ms = MaskSet(model, k=0.5, granularity="filter", scope="layer")
    for layer in ms.layers.values():
        layer.mask.fill_(True)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        model[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        model[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 0.1]))
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    probes = activation_stats(model, ms.layers, [(x, None) for x in xs], samples=12, device=CPU, criterion="meanact")
    x = torch.cat(xs)[:12]
    model.eval()
    with torch.no_grad():
        a0 = torch.relu(model[1](model[0](x)))
        a1 = torch.relu(model[3](a0))
    model.train()
    for name, a in (("0", a0), ("3", a1)):
        per_filter = a.transpose(0, 1).reshape(a.shape[1], -1)
        assert probes[name].count == per_filter.shape[1]
        assert torch.equal(probes[name].zeros, (per_filter == 0).sum(1).double())
        assert torch.allclose(probes[name].total, per_filter.sum(1), rtol=1e-12)


def test_followers_find_a_functional_relu_and_the_batchnorm_in_the_graph():
    from models import build_model

    model = build_model("smallcnn", num_classes=10, in_channels=1)  # F.relu(self.bn1(self.conv1(x))), ...
    to_masked(model, granularity="filter")
    follow = followers(model, ["conv1", "conv2", "conv3"], criterion="apoz")
    assert [f.norm for f in follow.values()] == ["bn1", "bn2", "bn3"]
    assert all(f.activation is torch.relu and f.problem is None for f in follow.values())


# -- through the solver ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["apoz", "meanact"])
def test_solver_keeps_the_filters_with_the_best_activation_statistic(method):
    model = tiny_net("filter", convs=2).double()
    ms = MaskSet(model, k=0.5, granularity="filter", scope="layer")
    for layer in ms.layers.values():
        layer.mask.fill_(True)
    solver = OBSSolver(ms.layers, granularity="filter", method=PRUNE_METHODS[method])
    with pytest.raises(ValueError, match="call probe"):
        solver.scores()
    g = torch.Generator().manual_seed(5)
    solver.probe(model, [(torch.randn(16, 1, 4, 4, generator=g, dtype=torch.float64), None)], samples=16)
    before = {n: layer.weight.detach().clone() for n, layer in ms.layers.items()}
    want = {}
    for name, p in solver.probes.items():
        want[name] = 1 - p.zeros / p.count if method == "apoz" else p.total / p.count
        assert torch.allclose(solver.scores()[name].flatten(1).square().sum(1), want[name], rtol=1e-10, atol=1e-300)
    masks = solver.prune_to(0.5, scope="layer")
    for name, layer in ms.layers.items():
        largest = torch.zeros(4, dtype=torch.bool)
        largest[want[name].topk(n_keep(0.5, 4)).indices] = True
        assert torch.equal(kept_filters(layer), largest), name
        assert torch.equal(layer.weight.detach(), before[name] * masks[name])  # no compensation
    assert solver.record.solve == "none" and solver.G is None


def test_slimming_ranks_filters_by_hand_set_gamma_over_all_layers():
    model = TwoBN().double()
    to_masked(model, granularity="filter")
    ms = MaskSet(model, k=0.5, granularity="filter", scope="global")
    for layer in ms.layers.values():
        layer.mask.fill_(True)
    gammas = {"conv1": [0.9, -0.05, 0.3, -1.2], "conv2": [0.01, -0.6, 0.2, 0.8, -0.02, 0.4]}
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor(gammas["conv1"]))
        model.bn2.weight.copy_(torch.tensor(gammas["conv2"]))
    probes = batchnorm_gammas(model, ms.layers, criterion="slimming")
    assert torch.equal(probes["conv2"].gamma, model.bn2.weight.detach())
    solver = OBSSolver(ms.layers, granularity="filter", method=PRUNE_METHODS["slimming"])
    solver.probe(model)
    solver.prune_to(0.5, scope="global")
    # 5 of 10 by |gamma| over both layers: 1.2, 0.9, 0.8, 0.6, 0.4
    assert kept_filters(ms.layers["conv1"]).tolist() == [True, False, False, True]
    assert kept_filters(ms.layers["conv2"]).tolist() == [False, True, False, True, False, True]


# -- through the trainer ----------------------------------------------------------------------------------------
# (exact per-layer counts after each event: tests/test_criteria_second_order.py, for apoz and meanact too)


def test_slimming_keeps_exact_global_counts_after_each_event():
    model = TwoBN()
    to_masked(model, granularity="filter")
    ms = MaskSet(model, k=0.3, granularity="filter", scope="global")
    t = trainer(model, ms, "slimming")
    assert t.scope == "global"
    events = {e.epoch: e.sparsity for e in t.events}
    for epoch in range(4):
        t.set_epoch(epoch)
        t.prune_to(events[epoch], epoch=epoch, loaders=None)  # gammas only: no samples needed
        density = 0.3 if epoch == 3 else 1 - events[epoch]
        assert sum(int(kept_filters(layer).sum()) for layer in ms.layers.values()) == n_keep(density, 10)
    assert t.pop_notes()[-1].startswith("prune epoch 3 step 1/1: slimming (global)")


# -- refusals ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("layer_type", ["channel", "unstructured", "nm"])
def test_filter_only_criteria_refuse_other_granularities_with_one_line(method, layer_type):
    assert PRUNE_METHODS[method].granularities == ("filter",)
    with pytest.raises(UserError, match=f"--prune-method {method} does not support --layer-type {layer_type}") as e:
        plan(WoodFisherOptions(prune_method=method, prune_end=1),
             run=RunSpec(mode="prune", layer_type=layer_type, k=0.5, scope="layer", epochs=2))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["apoz", "meanact"])
def test_a_filter_without_a_relu_of_its_own_is_refused_naming_exclude_layers(method):
    model = Residual()
    to_masked(model, granularity="filter")
    ms = MaskSet(model, k=0.5, granularity="filter", scope="layer")
    solver = OBSSolver(ms.layers, granularity="filter", method=PRUNE_METHODS[method])
    with pytest.raises(UserError, match="keep such layers dense with --exclude-layers conv$") as e:
        solver.probe(model, [(torch.randn(2, 1, 4, 4), None)], samples=2)
    assert "\n" not in str(e.value) and "add" in str(e.value)


def test_slimming_refuses_a_conv_without_batchnorm_naming_exclude_layers():
    model = tiny_net("filter", convs=2)  # conv "3" -> ReLU, no BatchNorm
    ms = MaskSet(model, k=0.5, granularity="filter", scope="global")
    t = trainer(model, ms, "slimming")
    with pytest.raises(UserError, match="slimming needs a BatchNorm after every masked layer, but 3: its output goes to 4, not a BatchNorm; keep such layers dense with --exclude-layers 3$") as e:
        t.prune_to(t.events[0].sparsity, epoch=0, loaders=None)
    assert "\n" not in str(e.value)
    model = tiny_net("filter", convs=2, exclude=["3"])
    ms = MaskSet(model, k=0.5, granularity="filter", scope="global")
    trainer(model, ms, "slimming").prune_to(0.5, epoch=0, loaders=None)  # kept dense: accepted


# -- --bn-l1 ------------------------------------------------------------------------------------------------------
def test_bn_l1_adds_lambda_sign_gamma_to_the_loss_gradient_of_every_batchnorm_weight():
    lam, lr = 0.03, 0.1
    model = TwoBN().double()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([1.0, -0.5, 0.0, 2.0]))  # sign(0) = 0: no push on a zero gamma
    reference = TwoBN().double()
    reference.load_state_dict(model.state_dict())
    t = BaseTrainer(model=model, maskset=None, mode="pretrain", device=CPU, progress=False, bn_l1=lam,
                    weight_optim=tiny.sgd(lr=lr, epochs=1))
    x, y = tiny.tiny_batch(7, n=8, num_classes=6)
    x = x.double()
    gammas = [reference.bn1.weight, reference.bn2.weight]
    loss = F.cross_entropy(reference(x), y)  # train mode: batch statistics, as the step's forward
    grads = torch.autograd.grad(loss, gammas)
    before = [g.detach().clone() for g in gammas]
    t.step((x, y))
    for bn, g, old in zip((model.bn1, model.bn2), grads, before):
        want = g + lam * torch.sign(old)
        assert torch.allclose(bn.weight.grad, want, rtol=1e-10, atol=1e-14)
        assert torch.allclose(bn.weight.detach(), old - lr * want, rtol=1e-10, atol=1e-14)  # plain SGD took it
    assert bn.bias.grad is not None and model.conv1.weight.grad is not None  # nothing else penalised:
    g_bias = torch.autograd.grad(F.cross_entropy(reference(x), y), reference.bn2.bias)[0]
    assert torch.allclose(model.bn2.bias.grad, g_bias, rtol=1e-10, atol=1e-14)


def test_bn_l1_refuses_a_model_whose_batchnorm_does_not_train():
    for model, freeze, why in ((TwoBN(), True, "--freeze-bn keeps them fixed"),
                               (tiny_net(None, batch_norm=False), False, "the model has none")):
        with pytest.raises(UserError, match=f"--bn-l1 .* but {why}: drop --bn-l1"):
            BaseTrainer(model=model, maskset=None, mode="pretrain", device=CPU, progress=False, bn_l1=0.1,
                        weight_optim=tiny.sgd(lr=0.1, epochs=1), freeze_bn=freeze)


# -- train.py end to end ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", NEW)
def test_cli_digits_prunes_half_the_filters(tmp_path, method):
    from engine.checkpoint import load_checkpoint
    from models import build_model
    from tests.helpers.cli import run_ok

    torch.manual_seed(0)
    source = tmp_path / "dense.pth"
    torch.save(build_model("smallcnn", num_classes=10, in_channels=1).state_dict(), source)
    scope = ["--scope", "global", "--bn-l1", "1e-4"] if method == "slimming" else \
        ["--scope", "layer", "--no-woodbury-joint-sparsify"]
    run = run_ok(tmp_path, "--configs", "configs/Digits/woodfisher.yml", "--layer-type", "filter", "--k", "0.5",
                 "--prune-method", method, *scope, "--prune-end", "1", "--prune-freq", "1",
                 "--fisher-subsample-size", "8", "--fisher-mini-bsz", "4", "--source-net", str(source))
    masks = load_checkpoint(os.path.join(run, "checkpoint", "checkpoint.pth.tar"))["masks"]
    kept = {name: int(mask.flatten(1).any(1).sum()) for name, mask in masks.items() if mask.dim() == 4}
    if method == "slimming":  # one threshold over all layers
        assert sum(kept.values()) == n_keep(0.5, 32 + 64 + 128)
    else:
        assert kept == {name: n_keep(0.5, masks[name].shape[0]) for name in kept}
    log = open(os.path.join(run, "run.log")).read()
    assert f": {method} ({'global' if method == 'slimming' else 'layer'}" in log and "filter sparsity" in log
