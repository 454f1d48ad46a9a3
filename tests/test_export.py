"""Export: structured slimming (every registered architecture, filter and channel masks), the written
files (torch.export program, ONNX) against the masked model, compact sparse storage, and the CLI's
bad input (one line, exit 2, nothing written)."""
import glob
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import export
import train
from deploy import export_model, load_program, load_sparse, slim
from deploy.formats import onnx_outputs
from deploy.slim import SlimError
from engine.checkpoint import load_checkpoint
from layers import MaskSet, dense_state_dict, to_masked
from models import build_model, model_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Big members of a family: slimming them takes seconds; their family keeps a fast member in the default run.
SLOW = {"resnet101", "resnet152", "wrn_28_10", "wrn_34_10", "wrn_28_4", "resnet50", "resnet34", "ResNet34",
        "vgg13", "vgg13_bn", "vgg16", "resnet44s", "resnet56s"}
FAMILY = {"smallcnn": "smallcnn", "resnet18": "cifar resnet (projection)", "resnet20s": "resnet_s (option A)",
          "vgg11_bn": "vgg", "vgg16_bn": "vgg", "wrn_28_1": "wrn", "ResNet18": "imagenet resnet",
          "ResNet50": "imagenet resnet (bottleneck)"}


def param(name, slow_names=SLOW):
    return pytest.param(name, marks=pytest.mark.slow) if name in slow_names else name


def input_shape(name):
    if name == "smallcnn":
        return 1, 8
    if name.startswith("lenet"):
        return 1, 28
    return 3, 32 if name.startswith("ResNet") else 8


def masked_model(name, granularity, *, k=0.5, seed=0):
    """A masked model with random per-layer masks and random BatchNorm statistics, so that pruned
    filters leave non-zero constants behind (the case the constant folding must get right)."""
    torch.manual_seed(seed)
    c, side = input_shape(name)
    model = build_model(name, num_classes=3, in_channels=c, image_size=side)
    to_masked(model, granularity=granularity)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                # VGG's N(0, 0.01) classifier makes outputs ~1e-5: a relative check needs real magnitudes
                nn.init.kaiming_uniform_(m.weight, a=1)
    maskset = MaskSet(model, k=k, granularity=granularity, scope="layer")
    maskset.step(force=True)
    maskset.freeze()
    return model.eval(), torch.randn(1, c, side, side)


def has_grouped_conv(name):
    with torch.device("meta"):
        model = build_model(name, num_classes=3, image_size=8)
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())


def has_conv(name):
    c, side = input_shape(name)
    with torch.device("meta"):  # the modules only, no weights to fill: collection builds all 26 (2 s -> 0.3 s)
        model = build_model(name, num_classes=3, in_channels=c, image_size=side)
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


# Filter/channel masks act on convolutions only: an MLP (lenet300) has nothing to slim (tested below).
@pytest.mark.parametrize("granularity", ["filter", "channel"])
@pytest.mark.parametrize("name", [param(n) for n in model_names() if has_conv(n)])
def test_slim_equals_masked_for_every_architecture(name, granularity):
    if granularity == "channel" and has_grouped_conv(name):
        pytest.skip("channel masks on grouped convs are refused (layers.maskset.check_channel_units)")
    model, example = masked_model(name, granularity)
    net, report = slim(model, example=example)
    x = torch.randn(4, *example.shape[1:])
    with torch.no_grad():
        ref, got = model(x), net(x)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()) + 1e-6, name
    assert report.slim_params < report.dense_params
    assert report.slim_macs < report.dense_macs
    # nothing of the masked machinery is left: plain modules only (plus the folded-constant conv)
    assert not any("mask" in k or "score" in k for k in net.state_dict())


def test_filter_slimming_of_smallcnn_is_the_hand_slimmed_size():
    # The numbers: smallcnn filter k=0.5 (10 classes) slims from 159,850 to 57,594 parameters,
    # exactly the hand-slimmed copy (16, 32, 64 filters; fc1 reads 64 x 2 x 2 features).
    model = build_model("smallcnn", num_classes=10, in_channels=1, image_size=8)
    to_masked(model, granularity="filter")
    MaskSet(model, k=0.5, granularity="filter", scope="layer").step(force=True)
    net, report = slim(model.eval(), example=torch.zeros(1, 1, 8, 8))
    assert report.dense_params == 159_850 and report.slim_params == 57_594
    assert [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)] == [16, 32, 64]


