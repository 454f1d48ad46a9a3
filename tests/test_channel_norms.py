"""Channel LayerNorms under coupled masks (ConvNeXt): the masked twin normalises over the kept channels, its
mask follows the coupled units, and the slimmed network (plain LayerNorms over the kept channels, pointwise
linears and layer scales sliced) equals the masked one."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt, LayerNorm2d

from deploy.slim import dependency_groups, slim
from layers import build_maskset
from layers.norm import MaskedLayerNorm, norm_channel_dim, to_masked_norm


def tiny_convnext():
    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], num_classes=3,
                     norm_layer=partial(LayerNorm2d, eps=1e-6))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):  # non-trivial affine parameters: removed channels must not matter
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.uniform_(0.5, 1.5)
    return model


def test_the_masked_layernorm_is_a_layernorm_over_the_kept_channels_and_zero_elsewhere():
    torch.manual_seed(0)
    plain = nn.LayerNorm(6, dtype=torch.float64)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-1, 1)
    twin = to_masked_norm(plain)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    assert torch.allclose(twin(x), plain(x), rtol=0, atol=1e-12)
    keep = torch.tensor([True, False, True, True, False, True])
    twin.channel_mask.copy_(keep)
    x[..., ~keep] = 100.0  # whatever a pruned channel holds is ignored
    y = twin(x)
    want = F.layer_norm(x[..., keep], (4,), plain.weight[keep], plain.bias[keep], plain.eps)
    assert torch.allclose(y[..., keep], want, rtol=0, atol=1e-12) and torch.equal(y[..., ~keep], torch.zeros_like(y[..., ~keep]))
    assert tuple(twin.plain([0, 2, 3, 5])(x[..., keep]).shape) == (2, 3, 4, 4)
    assert "channel_mask" not in twin.state_dict()  # derived from the layers' masks, never saved


def test_layernorm2d_normalises_dim_1_and_its_twin_too():
    norm = LayerNorm2d(5, eps=1e-6).double()
    assert norm_channel_dim(norm) == 1 and norm_channel_dim(nn.LayerNorm(5)) == -1
    assert norm_channel_dim(nn.LayerNorm((4, 5))) is None and norm_channel_dim(nn.BatchNorm2d(5)) is None
    twin = to_masked_norm(norm)
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    assert torch.allclose(twin(x), norm(x), rtol=0, atol=1e-12)
    assert type(twin.plain()) is LayerNorm2d


def coupled_convnext(*, k=0.5):
    model = tiny_convnext()
    example = torch.zeros(1, 3, 32, 32)
    maskset, notices = build_maskset(model, granularity="filter", k=k, scope="layer", example=example,
                                     coupled=dependency_groups(model, example=example))
    with torch.no_grad():
        for layer in maskset.layers.values():
            layer.popup_scores.normal_()
    maskset.step(force=True)
    return model.eval(), maskset, notices


def test_coupling_masks_the_pointwise_linears_and_ties_every_layernorm_to_its_stream():
    model, maskset, notices = coupled_convnext()
    norms = {n: m for n, m in model.named_modules() if isinstance(m, MaskedLayerNorm)}
    # stem LayerNorm2d, 3 block LayerNorms, the downsample's LayerNorm2d and the head's
    assert len(norms) == 6 and "coupled channel LayerNorms: 6" in " ".join(notices)
    assert isinstance(maskset.layers["features.1.0.block.3"], nn.Linear)  # a pointwise MLP row is a channel
    stem = maskset.layers["features.0.0"].mask.flatten(1).any(1)  # the stage-1 stream's channels
    for name in ("features.0.1", "features.1.0.block.2", "features.1.1.block.2", "features.2.0"):
        assert torch.equal(norms[name].channel_mask, stem), name
    for block in ("features.1.0", "features.1.1"):  # the depthwise conv and the MLP's output rows follow the stream
        assert torch.equal(maskset.layers[f"{block}.block.0"].mask.flatten(1).any(1), stem)
        assert torch.equal(maskset.layers[f"{block}.block.5"].mask.any(1), stem)
    assert int(stem.sum()) == 8  # k = 0.5 of the stream's 16 units


@pytest.mark.parametrize("k", [0.5, 0.25])
def test_a_coupled_convnext_slims_to_about_k_squared_and_equals_the_masked_model(k):
    model, _, _ = coupled_convnext(k=k)
    net, report = slim(model, example=torch.randn(1, 3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref, got = model(x), net(x)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()) + 1e-6
    # k^2 but for the stem (3 input channels, 8 % of this tiny model's MACs) and the head, which keep k
    assert not report.forced and report.slim_macs <= (k * k + 0.08) * report.dense_macs
    sizes = {n: m.normalized_shape[0] for n, m in net.named_modules() if isinstance(m, nn.LayerNorm)}
    assert sizes["features.0.1"] == int(16 * k) and not any(isinstance(m, MaskedLayerNorm) for m in net.modules())
    assert tuple(net.get_submodule("features.1.0").layer_scale.shape) == (int(16 * k), 1, 1)


def test_per_layer_masks_leave_a_channel_layernorm_whole():
    """Without coupling a plain LayerNorm mixes every channel into the others: nothing it reads is removed."""
    from layers import MaskSet, to_masked
    model = tiny_convnext()
    to_masked(model, granularity="filter")
    MaskSet(model, k=0.5, granularity="filter", scope="layer").step(force=True)
    model.eval()
    net, _ = slim(model, example=torch.randn(1, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), rtol=1e-5, atol=1e-6)
    assert net.get_submodule("features.0.1").normalized_shape == (16,)


@pytest.mark.slow  # a ConvNeXt-T run, its fine-tuning refusal and its export: about 30 s
def test_a_coupled_convnext_run_needs_coupled_to_finetune_and_exports_slim(tmp_path, capsys):
    import glob

    import export
    from models import build_model
    from tests.helpers.cli import run_error, run_ok

    source = tmp_path / "dense.pth"
    torch.manual_seed(0)
    torch.save(build_model("tv.convnext_tiny", num_classes=10, in_channels=1, image_size=32).state_dict(), source)
    common = ["--arch", "tv.convnext_tiny", "--image-dim", "32", "--layer-type", "filter", "--k", "0.5",
              "--epochs", "1", "--data-fraction", "0.05", "--batch-size", "32"]
    run = run_ok(tmp_path / "p", "--exp-mode", "prune", "--source-net", str(source), "--coupled", *common)
    best = glob.glob(f"{run}/checkpoint/model_best.pth.tar")[0]
    err = run_error(tmp_path / "f", capsys, "--exp-mode", "finetune", "--source-net", best, *common)
    assert "was written with coupled=True" in err and "pass --coupled (" in err
    run_ok(tmp_path / "g", "--exp-mode", "finetune", "--source-net", best, "--coupled", *common)
    out = tmp_path / "slim.pt2"
    assert export.main([best, "--format", "slim", "--out", str(out)]) == 0
    assert "match the masked model" in capsys.readouterr().out


def test_a_layernorm_with_every_channel_pruned_outputs_zeros_not_nan():
    """--scope global may prune a whole stream: its norm then has no channel to normalise over."""
    twin = to_masked_norm(nn.LayerNorm(4))
    twin.channel_mask.zero_()
    assert torch.equal(twin(torch.randn(2, 3, 4)), torch.zeros(2, 3, 4))
    full = to_masked_norm(nn.LayerNorm(768))
    full.channel_mask[::3] = False
    x = 12 * torch.randn(2, 768)
    want = full(x)
    got = full.half()(x.half()).float()  # float16 inputs: the statistics in float32 (no overflow of the squares)
    assert bool(want.abs().max() > 1) and torch.allclose(got, want, atol=2e-2)


class SharedChannelsLast(nn.Module):
    """One LayerNorm and one Linear, each called on two channels-last maps: two channel sets, one module."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.ln, self.lin = nn.LayerNorm(8), nn.Linear(8, 8)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        ya = self.lin(self.ln(self.a(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        yb = self.lin(self.ln(self.b(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.head(torch.cat([ya, yb], 1).mean((2, 3)))


@pytest.mark.parametrize("coupled", [False, True])
def test_a_module_called_on_two_channel_sets_keeps_its_channels_and_equals_the_masked_model(coupled):
    from layers import MaskSet, to_masked
    torch.manual_seed(0)
    model = SharedChannelsLast()
    example = torch.zeros(1, 3, 8, 8)
    if coupled:
        maskset, _ = build_maskset(model, granularity="filter", k=0.5, scope="layer", example=example,
                                   coupled=dependency_groups(model, example=example))
        assert not isinstance(model.ln, MaskedLayerNorm)  # called twice: never one channel mask for two streams
    else:
        to_masked(model, granularity="filter")
        maskset = MaskSet(model, k=0.5, granularity="filter", scope="layer")
    with torch.no_grad():
        for layer in maskset.layers.values():
            layer.popup_scores.normal_()
    maskset.step(force=True)
    model.eval()
    net, _ = slim(model, example=torch.randn(1, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), rtol=1e-5, atol=1e-6)
