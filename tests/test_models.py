"""The architecture registry: names, shapes, and the HYDRA/BiP/torchvision state-dict names that
checkpoints users bring depend on."""

import copy
import io

import pytest
import torch
import torchvision
from torch import nn

from configs.errors import UserError
from models import MODELS, build_model, model_names, register_model

REQUIRED = {
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnet20s", "resnet32s", "resnet44s", "resnet56s",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn",
    "wrn_28_10", "wrn_28_4", "wrn_34_10", "wrn_40_2",
    "ResNet18", "ResNet34", "ResNet50",
    "smallcnn",
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The test machine is small and shared; one intra-op thread is faster than oversubscription.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def natural_size(name: str) -> tuple[int, int]:
    """(channels, side) of the smallest input the model is meant for."""
    if name == "smallcnn":
        return 1, 8
    if name.startswith("lenet"):
        return 1, 28
    if name.startswith("ResNet"):
        return 3, 64
    return 3, 32


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def keys(name: str, **kw) -> dict[str, tuple]:
    kw.setdefault("num_classes", 10)
    return {k: tuple(v.shape) for k, v in build_model(name, **kw).state_dict().items()}


# --- registry ------------------------------------------------------------------------------------

def test_names_sorted_and_complete():
    names = model_names()
    assert names == sorted(names)
    assert REQUIRED <= set(names), REQUIRED - set(names)
    assert set(names) == set(MODELS)


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="resnet18"):
        register_model("resnet18")(lambda **kw: nn.Linear(1, 1))
    try:
        register_model("_test_only")(lambda **kw: nn.Linear(kw["in_channels"], kw["num_classes"]))
        assert isinstance(build_model("_test_only", num_classes=4), nn.Linear)
        with pytest.raises(ValueError):
            register_model("_test_only")(lambda **kw: None)
    finally:
        MODELS.pop("_test_only", None)


@pytest.mark.parametrize("typo, closest", [("resnet19", "resnet18"), ("resnet20", "resnet20s"),
                                           ("wrn28_10", "wrn_28_10"), ("vgg16bn", "vgg16_bn")])
def test_unknown_name_suggests_closest(typo, closest):
    with pytest.raises(UserError) as info:
        build_model(typo, num_classes=10)
    msg = str(info.value)
    assert "\n" not in msg
    assert repr(typo) in msg and f"did you mean {closest!r}" in msg and "--help" in msg


def test_bad_sizes_rejected():
    with pytest.raises(ValueError):
        build_model("resnet20s", num_classes=0)


# --- every model ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", model_names())
def test_forward_natural_input(name):
    c, side = natural_size(name)
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=c, image_size=side).eval()
    with torch.no_grad():
        out = model(torch.randn(2, c, side, side))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    # Dense and plain: the masked-layer converter swaps exactly nn.Conv2d and nn.Linear, so every
    # parameter must live in one of those (or a BN), and there must be something of each to mask.
    kinds = {type(m) for m in model.modules() if list(m.parameters(recurse=False))}
    assert kinds <= {nn.Conv2d, nn.Linear, nn.BatchNorm2d}, kinds
    assert nn.Linear in kinds  # every classifier ends in one; LeNet-300-100 has no conv at all
    assert nn.Conv2d in kinds or name == "lenet300"
    assert not any("score" in k or "mask" in k for k in model.state_dict())


@pytest.mark.parametrize("name", model_names())
def test_in_channels_and_num_classes_honoured(name):
    side = 8  # every model must take the digits' 8x8, and it keeps this test cheap
    model = build_model(name, num_classes=100, in_channels=1, image_size=side).eval()
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert (first.in_channels if isinstance(first, nn.Conv2d) else first.in_features) in (1, side * side)
    with torch.no_grad():
        assert model(torch.randn(2, 1, side, side)).shape == (2, 100)


# --- state-dict names and sizes ------------------------------------------------------------------

def test_lenets_are_the_lottery_ticket_sizes():
    # Frankle & Carbin (2019), Table 1: LeNet-300-100 has 266,200 weights (784-300-100-10);
    # LeNet-5 at 28x28: 150 + 2,400 + 48,000 + 10,080 + 840 = 61,470.
    def weights(model: nn.Module) -> int:
        return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert weights(build_model("lenet300", num_classes=10, in_channels=1, image_size=28)) == 266_200
    lenet5 = build_model("lenet5", num_classes=10, in_channels=1, image_size=28)
    assert weights(lenet5) == 61_470 and lenet5.fc1.in_features == 16 * 5 * 5


def test_resnet18_cifar_names_and_size():
    k = keys("resnet18")
    assert k["conv1.weight"] == (64, 3, 3, 3)
    assert "conv1.bias" not in k
    assert k["layer2.0.shortcut.0.weight"] == (128, 64, 1, 1)
    assert k["layer2.0.shortcut.1.running_var"] == (128,)
    assert not any(x.startswith(("layer1.0.shortcut", "layer2.1.shortcut")) for x in k)
    assert k["linear.weight"] == (10, 512) and k["linear.bias"] == (10,)
    assert {x.split(".")[0] for x in k} == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "linear"}
    assert n_params(build_model("resnet18", num_classes=10)) == 11_173_962


