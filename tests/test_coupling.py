"""Coupled filter masks (--coupled): one decision per dependency group of tied filters, exact counts over
the groups, and a slimmed model that drops every pruned channel whole."""
import pytest
import torch
from torch import nn

from deploy.slim import dependency_groups, slim
from layers import build_maskset
from layers.selector import n_keep
from models import build_model
from tests.helpers.cli import QUICK_RUN, run_error


def coupled(arch, *, k=0.5, scope="layer", side=32, seed=0):
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=10, image_size=side)
    example = torch.zeros(1, 3, side, side)
    maskset, notices = build_maskset(model, granularity="filter", k=k, scope=scope, example=example,
                                     coupled=dependency_groups(model, example=example))
    with torch.no_grad():
        for layer in maskset.layers.values():
            layer.popup_scores.normal_()
    maskset.step(force=True)
    return model, maskset, notices


def filters_alive(maskset, name):
    return maskset.layers[name].mask.flatten(1).any(1)


def test_a_residual_stream_is_one_unit_per_channel_across_every_conv_that_adds_into_it():
    model, ms, notices = coupled("resnet18")
    unit = ms.coupling.unit_of
    # CIFAR ResNet-18, stage 1: the stem and both blocks' second convs add into one 64-channel stream
    stream = ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert all(torch.equal(unit[name], unit["conv1"]) for name in stream)
    assert not torch.equal(unit["layer1.0.conv1"], unit["conv1"])  # a block's interior is its own
    alive = [filters_alive(ms, name) for name in stream]
    assert all(torch.equal(a, alive[0]) for a in alive) and int(alive[0].sum()) == n_keep(0.5, 64)
    assert "coupled filter masks" in notices[0]


def test_a_depthwise_conv_and_its_producer_share_each_channel():
    model, ms, _ = coupled("mobilenet_cifar", side=8)
    assert torch.equal(ms.coupling.unit_of["model.0.0"], ms.coupling.unit_of["model.1.0"])  # stem -> depthwise
    assert torch.equal(filters_alive(ms, "model.0.0"), filters_alive(ms, "model.1.0"))
    assert torch.equal(ms.coupling.unit_of["model.1.3"], ms.coupling.unit_of["model.2.0"])  # pointwise -> depthwise


def test_a_unit_scores_the_l2_norm_of_all_its_members_scores():
    model, ms, _ = coupled("mobilenet_cifar", side=8)
    scores = {n: layer.popup_scores for n, layer in ms.layers.items()}
    values = ms.coupling.unit_scores(scores)
    u = int(ms.coupling.unit_of["model.0.0"][5])
    expect = torch.cat([scores["model.0.0"][5].flatten(), scores["model.1.0"][5].flatten()]).double().norm()
    torch.testing.assert_close(values[u], expect, rtol=1e-12, atol=0)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_exact_counts_over_units_or_within_each_family(scope):
    model, ms, _ = coupled("tv.mobilenet_v2", k=0.3, scope=scope)
    c = ms.coupling
    kept = torch.zeros(c.units, dtype=torch.bool)
    for name, layer in ms.layers.items():
        alive = filters_alive(ms, name)
        assert torch.equal(ms.layers[name].mask.flatten(1).all(1), alive)  # whole filters
        kept[c.unit_of[name][alive]] = True
    for name in ms.layers:  # a unit is kept in every member or in none
        assert torch.equal(kept[c.unit_of[name]], filters_alive(ms, name)), name
    if scope == "global":
        assert int(kept.sum()) == n_keep(0.3, c.units)
    else:
        for f in range(int(c.family_of.max()) + 1):
            size = int((c.family_of == f).sum())
            assert int(kept[c.family_of == f].sum()) == max(1, n_keep(0.3, size)), f


def test_a_network_without_ties_gets_exactly_its_per_layer_masks():
    torch.manual_seed(0)
    plain = build_model("smallcnn", num_classes=10, in_channels=1, image_size=8)
    twin = build_model("smallcnn", num_classes=10, in_channels=1, image_size=8)
    twin.load_state_dict(plain.state_dict())
    a, _ = build_maskset(plain, granularity="filter", k=0.4, scope="layer",
                         coupled=dependency_groups(plain, example=torch.zeros(1, 1, 8, 8)))
    b, _ = build_maskset(twin, granularity="filter", k=0.4, scope="layer")
    for x, y in zip(a.layers.values(), b.layers.values()):
        with torch.no_grad():
            y.popup_scores.copy_(x.popup_scores)
    a.step(force=True)
    b.step(force=True)
    assert a.coupling.tied() == 0
    assert all(torch.equal(x.mask, y.mask) for x, y in zip(a.layers.values(), b.layers.values()))


