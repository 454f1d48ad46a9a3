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


def coupled(arch, *, k=0.5, scope="layer", side=32, seed=0, granularity="filter"):
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=10, image_size=side)
    example = torch.zeros(1, 3, side, side)
    maskset, notices = build_maskset(model, granularity=granularity, k=k, scope=scope, example=example,
                                     coupled=dependency_groups(model, example=example, granularity=granularity))
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
                                            pytest.param("tv.convnext_tiny", 32, 0.27, marks=pytest.mark.slow),
                                            pytest.param("tv.efficientnet_b0", 32, 0.3, marks=pytest.mark.slow)])
def test_coupled_masks_slim_to_about_k_squared_and_equal_the_masked_model(arch, side, most):
    """Each removed channel goes from its producer and its reader alike: about k^2 of the MACs at k = 0.5
    (per-layer masks keep the unions: 0.52, 0.58, 0.44, 0.69 of the MACs). Grouped convs (RegNet, ResNeXt) tie
    the j-th channel of every group, as Torch-Pruning does: 0.264 and 0.260 (DepGraph: 0.257); ConvNeXt's channel
    LayerNorms normalise over the kept channels (layers.norm): 0.257."""
    report = slimmed_coupled(arch, side=side, granularity="filter")
    assert report.slim_macs <= most * report.dense_macs and not report.forced


def slimmed_coupled(arch, *, side, granularity):
    """Slim a coupled model with random scores and BatchNorm shifts, check it equals the masked one; its report."""
    model, _, _ = coupled(arch, side=side, granularity=granularity)
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
    return report


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
    (["--layer-type", "unstructured", "--k", "0.5"], "--coupled ties filters or channels across layers: it needs --layer-type"),
    (["--configs", "configs/Digits/lth.yml", "--layer-type", "filter", "--k", "0.5"],
     "the lth trainer prunes weights by magnitude"),
    (["--configs", "configs/Digits/woodfisher.yml", "--layer-type", "filter", "--k", "0.5", "--flops-power", "1"],
     "--flops-target/--flops-power rank single filters"),
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
    import os

    from engine.checkpoint import load_checkpoint
    from tests.helpers.cli import interrupted_and_resumed, run_ok
    from trainers.base import BaseTrainer

    source = tmp_path / "dense.pth"
    torch.manual_seed(0)
    torch.save(build_model("mobilenet_cifar", num_classes=10, in_channels=1).state_dict(), source)
    args = ["--arch", "mobilenet_cifar", "--exp-mode", "prune", "--source-net", str(source), "--layer-type", "filter",
            "--k", "0.5", "--coupled", "--scope", "layer", "--epochs", "3"]
    full, ckpt = interrupted_and_resumed(tmp_path, monkeypatch, BaseTrainer, *args)
    a, b = load_checkpoint(os.path.join(full, "checkpoint", "checkpoint.pth.tar")), load_checkpoint(ckpt)
    assert b["epoch"] == 3 and b["config"]["coupled"] is True
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    tuned = run_ok(tmp_path / "c", "--arch", "mobilenet_cifar", "--exp-mode", "finetune", "--layer-type", "filter",
                   "--k", "0.5", "--epochs", "1", "--source-net", os.path.join(full, "checkpoint", "model_best.pth.tar"))
    best = load_checkpoint(os.path.join(full, "checkpoint", "model_best.pth.tar"))
    after = load_checkpoint(os.path.join(tuned, "checkpoint", "checkpoint.pth.tar"))
    assert all(torch.equal(after["masks"][n], m) for n, m in best["masks"].items())


# -- WoodFisher over coupled units ---------------------------------------------------------------------
class TiedGrouped(nn.Module):
    """conv1 -> grouped conv2 (2 groups) added back onto conv1's output -> conv3: conv1's filter p, p + 4 and
    conv2's p, p + 4 are one unit (the residual tie, and the grouped conv's tie of position p in each group)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y) + y)
        return self.conv3(y).mean((2, 3))


class TwoReaders(nn.Module):
    """conv1's output read by conv2a and conv2b, whose sum conv3 reads: input channel j of conv2a and of conv2b
    is one coupled channel unit (and conv2a's and conv2b's outputs, added, one filter unit)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2a = nn.Conv2d(6, 4, 3, padding=1)
        self.conv2b = nn.Conv2d(6, 4, 1)
        self.conv3 = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        return self.conv3(torch.relu(self.conv2a(y) + self.conv2b(y))).mean((2, 3))


def coupled_solver(*, m=12, damp=1e-2, net=TiedGrouped, granularity="filter"):
    from layers.maskset import dense_masks
    from pruning.methods import PRUNE_METHODS
    from pruning.solver import FisherSettings, OBSSolver

    torch.manual_seed(0)
    model = net().double()
    example = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    groups = dependency_groups(model, example=example, granularity=granularity)
    ms, _ = build_maskset(model, granularity=granularity, k=0.5, scope="global", coupled=groups)
    ms.set_masks(dense_masks(ms.layers))  # WoodFisher starts from the dense model
    solver = OBSSolver(ms.layers, granularity=granularity, method=PRUNE_METHODS["woodfisher"], coupling=ms.coupling,
                       fisher=FisherSettings(m=m, damp=damp, blocks="layer"))
    G = torch.randn(m, solver.num_weights, dtype=torch.float64)
    solver.add_gradients(G)
    return ms, solver, G