def test_residual_ties_keep_the_union_and_say_what_it_cost():
    model, example = masked_model("resnet20s", "filter")
    net, report = slim(model, example=example)
    # layer1's residual stream: the stem and every block's conv2 add into it, so it keeps the union
    stream = {m.out_channels for name, m in net.named_modules()
              if isinstance(m, nn.Conv2d) and (name == "conv1" or (name.startswith("layer1") and name.endswith("conv2")))}
    assert len(stream) == 1 and stream.pop() > 8  # more than the 8 of 16 each mask keeps
    assert report.forced and all(f.params > 0 for f in report.forced)
    text = "\n".join(report.lines())
    assert "residual" in text and f"{sum(f.params for f in report.forced):,} parameters" in text
    # block interiors are not tied: conv1 keeps exactly its mask's filters
    assert net.get_submodule("layer1.0.conv1").out_channels == 8


def test_a_zero_bn_shift_needs_no_folding_and_a_nonzero_one_is_folded():
    model, example = masked_model("smallcnn", "filter")
    net, report = slim(model, example=example)
    assert report.folded  # random BN shifts: the constants of pruned filters went into the consumers
    x = torch.randn(3, *example.shape[1:])
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), rtol=1e-5, atol=1e-6)


# -- files --------------------------------------------------------------------------------------------
# resnet18 and wrn_28_1 repeat resnet20s's and ResNet18's blocks at a few seconds each: -m slow.
@pytest.mark.parametrize("name", ["smallcnn", "resnet20s", pytest.param("resnet18", marks=pytest.mark.slow), "vgg11_bn",
                                  pytest.param("wrn_28_1", marks=pytest.mark.slow), "ResNet18"])
def test_slim_program_and_onnx_match_the_masked_model(name, tmp_path):
    pytest.importorskip("onnxruntime")
    model, example = masked_model(name, "filter")
    x = torch.randn(5, *example.shape[1:])
    with torch.no_grad():
        ref = model(x)
    for suffix in (".pt2", ".onnx"):
        path = str(tmp_path / f"slim{suffix}")
        result = export_model(model, example=example, format="slim", path=path)
        assert result.max_abs_diff <= 1e-5 * float(ref.abs().max()) + 1e-6
        with torch.no_grad():
            got = load_program(path)(x) if suffix == ".pt2" else onnx_outputs(path, x)
        assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()) + 1e-6, suffix
        assert result.params == result.slim.slim_params


@pytest.mark.parametrize("fmt", ["dense", "masked"])
def test_dense_and_masked_exports_match(fmt, tmp_path):
    pytest.importorskip("onnxruntime")
    model, example = masked_model("resnet20s", "unstructured")
    x = torch.randn(2, *example.shape[1:])
    with torch.no_grad():
        ref = model(x)
    for suffix in (".pt2", ".onnx"):
        path = str(tmp_path / f"m{suffix}")
        export_model(model, example=example, format=fmt, path=path)
        with torch.no_grad():
            got = load_program(path)(x) if suffix == ".pt2" else onnx_outputs(path, x)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), (fmt, suffix)


def test_program_loads_without_the_project(tmp_path):
    model, example = masked_model("resnet20s", "filter")
    path = str(tmp_path / "slim.pt2")
    export_model(model, example=example, format="slim", path=path)
    x = torch.randn(2, *example.shape[1:])
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "xy.pt")
    # -I: isolated mode (no current folder, no PYTHONPATH on sys.path), run from elsewhere
    code = ("import sys, torch; assert not any('wt-' in p or p in ('', '.') for p in sys.path[:-1]), sys.path; "
            "d = torch.load('xy.pt'); m = torch.export.load('slim.pt2').module(); "
            "print(float((m(d['x']) - d['y']).abs().max()))")
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-4


def test_sparse_storage_is_compact_and_loads_back_exactly(tmp_path):
    model, example = masked_model("resnet20s", "unstructured", k=0.1)
    path = str(tmp_path / "s.pth")
    result = export_model(model, example=example, format="sparse", path=path)
    assert result.dense_bytes is not None and result.file_bytes < 0.25 * result.dense_bytes
    restored = load_sparse(path)
    reference = dense_state_dict(model)
    assert set(restored) == set(reference)
    assert all(torch.equal(restored[k], reference[k]) for k in reference)
    plain = build_model("resnet20s", num_classes=3, in_channels=3, image_size=8)
    plain.load_state_dict(restored, strict=True)
    assert result.max_abs_diff == 0.0


# -- the command line ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def filter_checkpoint(digits_pretrained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("filter_ckpt")
    assert train.main(["--configs", os.path.join(ROOT, "configs", "Digits", "hydra.yml"), "--exp-mode", "prune",
                       "--layer-type", "filter", "--k", "0.5", "--epochs", "1", "--source-net", digits_pretrained,
                       "--result-dir", str(tmp), "--exp-name", "f", "--no-progress"]) == 0
    return glob.glob(str(tmp / "f" / "prune" / "*" / "checkpoint" / "model_best.pth.tar"))[0]