@pytest.mark.parametrize("arch,side,most", [("mobilenet_cifar", 8, 0.27), ("tv.mobilenet_v2", 32, 0.3),
                                            ("resnet18", 32, 0.27), ("tv.regnet_y_400mf", 32, 0.27),
                                            pytest.param("tv.resnext50_32x4d", 32, 0.27, marks=pytest.mark.slow),
                                            pytest.param("tv.efficientnet_b0", 32, 0.3, marks=pytest.mark.slow)])
def test_coupled_masks_slim_to_about_k_squared_and_equal_the_masked_model(arch, side, most):
    """Each removed channel goes from its producer and its reader alike: about k^2 of the MACs at k = 0.5
    (per-layer masks keep the unions: 0.52, 0.58, 0.44, 0.69 of the MACs). Grouped convs (RegNet, ResNeXt) tie
    the j-th channel of every group, as Torch-Pruning does: 0.264 and 0.260 (DepGraph: 0.257)."""
    model, ms, _ = coupled(arch, side=side)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.bias.uniform_(-1, 1)
    model.eval()
    net, report = slim(model, example=torch.randn(1, 3, side, side))
    x = torch.randn(4, 3, side, side)
    with torch.no_grad():
        ref, got = model(x), net(x)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()) + 1e-6
    assert report.slim_macs <= most * report.dense_macs and not report.forced


def test_the_mask_set_state_records_the_coupling():
    _, ms, _ = coupled("mobilenet_cifar", side=8)
    state = ms.state_dict()
    assert state["coupled"] is True
    torch.manual_seed(0)
    other = build_model("mobilenet_cifar", num_classes=10)
    plain, _ = build_maskset(other, granularity="filter", k=0.5, scope="layer")
    with pytest.raises(ValueError, match="coupled is True in the state, False here"):
        plain.load_state_dict(state)


@pytest.mark.parametrize("args,needle", [
    (["--layer-type", "unstructured", "--k", "0.5"], "--coupled ties filters across layers: it needs --layer-type"),
    (["--configs", "configs/Digits/woodfisher.yml", "--layer-type", "filter", "--k", "0.5"],
     "the woodfisher trainer ranks filters by its statistic layer by layer"),
    (["--layer-type", "filter", "--k", "0.5", "--layer-floor", "2"], "--layer-floor does not apply with --coupled"),
])
def test_what_coupling_cannot_do_is_one_line(tmp_path, capsys, args, needle):
    source = tmp_path / "dense.pth"
    torch.save(build_model("smallcnn", num_classes=10, in_channels=1).state_dict(), source)
    err = run_error(tmp_path, capsys, *QUICK_RUN, "--exp-mode", "prune", "--source-net", str(source), "--coupled",
                    *args)
    assert needle in err, err


def test_a_coupled_run_resumes_bit_exact_and_fine_tunes_with_its_masks(tmp_path, monkeypatch):
    """HYDRA with --coupled on MobileNetV1, cut by Ctrl-C after epoch 1 and resumed: the masks and weights of the
    uninterrupted run; its checkpoint then fine-tunes with those masks unchanged."""
    import glob
    import os

    import train
    from engine.checkpoint import load_checkpoint
    from tests.helpers.cli import interrupt_at, run_ok
    from trainers.base import BaseTrainer

    source = tmp_path / "dense.pth"
    torch.manual_seed(0)
    torch.save(build_model("mobilenet_cifar", num_classes=10, in_channels=1).state_dict(), source)
    args = ["--arch", "mobilenet_cifar", "--exp-mode", "prune", "--source-net", str(source), "--layer-type", "filter",
            "--k", "0.5", "--coupled", "--scope", "layer", "--epochs", "3"]
    full = run_ok(tmp_path / "a", *args)
    restore = interrupt_at(monkeypatch, BaseTrainer, 1)
    assert train.main(["--result-dir", str(tmp_path / "b"), "--exp-name", "t", *QUICK_RUN, *args]) == 130
    restore()
    ckpt = glob.glob(str(tmp_path / "b" / "t" / "prune" / "*" / "checkpoint" / "checkpoint.pth.tar"))[0]
    assert train.main(["--resume", ckpt]) == 0
    a, b = load_checkpoint(os.path.join(full, "checkpoint", "checkpoint.pth.tar")), load_checkpoint(ckpt)
    assert b["epoch"] == 3 and b["config"]["coupled"] is True
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    tuned = run_ok(tmp_path / "c", "--arch", "mobilenet_cifar", "--exp-mode", "finetune", "--layer-type", "filter",
                   "--k", "0.5", "--epochs", "1", "--source-net", os.path.join(full, "checkpoint", "model_best.pth.tar"))
    best = load_checkpoint(os.path.join(full, "checkpoint", "model_best.pth.tar"))
    after = load_checkpoint(os.path.join(tuned, "checkpoint", "checkpoint.pth.tar"))
    assert all(torch.equal(after["masks"][n], m) for n, m in best["masks"].items())