def layer_inverses(ms, G, damp):
    out, start = {}, 0
    for name, layer in ms.layers.items():
        d = layer.weight.numel()
        Gl = G[:, start:start + d]
        out[name] = torch.linalg.inv(damp * torch.eye(d, dtype=torch.float64) + Gl.T @ Gl / G.shape[0])
        start += d
    return out


def test_woodfisher_ranks_a_coupled_unit_by_its_group_obs_statistic_over_every_layer():
    """rho_U = sum over layers of w_Q^T ([F^-1]_QQ)^-1 w_Q, Q = all of U's weights in the layer (two filters of
    conv1 and two of conv2 here): exact, because the Fisher is block-diagonal over layers. Against the explicit
    float64 inverses of the per-layer Fishers."""
    ms, solver, G = coupled_solver()
    coupling, inverses = ms.coupling, layer_inverses(ms, G, 1e-2)
    assert coupling.filters_per_unit("conv1") == coupling.filters_per_unit("conv2") == 2
    got = coupling.unit_scores(solver.scores()).square()
    want = torch.zeros(coupling.units, dtype=torch.float64)
    for name, layer in ms.layers.items():
        w = layer.weight.detach().reshape(-1)
        per = w.numel() // layer.weight.shape[0]
        for u in coupling.unit_of[name].unique().tolist():
            filters = (coupling.unit_of[name] == u).nonzero().flatten()
            q = (filters[:, None] * per + torch.arange(per)).reshape(-1)
            want[u] += w[q] @ torch.linalg.solve(inverses[name][q][:, q], w[q])
    assert coupling.tied() == 4 and torch.allclose(got, want, rtol=1e-9, atol=0)


def test_woodfisher_keeps_exact_coupled_units_and_applies_the_joint_obs_update_per_layer():
    ms, solver, G = coupled_solver()
    inverses = layer_inverses(ms, G, 1e-2)
    before = {n: layer.weight.detach().clone().reshape(-1) for n, layer in ms.layers.items()}
    masks = solver.prune_to(0.5, scope="global")
    coupling = ms.coupling
    assert int(coupling.alive_units(masks)) == n_keep(0.5, coupling.units)
    for name, mask in masks.items():  # every unit whole: its filters all kept or all pruned
        alive = mask.flatten(1).any(1)
        for u in coupling.unit_of[name].unique():
            members = alive[coupling.unit_of[name] == u]
            assert bool(members.all()) or not bool(members.any())
        w, q = before[name], ~mask.reshape(-1)
        want = (w - inverses[name][:, q] @ torch.linalg.solve(inverses[name][q][:, q], w[q])) * mask.reshape(-1)
        assert torch.allclose(ms.layers[name].weight.detach().reshape(-1), want, rtol=1e-9, atol=1e-12)


def test_a_coupled_woodfisher_run_prunes_whole_units_to_exact_counts(tmp_path):
    """train.py --trainer woodfisher --coupled on resnet20s (option-A residual streams): every dependency group
    kept or pruned whole, and k of each family's units at the end."""
    import os

    from engine.checkpoint import load_checkpoint
    from layers.coupling import Coupling
    from tests.helpers.cli import run_ok

    source = tmp_path / "dense.pth"
    torch.manual_seed(0)
    model = build_model("resnet20s", num_classes=10, in_channels=1)
    torch.save(model.state_dict(), source)
    run = run_ok(tmp_path, "--configs", "configs/Digits/woodfisher.yml", "--arch", "resnet20s", "--source-net",
                 str(source), "--layer-type", "filter", "--k", "0.5", "--coupled", "--scope", "layer",
                 "--no-woodbury-joint-sparsify", "--epochs", "2", "--prune-end", "1", "--prune-freq", "1",
                 "--fisher-subsample-size", "16", "--fisher-mini-bsz", "2")
    masks = load_checkpoint(os.path.join(run, "checkpoint", "checkpoint.pth.tar"))["masks"]
    groups = dependency_groups(model, example=torch.zeros(1, 1, 28, 28))
    coupling = Coupling.of(groups, {name: mask.shape[0] for name, mask in masks.items()})
    assert coupling.tied() > 0
    alive = torch.zeros(coupling.units, dtype=torch.long)
    members = torch.zeros(coupling.units, dtype=torch.long)
    for name, mask in masks.items():
        alive.index_add_(0, coupling.unit_of[name], mask.flatten(1).any(1).long())
        members.index_add_(0, coupling.unit_of[name], torch.ones(mask.shape[0], dtype=torch.long))
    assert bool(((alive == 0) | (alive == members)).all())  # whole units
    kept = alive > 0
    for f in coupling.family_of.unique():
        family = coupling.family_of == f
        assert int(kept[family].sum()) == max(1, n_keep(0.5, int(family.sum())))
    assert "coupled unit sparsity" in open(os.path.join(run, "run.log")).read()


