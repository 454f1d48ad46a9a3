"""What a new user meets first: quiet logs when stderr is not a terminal, launchers that use the run
folder each run printed, shipped configs that point at the CLI's data folder, structured runs that
keep every class."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--epochs", "1", "--batch-size", "64", "--data-fraction", "0.3", "--lr", "0.05"]


def run_here(capsys, *args) -> tuple[int, str, str]:
    """train.main in this process, from the project folder (the config paths are relative to it);
    (exit code, stdout, stderr)."""
    import contextlib
    import train
    capsys.readouterr()
    with contextlib.chdir(ROOT):
        code = train.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_no_progress_bar_into_a_redirected_stderr(tmp_path, capsys, train_processes):
    # a user's process: python train.py (forked after its imports, see tests/helpers/processes.py)
    proc = train_processes.run("--result-dir", str(tmp_path), "--print-freq", "2", *QUICK)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""                      # no bar redraws (a bar writes ~190 bytes per step)
    assert "epoch 0 [0/" in proc.stdout and "epoch 0 [2/" in proc.stdout   # per --print-freq lines instead
    # --progress still draws one (in this process: pytest's capture is a redirected stderr too)
    code, _, err = run_here(capsys, "--result-dir", str(tmp_path), "--progress", *QUICK)
    assert code == 0 and "epoch 0:" in err


def test_shipped_configs_read_data_from_the_cli_default_folder():
    for path in glob.glob(os.path.join(ROOT, "configs", "*", "*.yml")):
        data = yaml.safe_load(open(path, encoding="utf-8"))
        assert data.get("data_dir", "./datasets") == "./datasets", path


def test_pipeline_uses_the_folder_each_run_printed(tmp_path, digits_pretrained):
    """Nine older prune runs under the same name: sorting names would pick '9--...' over '10--...'."""
    out = tmp_path / "res"
    name = "Digits_bip_k0.1"
    for n in range(1, 10):
        os.makedirs(out / name / "prune" / f"{n}--k-0.1_trainer-bilevel_epochs-8_arch-smallcnn" / "checkpoint")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "PRETRAINED": digits_pretrained}
    proc = subprocess.run(["bash", "sh/pipeline.sh", "Digits", "bip", "0.1", *QUICK], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fine = glob.glob(str(out / name / "finetune" / "*" / "summary.json"))
    assert len(fine) == 1
    source = torch.load(glob.glob(str(out / name / "finetune" / "*" / "checkpoint" / "checkpoint.pth.tar"))[0],
                        weights_only=True)["config"]["source_net"]
    assert "/10--" in source and json.load(open(fine[0]))["stage"] == "finetune"


@pytest.mark.parametrize("trainer", ["base", "bilevel", "woodfisher"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_structured_runs_keep_every_class_and_never_empty_a_layer(tmp_path, capsys, digits_pretrained, trainer,
                                                                  scope):
    config = {"base": "hydra", "bilevel": "bip", "woodfisher": "woodfisher"}[trainer]
    extra = ["--prune-end", "0", "--fisher-subsample-size", "16", "--no-woodburry-joint-sparsify"] \
        if trainer == "woodfisher" and scope == "layer" else \
        (["--prune-end", "0", "--fisher-subsample-size", "16"] if trainer == "woodfisher" else [])
    args = ["--configs", f"configs/Digits/{config}.yml", "--source-net", digits_pretrained, "--layer-type", "filter",
            "--k", "0.05", "--scope", scope, "--result-dir", str(tmp_path), "--no-progress", *QUICK, *extra]
    code, _, err = run_here(capsys, *args)
    assert code == 0, err[-2000:]
    ckpt = torch.load(glob.glob(str(tmp_path / "*" / "prune" / "*" / "checkpoint" / "checkpoint.pth.tar"))[0],
                      weights_only=True)
    masks = ckpt["masks"]
    assert set(masks) == {"conv1", "conv2", "conv3"}          # fc1/fc2 stay plain: no class is removed
    for name, mask in masks.items():
        assert int(mask.flatten(1).all(1).sum()) >= 1, name   # every conv keeps at least one filter
    assert "fc2.popup_scores" not in ckpt["state_dict"] and "fc2.weight" in ckpt["state_dict"]


@pytest.mark.parametrize("args,flag", [
    (["--trainer", "woodfisher", "--fisher-subsample-size", "100000000"], "--fisher-subsample-size"),
    (["--trainer", "woodfisher", "--fisher-mini-bsz", "100000000"], "--fisher-mini-bsz"),
    (["--image-dim", "100000"], "--image-dim"),
    (["--arch", "resnet18", "--image-dim", "100000"], "--image-dim"),
])
def test_runs_that_cannot_fit_in_memory_are_refused_up_front(tmp_path, capsys, digits_pretrained, args, flag):
    import train
    base = ["--exp-mode", "prune", "--k", "0.1", "--source-net", digits_pretrained, "--epochs", "2",
            "--prune-end", "1", "--result-dir", str(tmp_path), "--no-progress"]
    if "resnet18" in args:
        base = ["--result-dir", str(tmp_path), "--no-progress"]
    assert train.main([*base, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and flag in err
    assert not list(tmp_path.iterdir())


def test_an_image_size_the_architecture_cannot_take_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import train
    from torch import nn
    from models import registry

    def needs_8_pixels(*, num_classes, in_channels, image_size):
        return nn.Sequential(nn.Conv2d(in_channels, 4, 8), nn.Flatten(), nn.LazyLinear(num_classes))

    registry.MODELS.add("needs8", needs_8_pixels)
    try:
        assert train.main(["--arch", "needs8", "--image-dim", "4", "--result-dir", str(tmp_path)]) == 2
    finally:
        registry.MODELS.pop("needs8")
    err = capsys.readouterr().err.strip()
    assert "cannot take 4x4 inputs" in err and "--image-dim" in err and "\n" not in err
    assert not list(tmp_path.iterdir())


def test_collapse_rule():
    from engine.loop import collapsed
    assert collapsed(before=99.0, after=10.0, num_classes=10)
    assert collapsed(before=30.0, after=15.0, num_classes=10)
    assert not collapsed(before=29.0, after=10.0, num_classes=10)    # was not clearly above chance
    assert not collapsed(before=99.0, after=16.0, num_classes=10)    # did not reach chance
    assert not collapsed(before=None, after=1.0, num_classes=10)


def test_a_pruning_step_that_breaks_the_network_is_reported_loudly(tmp_path, capsys, digits_pretrained):
    """WoodTaylor's Newton step at a tiny damp (the collapse the old default gave) in a one-shot run."""
    code, out, err = run_here(capsys, "--configs", "configs/Digits/woodfisher.yml", "--source-net", digits_pretrained,
                              "--prune-method", "woodtaylor", "--fisher-damp", "1e-7", "--one-shot", "--epochs", "1",
                              "--fisher-subsample-size", "16", "--result-dir", str(tmp_path), "--no-progress")
    assert code == 0, err[-2000:]
    assert "WARNING: val top-1 collapsed" in err and "right after a pruning event" in err
    assert "WARNING: accuracy collapsed to about chance in epoch(s) 1" in out
    summary = json.load(open(glob.glob(str(tmp_path / "*" / "prune" / "*" / "summary.json"))[0]))
    assert summary["collapsed_epochs"] == [1]