def test_cli_slim_writes_a_smaller_program(filter_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "slim.pt2")
    assert export.main([filter_checkpoint, "--format", "slim", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "slimmed: 57,594 parameters (dense 159,850" in text and "checked:" in text
    assert os.path.getsize(out) < 0.5 * os.path.getsize(filter_checkpoint)


@pytest.mark.parametrize("args, needle", [
    (["--format", "slim"], "no masks"),                      # a dense (pretrain) checkpoint
    (["--format", "zip"], "invalid choice: 'zip'"),           # unknown export format
    (["--format", "slim", "--suffix"], "unrecognized arguments"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(digits_pretrained, tmp_path, capsys, args, needle):
    out = str(tmp_path / "x.pt2")
    assert export.main([digits_pretrained, *args, "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
    assert os.listdir(tmp_path) == []


def test_cli_wrong_suffix_and_unstructured_slim_are_refused(filter_checkpoint, tmp_path, capsys):
    assert export.main([filter_checkpoint, "--format", "slim", "--out", str(tmp_path / "x.bin")]) == 2
    assert ".pt2 or .onnx" in capsys.readouterr().err
    assert export.main([str(tmp_path / "missing.pth.tar"), "--out", str(tmp_path / "x.pt2")]) == 2
    assert "not found" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_slim_of_unstructured_masks_is_refused(tmp_path):
    from configs.errors import UserError
    model, example = masked_model("smallcnn", "unstructured")
    with pytest.raises(UserError, match="--format sparse"):
        export_model(model, example=example, format="slim", path=str(tmp_path / "x.pt2"))
    assert os.listdir(tmp_path) == []


def test_cli_subprocess_exit_status(digits_pretrained, tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), digits_pretrained, "--format", "slim",
                          "--out", str(tmp_path / "x.pt2")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: ")
    assert os.listdir(tmp_path) == []


def test_format_choices_match_the_registry():
    from configs.options import EXPORT_FORMATS
    from deploy import FORMATS
    assert set(EXPORT_FORMATS) == set(FORMATS)


def test_a_model_without_convolutions_has_nothing_to_slim():
    model = build_model("lenet300", num_classes=3, in_channels=1, image_size=28)
    to_masked(model, granularity="filter")  # linear layers stay plain for structured masks
    with pytest.raises(SlimError, match="no masked layers"):
        slim(model.eval(), example=torch.randn(1, 1, 28, 28))


def test_export_knows_the_input_of_every_registered_dataset():
    # export.py rebuilds a model without its data: every dataset needs its (channels, side) there
    # (an MNIST5k checkpoint once fell back to CIFAR's 3 channels and failed to load).
    from data import dataset_names
    from export import DATASET_INPUTS

    assert set(DATASET_INPUTS) == set(dataset_names())


# -- --out that exists, folders, failing disks, checkpoints that do not fit their architecture -----------
def test_an_existing_out_is_refused_unless_forced_and_then_named(filter_checkpoint, tmp_path, capsys):
    out = tmp_path / "slim.pt2"
    out.write_bytes(b"my earlier export")
    assert export.main([filter_checkpoint, "--format", "slim", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; pass --force" in err and out.read_bytes() == b"my earlier export"
    assert export.main([filter_checkpoint, "--format", "slim", "--out", str(out), "--force"]) == 0
    assert f"replaced {out}" in capsys.readouterr().out and out.read_bytes()[:4] == b"PK\x03\x04"
    assert export.main([filter_checkpoint, "--format", "slim", "--out", str(tmp_path)]) == 2
    assert "is a folder; name the file" in capsys.readouterr().err


def test_a_failing_disk_is_one_line_and_leaves_no_file(filter_checkpoint, tmp_path, capsys, monkeypatch):
    import errno

    from engine import files

    real = files.atomic_write

    def full(path, write, **kw):
        def half(fh):
            fh.write(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, half, **kw)

    monkeypatch.setattr(files, "atomic_write", full)
    import deploy.formats
    monkeypatch.setattr(deploy.formats, "atomic_write", full)
    out = tmp_path / "slim.pt2"
    assert export.main([filter_checkpoint, "--format", "slim", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: cannot write {out} (No space left on device); free space or choose a writable --out\n"
    assert os.listdir(tmp_path) == []


def test_a_recorded_exclusion_that_matches_no_layer_is_one_line(filter_checkpoint, tmp_path, capsys):
    ckpt = load_checkpoint(filter_checkpoint)
    ckpt["config"]["exclude_layers"] = "layer9.*"
    bad = tmp_path / "bad.pth.tar"
    torch.save(ckpt, bad)
    assert export.main([str(bad), "--format", "slim", "--out", str(tmp_path / "x.pt2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "records --exclude-layers 'layer9.*'" in err
    assert sorted(os.listdir(tmp_path)) == ["bad.pth.tar"]


# -- depthwise convolutions and squeeze-excitation -------------------------------------------------
def tv_masked_model(name, *, side=32, k=0.5):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, image_size=side)
    to_masked(model, granularity="filter")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-zero shifts: removed channels leave constants
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    maskset = MaskSet(model, k=k, granularity="filter", scope="layer")
    maskset.step(force=True)
    maskset.freeze()
    return model.eval(), torch.randn(1, 3, side, side)


# MACs kept at most (per-layer masks at k = 0.5; before depthwise support: mobilenet_v2 and
# efficientnet_b0 at 32x32: 0.777 and 0.874). Per-layer masks tie a depthwise conv's channels to its producer's: the union stays.
DEPTHWISE_MACS = {"mobilenet_cifar": 0.6, "tv.mobilenet_v2": 0.65, "tv.efficientnet_b0": 0.8}


@pytest.mark.parametrize("name", ["mobilenet_cifar", "tv.mobilenet_v2",
                                  pytest.param("tv.efficientnet_b0", marks=pytest.mark.slow)])  # SE blocks: 7 s
def test_depthwise_convs_and_squeeze_excitation_are_slimmed_and_equal_the_masked_model(name):
    """A depthwise conv's input and output channels are one channel (tied), so a removed channel leaves its
    producer, the depthwise filter, its BatchNorm and the reader's column together; SE's per-channel scale
    ties its channels to the block's."""
    model, example = tv_masked_model(name, side=8 if name == "mobilenet_cifar" else 32)
    net, report = slim(model, example=example)
    x = torch.randn(4, *example.shape[1:])
    with torch.no_grad():
        ref, got = model(x), net(x)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()) + 1e-6
    before = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    after = dict(net.named_modules())
    shrunk = [n for n, m in before.items() if after[n].groups == after[n].in_channels < m.in_channels]
    assert before and shrunk == list(before), sorted(set(before) - set(shrunk))[:5]  # every depthwise conv shrank
    assert report.slim_macs < DEPTHWISE_MACS[name] * report.dense_macs


# -- grouped (non-depthwise) convolutions ---------------------------------------------------------------
class GroupedNet(nn.Module):
    """conv -> grouped conv (2 groups of 4) -> conv -> head: the ResNeXt/RegNet pattern at its smallest."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def test_a_grouped_conv_stays_grouped_and_balances_its_groups():
    """Group 0 of conv2 keeps filters {0, 1, 2}, group 1 only {4}; conv1 keeps inputs {0, 1} of group 0 and
    {4, 5, 6, 7} of group 1. A grouped twin needs equal groups, so each group keeps as many as the
    fullest: filters 5, 6 of conv2 and filters 2, 3 of conv1 stay, reported as forced keeps."""
    torch.manual_seed(0)
    model = GroupedNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.bias.uniform_(-1, 1)
    to_masked(model, granularity="filter")
    with torch.no_grad():
        model.conv1.mask.zero_()[[0, 1, 4, 5, 6, 7]] = True
        model.conv2.mask.zero_()[[0, 1, 2, 4]] = True
    model.eval()
    net, report = slim(model, example=torch.randn(1, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref, got = model(x), net(x)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()) + 1e-6
    conv1, conv2 = net.get_submodule("conv1"), net.get_submodule("conv2")
    assert (conv1.out_channels, conv2.in_channels, conv2.out_channels, conv2.groups) == (8, 8, 6, 2)
    assert tuple(conv2.weight.shape) == (6, 4, 3, 3)
    forced = {f.layer: f for f in report.forced}
    assert forced["conv1"].filters == 2 and forced["conv2"].filters == 2


@pytest.mark.parametrize("name", ["tv.regnet_y_400mf", pytest.param("tv.resnext50_32x4d", marks=pytest.mark.slow)])
def test_grouped_torchvision_models_slim_with_per_layer_masks_and_equal_the_masked_model(name):
    """Per-layer masks leave a grouped conv's groups unequal; the groups keep as many as their fullest (0.80
    and 0.77 of the MACs at k = 0.5; coupled masks, which tie the groups, reach 0.26: tests/test_coupling.py)."""
    model, example = tv_masked_model(name)
    net, report = slim(model, example=example)
    x = torch.randn(2, *example.shape[1:])
    with torch.no_grad():
        ref, got = model(x), net(x)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()) + 1e-6
    grouped = {n: m.groups for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    after = dict(net.named_modules())
    assert grouped and all(after[n].groups == g for n, g in grouped.items())
    assert report.slim_macs < 0.85 * report.dense_macs