def test_coupled_channel_units_are_the_input_channels_that_read_one_channel():
    groups = dependency_groups(TwoReaders(), example=torch.zeros(1, 2, 6, 6), granularity="channel")
    assert sorted(sorted(g) for g in groups if ("conv2a", 0) in g) == [[("conv2a", 0), ("conv2b", 0)]]
    model, ms, notices = coupled("resnet18", k=0.5, granularity="channel")
    blocks = ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.shortcut.0"]
    columns = [ms.layers[name].mask.transpose(0, 1).flatten(1).any(1) for name in blocks]
    assert all(torch.equal(c, columns[0]) for c in columns) and int(columns[0].sum()) == 32  # the stem stream
    assert "coupled channel masks" in " ".join(notices)


def test_woodfisher_ranks_a_coupled_channel_by_the_group_obs_statistic_of_all_its_readers():
    ms, solver, G = coupled_solver(net=TwoReaders, granularity="channel")
    coupling, inverses = ms.coupling, layer_inverses(ms, G, 1e-2)
    got = coupling.unit_scores(solver.scores()).square()
    want = torch.zeros(coupling.units, dtype=torch.float64)
    for name, layer in ms.layers.items():
        w = layer.weight.detach()
        index = torch.arange(w.numel()).view_as(w)
        for c, u in enumerate(coupling.unit_of[name].tolist()):
            q = index[:, c].reshape(-1)
            want[u] += w.reshape(-1)[q] @ torch.linalg.solve(inverses[name][q][:, q], w.reshape(-1)[q])
    assert coupling.tied() == 6 and torch.allclose(got, want, rtol=1e-9, atol=0)
    masks = solver.prune_to(0.5, scope="global")
    assert int(coupling.alive_units(masks)) == n_keep(0.5, coupling.units)
    a, b = (masks[n].transpose(0, 1).flatten(1).any(1) for n in ("conv2a", "conv2b"))
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch,side", [("resnet18", 32), ("tv.densenet121", 32)])
def test_coupled_channel_masks_slim_and_equal_the_masked_model(arch, side):
    """A channel no masked layer reads goes with its producers' filters: about k^2 of the MACs at k = 0.5."""
    report = slimmed_coupled(arch, side=side, granularity="channel")
    assert report.slim_macs <= 0.3 * report.dense_macs


ISSUE_CNNS = ["tv.mobilenet_v2", "tv.efficientnet_b0", "tv.resnext50_32x4d", "tv.densenet121", "tv.convnext_tiny",
              "tv.regnet_y_400mf", "mobilenet"]


@pytest.mark.slow  # seven ImageNet CNNs twice: about a minute (the default suite has a fast member of each kind)
@pytest.mark.parametrize("masks", ["per-layer", "coupled"])
@pytest.mark.parametrize("arch", ISSUE_CNNS)
def test_every_listed_cnn_slims_to_its_masked_model_with_per_layer_and_coupled_masks(arch, masks):
    from tests.test_export import tv_masked_model
    if masks == "coupled":
        model, _, _ = coupled(arch)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                    m.bias.uniform_(-1, 1)
        model.eval()
    else:
        model, _ = tv_masked_model(arch)
    net, report = slim(model, example=torch.randn(1, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, got = model(x), net(x)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()) + 1e-6
    if masks == "coupled":
        assert report.slim_macs <= 0.3 * report.dense_macs and not report.forced


@pytest.mark.parametrize("method", ["woodfisher", "kfac"])
def test_coupled_woodfisher_channel_units_read_through_a_flatten_run_as_one_unit(tmp_path, method):
    """smallcnn's fc1 reads each channel of conv3 through 4 features (a 2x2 map, flattened): one unit holds 4
    of its input columns, ranked by one group OBS statistic over them (kfac: of its Kronecker block's 4
    columns, per family: global K-FAC statistics are not on one scale across layers); every unit is kept or
    pruned whole."""
    import os

    from engine.checkpoint import load_checkpoint
    from tests.helpers.cli import run_ok

    source = tmp_path / "dense.pth"
    torch.manual_seed(0)
    torch.save(build_model("smallcnn", num_classes=10, in_channels=1).state_dict(), source)
    run = run_ok(tmp_path, "--configs", "configs/Digits/woodfisher.yml", "--source-net", str(source),
                 "--layer-type", "channel", "--k", "0.5", "--coupled", "--epochs", "2", "--prune-end", "1",
                 "--prune-freq", "1", "--fisher-subsample-size", "8", "--fisher-mini-bsz", "2", "--prune-method", method,
                 *(["--scope", "layer", "--no-woodbury-joint-sparsify"] if method == "kfac" else []))
    masks = load_checkpoint(os.path.join(run, "checkpoint", "checkpoint.pth.tar"))["masks"]
    columns = masks["fc1"].any(0).view(-1, 4)  # conv3's channel c feeds fc1's features 4c .. 4c + 3
    assert bool((columns.all(1) | ~columns.any(1)).all()) and 0 < int(columns.all(1).sum()) < columns.shape[0]
