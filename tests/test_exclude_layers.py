"""--exclude-layers: named layers stay plain for every trainer and granularity, the counts stay exact over
the others, the checkpoint records it, loading and export honour it, and a bad pattern is one line."""
import glob
import os

import pytest
import torch
from torch import nn

import export
import train
from layers import MaskedLayer, n_keep, to_masked
from layers.convert import excluded_layers
from models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINERS = {  # config, extra flags, scope of its selection
    "hydra": (["--configs", os.path.join(ROOT, "configs", "Digits", "hydra.yml")], "layer"),
    "bilevel": (["--configs", os.path.join(ROOT, "configs", "Digits", "bip.yml")], "global"),
    "woodfisher": (["--configs", os.path.join(ROOT, "configs", "Digits", "woodfisher.yml"), "--one-shot"], "global"),
}
UNIT_DIM = {"filter": 0, "channel": 1}


def test_to_masked_leaves_matching_layers_plain():
    model = to_masked(build_model("resnet20s", num_classes=10), granularity="unstructured",
                      exclude=["conv1", "layer3.*.conv2", "fc"])
    plain = {n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}
    assert plain == {"conv1", "fc", "layer3.0.conv2", "layer3.1.conv2", "layer3.2.conv2"}
    assert all(not isinstance(model.get_submodule(n), MaskedLayer) for n in plain)
    assert sum(isinstance(m, MaskedLayer) for m in model.modules()) == 20 - 5  # 19 convs and fc, less the 5


def test_unknown_pattern_names_the_layers():
    with pytest.raises(ValueError, match="'cnv1' matches no Conv2d/Linear/attention layer.*did you mean 'conv1'"):
        excluded_layers(build_model("smallcnn", num_classes=10), ["cnv1"])


def units(mask, granularity):
    if granularity == "unstructured":
        return mask.flatten()
    dim = UNIT_DIM[granularity]
    return mask.transpose(0, dim).flatten(1).any(1)


@pytest.mark.parametrize("granularity", ["unstructured", "filter", "channel"])
@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_every_trainer_and_granularity_keeps_excluded_layers_dense(trainer, granularity, digits_pretrained, tmp_path):
    flags, scope = TRAINERS[trainer]
    k = 0.3
    assert train.main([*flags, "--exp-mode", "prune", "--layer-type", granularity, "--k", str(k), "--epochs", "1",
                       "--data-fraction", "0.2", "--source-net", digits_pretrained, "--exclude-layers", "conv1,fc*",
                       "--result-dir", str(tmp_path), "--exp-name", "x", "--no-progress"]) == 0
    ckpt = torch.load(glob.glob(str(tmp_path / "x" / "prune" / "*" / "checkpoint" / "checkpoint.pth.tar"))[0],
                      weights_only=True)
    assert ckpt["config"]["exclude_layers"] == "conv1,fc*"
    masks = ckpt["masks"]
    expected = {"conv2", "conv3"} | ({"fc1", "fc2"} if granularity == "unstructured" else set())
    assert set(masks) == expected - {"fc1", "fc2"}  # fc* excluded too
    sd = ckpt["state_dict"]
    assert not any(key.startswith(("conv1.", "fc1.", "fc2.")) and key.endswith((".mask", ".popup_scores"))
                   for key in sd)
    assert bool(sd["conv1.weight"].ne(0).all())  # nothing pruned there
    kept = [units(masks[name], granularity) for name in sorted(masks)]
    if scope == "layer":
        assert all(int(u.sum()) == n_keep(k, u.numel()) for u in kept)
    else:
        assert sum(int(u.sum()) for u in kept) == n_keep(k, sum(u.numel() for u in kept))


@pytest.fixture(scope="module")
def excluded_filter_checkpoint(digits_pretrained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("excl")
    assert train.main(["--configs", os.path.join(ROOT, "configs", "Digits", "hydra.yml"), "--exp-mode", "prune",
                       "--layer-type", "filter", "--k", "0.25", "--epochs", "1", "--data-fraction", "0.2",
                       "--source-net", digits_pretrained, "--exclude-layers", "conv1",
                       "--result-dir", str(tmp), "--exp-name", "x", "--no-progress"]) == 0
    return glob.glob(str(tmp / "x" / "prune" / "*" / "checkpoint" / "model_best.pth.tar"))[0]


def test_export_honours_the_exclusion(excluded_filter_checkpoint, tmp_path):
    from deploy import load_program
    out = str(tmp_path / "slim.pt2")
    assert export.main([excluded_filter_checkpoint, "--format", "slim", "--out", out]) == 0
    program = load_program(out)
    # conv1 (excluded) keeps its 32 filters; conv2 and conv3 keep a quarter of theirs
    weights = sorted((n, p.shape) for n, p in program.named_parameters() if p.dim() == 4)
    assert [tuple(s) for _, s in weights] == [(32, 1, 3, 3), (16, 32, 3, 3), (32, 16, 3, 3)]


def test_finetune_needs_the_same_exclusion(excluded_filter_checkpoint, tmp_path, capsys):
    args = ["--configs", os.path.join(ROOT, "configs", "Digits", "finetune.yml"), "--exp-mode", "finetune",
            "--layer-type", "filter", "--k", "0.25", "--epochs", "1", "--source-net", excluded_filter_checkpoint,
            "--result-dir", str(tmp_path), "--exp-name", "ft", "--no-progress"]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "exclude_layers='conv1'" in err and "--exclude-layers conv1" in err
    assert not os.path.exists(tmp_path / "ft")


def test_bad_pattern_is_one_line_and_no_folder(digits_pretrained, tmp_path, capsys):
    assert train.main(["--exp-mode", "prune", "--layer-type", "filter", "--k", "0.5", "--epochs", "1",
                       "--source-net", digits_pretrained, "--exclude-layers", "conv9",
                       "--result-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --exclude-layers:") and "conv9" in err and "\n" not in err
    assert os.listdir(tmp_path) == []