def test_resnet50_cifar_bottleneck_names():
    k = keys("resnet50")
    assert k["layer1.0.conv3.weight"] == (256, 64, 1, 1)
    assert k["layer1.0.bn3.weight"] == (256,)
    assert k["layer1.0.shortcut.0.weight"] == (256, 64, 1, 1)
    assert k["layer4.2.conv2.weight"] == (512, 512, 3, 3)
    assert k["linear.weight"] == (10, 2048)


def test_resnet20s_names_and_size():
    model = build_model("resnet20s", num_classes=10)
    k = {n: tuple(v.shape) for n, v in model.state_dict().items()}
    assert not any("shortcut" in x for x in k)  # option A is parameter-free
    assert k["fc.weight"] == (10, 64) and not any(x.startswith("linear") for x in k)
    assert k["layer3.2.conv2.weight"] == (64, 64, 3, 3) and "layer4.0.conv1.weight" not in k
    # He et al./akamaster's 0.27M: 269,722 parameters with 10 classes.
    assert n_params(model) == 269_722
    convs = [p.numel() for n, p in model.named_parameters() if p.dim() == 4]
    assert sum(convs) == 267_696
    assert sum(convs[1:]) == 267_264  # without the 3x3x3x16 stem


@pytest.mark.parametrize("name, count", [("resnet32s", 464_154), ("resnet44s", 658_586),
                                         ("resnet56s", 853_018)])
def test_resnet_s_sizes(name, count):
    assert n_params(build_model(name, num_classes=10)) == count


def test_option_a_shortcut_is_subsample_and_zero_pad():
    block = build_model("resnet20s", num_classes=10).layer2[0]
    x = torch.randn(2, 16, 8, 8)
    y = block.shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


def test_wrn_28_10_names_and_size():
    model = build_model("wrn_28_10", num_classes=10)
    k = {n: tuple(v.shape) for n, v in model.state_dict().items()}
    assert k["block1.layer.0.convShortcut.weight"] == (160, 16, 1, 1)
    assert k["block3.layer.0.convShortcut.weight"] == (640, 320, 1, 1)
    assert "block1.layer.1.convShortcut.weight" not in k
    assert k["block2.layer.3.bn2.weight"] == (320,) and "block2.layer.4.bn2.weight" not in k
    assert not any(x.startswith("sub_block1") for x in k)
    assert k["bn1.weight"] == (640,) and k["fc.weight"] == (10, 640)
    assert {x.split(".")[0] for x in k} == {"conv1", "block1", "block2", "block3", "bn1", "fc"}
    assert n_params(model) == 36_479_194  # the published 36.5M


def test_vgg_names():
    k = keys("vgg11")
    convs = sorted(int(x.split(".")[1]) for x in k if x.startswith("features.") and len(k[x]) == 4)
    assert convs == [0, 3, 6, 8, 11, 13, 16, 18]
    assert not any(x.startswith("features.") and x.endswith(".bias") for x in k)  # convs have no bias
    assert k["classifier.0.weight"] == (256, 512 * 2 * 2)
    assert k["classifier.2.weight"] == (256, 256)
    assert k["classifier.4.weight"] == (10, 256) and k["classifier.4.bias"] == (10,)
    kb = keys("vgg16_bn")
    assert kb["features.0.weight"] == (64, 3, 3, 3) and kb["features.1.running_mean"] == (64,)
    assert kb["features.3.weight"] == (64, 64, 3, 3) and kb["features.40.weight"] == (512, 512, 3, 3)
    assert max(int(x.split(".")[1]) for x in kb if x.startswith("features.")) == 41  # 13 x (conv, bn, relu) + 4 pools


@pytest.mark.parametrize("name, factory", [("ResNet18", torchvision.models.resnet18),
                                           ("ResNet50", torchvision.models.resnet50)])
def test_imagenet_resnet_matches_torchvision(name, factory):
    ours = keys(name, num_classes=1000)
    ref = {n: tuple(v.shape) for n, v in factory(weights=None).state_dict().items()}
    assert ours == ref
    assert "layer2.0.downsample.0.weight" in ours and ours["fc.weight"][0] == 1000
    gray = keys(name, num_classes=10, in_channels=1)
    assert gray["conv1.weight"] == (64, 1, 7, 7) and gray["fc.weight"][0] == 10


def test_smallcnn_size():
    model = build_model("smallcnn", num_classes=10, in_channels=1, image_size=8)
    assert 50_000 <= n_params(model) <= 300_000


def test_models_pickle_and_copy():
    # Checkpoints and the dense<->masked conversion copy whole modules; a lambda inside would break.
    model = build_model("resnet20s", num_classes=10)
    torch.save(model, io.BytesIO())
    twin = copy.deepcopy(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
