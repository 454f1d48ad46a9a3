"""--obs-update: HYDRA and BiP compensate the weights their learned mask removes, with the shared OBS solver."""
import glob
import json
import os

import pytest
import torch

import train
from engine.checkpoint import load_checkpoint
from tests.helpers.cli import run_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FISHER = ["--fisher-subsample-size", "16", "--fisher-mini-bsz", "4", "--fittable-params", "256"]
QUICK = ["--epochs", "1", "--no-progress", "--data-fraction", "0.5"]


@pytest.mark.parametrize("config", ["hydra", "bip"])
def test_prune_end_compensation_is_logged_written_and_fine_tunable(tmp_path, capsys, digits_pretrained, config):
    res = str(tmp_path / "res")
    assert train.main(["--configs", os.path.join(ROOT, "configs", "Digits", f"{config}.yml"), "--k", "0.05",
                       "--source-net", digits_pretrained, "--result-dir", res, "--obs-update", *FISHER, *QUICK]) == 0
    out = capsys.readouterr().out
    assert "OBS update (the learned mask, at the end of pruning, --obs-update)" in out
    run = glob.glob(os.path.join(res, "*", "prune", "*"))[0]
    summary = json.load(open(os.path.join(run, "summary.json")))
    obs = summary["obs_update"]["prune_end"]
    assert obs["scale"] in (0.0, 0.25, 0.5, 1.0) and obs["removed"] > 0
    # the kept scale is the one with the lowest line-search loss
    assert obs["line_search_losses"][[0.0, 0.25, 0.5, 1.0].index(obs["scale"])] == min(obs["line_search_losses"])
    # summary.json's test_top1 is the run's own last model (checkpoint.pth.tar), the compensated one is apart
    assert summary["test_top1"] == pytest.approx(obs["test_top1_before"])
    assert obs["line_search_on"] == "validation"  # Digits has a validation split: held out from the Fisher
    ckpt = load_checkpoint(obs["checkpoint"])
    assert ckpt["masks_frozen"] and ckpt["obs_update"]["scale"] == obs["scale"]
    for name, mask in ckpt["masks"].items():  # the removed weights are exactly 0 in the written model
        assert bool((ckpt["state_dict"][f"{name}.weight"][~mask] == 0).all())
    assert train.main(["--configs", os.path.join(ROOT, "configs", "Digits", "finetune.yml"), "--k", "0.05",
                       "--source-net", obs["checkpoint"], "--result-dir", res, *QUICK]) == 0


def test_finetune_start_compensation_is_reported_and_not_repeated_on_resume(tmp_path, capsys, digits_pretrained):
    res = str(tmp_path / "res")
    assert train.main(["--configs", os.path.join(ROOT, "configs", "Digits", "hydra.yml"), "--k", "0.05",
                       "--source-net", digits_pretrained, "--result-dir", res, *QUICK]) == 0
    pruned = glob.glob(os.path.join(res, "*", "prune", "*", "checkpoint", "model_best.pth.tar"))[0]
    capsys.readouterr()
    assert train.main(["--configs", os.path.join(ROOT, "configs", "Digits", "finetune.yml"), "--k", "0.05",
                       "--source-net", pruned, "--result-dir", res, "--obs-update", *FISHER, "--epochs", "2",
                       "--no-progress", "--data-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "OBS update (the source's mask, before fine-tuning, --obs-update)" in out
    assert "test top1" in out.split("OBS update")[1].splitlines()[0]
    run = glob.glob(os.path.join(res, "*", "finetune", "*"))[0]
    assert "finetune_start" in json.load(open(os.path.join(run, "summary.json")))["obs_update"]
    assert train.main(["--resume", os.path.join(run, "checkpoint", "checkpoint.pth.tar")]) == 0
    assert "OBS update" not in capsys.readouterr().out  # the checkpoint holds the compensated weights


@pytest.mark.parametrize("args,needle", [
    (["--trainer", "woodfisher", "--exp-mode", "prune", "--k", "0.1", "--prune-end", "0"], "woodfisher trainer applies"),
    (["--k", "1.0"], "pretrain has no mask"),
    (["--exp-mode", "finetune", "--k", "0.1", "--evaluate"], "--evaluate changes no weight"),
])
def test_obs_update_where_it_does_not_apply_is_refused(tmp_path, capsys, digits_pretrained, args, needle):
    assert needle in run_error(tmp_path, capsys, "--source-net", digits_pretrained, "--obs-update", *args)


def test_line_search_keeps_no_move_when_every_move_hurts(digits_pretrained, monkeypatch):
    """If the OBS update only raises the loss, the factor 0 wins and the kept weights are untouched."""
    from data import build_dataset, build_loaders
    from layers import MaskSet, to_masked
    from models import build_model
    from pruning.solver import FisherSettings
    from engine import obs_update as compensation

    splits = build_dataset("Digits", data_dir=".", normalize=True)
    loaders = build_loaders(splits, batch_size=64, test_batch_size=256, seed=0)
    model = build_model("smallcnn", num_classes=10, in_channels=1, image_size=8)
    to_masked(model, granularity="unstructured")
    sd = load_checkpoint(digits_pretrained)["state_dict"]
    model.load_state_dict({**model.state_dict(), **sd})
    ms = MaskSet(model, k=0.5, granularity="unstructured", scope="global")
    with torch.no_grad():
        for layer in ms.layers.values():
            layer.popup_scores.copy_(layer.weight.abs())
    ms.step(force=True)
    kept = {n: (layer.weight * layer.mask).detach().clone() for n, layer in ms.layers.items()}
    real_compensate = compensation.OBSSolver.compensate

    def harmful(self, new_masks, **kw):  # an update that moves every kept weight by a lot
        record = real_compensate(self, new_masks, **kw)
        with torch.no_grad():
            for layer in self.layers.values():
                layer.weight.add_(layer.mask * 3.0)
        return record

    monkeypatch.setattr(compensation.OBSSolver, "compensate", harmful)
    result = compensation.compensate_fixed_mask(model=model, maskset=ms, loaders=loaders, device=torch.device("cpu"),
                                                fisher=FisherSettings(m=8, samples_per_grad=2, block_size=256))
    assert result.scale == 0.0 and result.losses[0] == min(result.losses)
    for name, layer in ms.layers.items():
        assert torch.equal(layer.weight.detach(), kept[name])
