"""N:M semi-structured masks (--layer-type nm): exact per-group counts, the group layout, ties, the
WoodFisher event (statistic per group, OBS update against a float64 brute force), magnitude, the
run's bad input (exit 2, one line, nothing written), runs on Digits and their export."""
from __future__ import annotations

import glob
import os
from functools import partial

import pytest
import torch
from torch import nn

import train
from configs.errors import UserError
from configs.options import WoodFisherOptions, parse_nm
from configs.schema import load_config
from deploy import export_model, load_sparse
from deploy.semi_structured import is_two_four, semi_structured, unavailable_reason
from engine.checkpoint import load_checkpoint
from engine.optim import OptimSettings
from layers import MaskSet, NMShapeError, select_masks, select_nm, to_masked
from pruning.methods import PRUNE_METHODS
from pruning.solver import FisherSettings, OBSSolver
from trainers import TRAINERS
from tests.helpers.cli import run_error
from tests.helpers.tiny import tiny_net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--epochs", "1", "--batch-size", "128", "--no-progress", "--data-fraction", "0.3", "--lr", "0.05"]


def groups(mask: torch.Tensor, m: int) -> torch.Tensor:
    """(groups, m): along input features (Linear) or input channels at each (out, kh, kw) (Conv2d)."""
    return mask.movedim(1, -1).reshape(-1, m)


def reference_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Brute force: per (out, kh, kw) position and group of m input channels, the n largest |s|,
    ties to the higher channel index."""
    s = scores.abs()
    s4 = s.reshape(s.shape[0], s.shape[1], -1)
    keep = torch.zeros(s4.shape, dtype=torch.bool)
    for o in range(s4.shape[0]):
        for p in range(s4.shape[2]):
            for g0 in range(0, s4.shape[1], m):
                ranked = sorted(range(g0, g0 + m), key=lambda c: (float(s4[o, c, p]), c), reverse=True)
                for c in ranked[:n]:
                    keep[o, c, p] = True
    return keep.reshape(scores.shape)


# -- the selector ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("shape", [(6, 16), (5, 8, 3, 3), (4, 16, 1, 1), (3, 8, 2, 5)])
def test_every_group_keeps_exactly_n(n, m, shape):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mask = select_nm(scores, (n, m))
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    assert bool((groups(mask, m).sum(1) == n).all())
    assert int(mask.sum()) == scores.numel() * n // m
    assert torch.equal(mask, reference_nm(scores, n, m))


def test_conv_groups_run_along_input_channels_not_memory_order():
    """A 3x3 kernel: groups are 4 channels at one position (ASP's order), not 4 neighbours in memory."""
    scores = torch.zeros(1, 4, 3, 3)
    scores[0, 0] = 5.0  # channel 0 dominates everywhere: memory-order groups would keep 2 of its 9 taps only
    scores[0, 3] = 4.0
    mask = select_nm(scores, (2, 4))
    assert bool(mask[0, 0].all()) and bool(mask[0, 3].all()) and not bool(mask[0, 1:3].any())


def test_ties_keep_the_higher_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, -3.0, 3.0, 3.0, 0.0]])
    mask = select_nm(scores, (2, 4))
    # |-3| ties with the two 3s: the two higher indices win, as in HYDRA/BiP's ascending sort
    assert mask.tolist() == [[False, False, True, True, True, False, False, True, False, True, True, False]]


def test_select_masks_takes_nm_and_ignores_k_scope_and_floor():
    scores = [torch.randn(4, 8), torch.randn(3, 4, 2, 2)]
    for scope in ("global", "layer"):
        masks = select_masks(scores, k=0.1, granularity="nm", scope=scope, min_units=3, nm=(2, 4))
        assert [torch.equal(a, select_nm(s, (2, 4))) for a, s in zip(masks, scores)] == [True, True]
    with pytest.raises(ValueError, match="nm=\\(N, M\\)"):
        select_masks(scores, k=0.5, granularity="nm", scope="global")


def test_nan_scores_are_refused():
    with pytest.raises(FloatingPointError):
        select_nm(torch.tensor([[1.0, float("nan"), 0.0, 2.0]]), (2, 4))


# -- the mask set (HYDRA/BiP follow the scores through it) ----------------------------------------
# dense: conv 3->8, conv 8->8 stride 2 (both with bias, no BatchNorm), linear 32->4, on 4x4 inputs;
# layers "0", "2" and "5"
net = partial(tiny_net, in_channels=3, width=8, num_classes=4, bias=True, batch_norm=False)


def test_a_layer_whose_input_is_not_a_multiple_of_m_is_named():
    model = to_masked(net(), granularity="nm")
    with pytest.raises(NMShapeError, match=r"0 \(3\)") as info:
        MaskSet(model, k=0.5, granularity="nm", scope="global", nm=(2, 4))
    assert info.value.names == ["0"]
    ms = MaskSet(to_masked(net(), granularity="nm", exclude=["0"]), k=0.5, granularity="nm", scope="global",
                 nm=(2, 4))
    assert list(ms.layers) == ["2", "5"]  # the classifier is masked too: 2:4 keeps half of every row


def test_mask_set_follows_the_scores_and_keeps_n_of_m():
    ms = MaskSet(to_masked(net(), granularity="nm", exclude=["0"]), k=0.25, granularity="nm", scope="layer",
                 nm=(1, 4))
    ms.step(force=True)
    for _ in range(3):
        with torch.no_grad():
            for layer in ms.layers.values():
                layer.popup_scores.add_(torch.randn_like(layer.popup_scores))
        masks = ms.masks()  # re-selected: the scores' versions moved
        for name, layer in ms.layers.items():
            assert torch.equal(masks[name], select_nm(layer.popup_scores, (1, 4)))
            assert bool((groups(masks[name], 4).sum(1) == 1).all())
    assert ms.density() == 0.25
    state = ms.state_dict()
    assert state["nm"] == (1, 4)
    other = MaskSet(to_masked(net(), granularity="nm", exclude=["0"]), k=0.25, granularity="nm", scope="layer",
                    nm=(2, 8))
    with pytest.raises(ValueError, match="nm"):
        other.load_state_dict(state)


def test_a_hydra_step_keeps_n_of_m():
    model = to_masked(net(), granularity="nm", exclude=["0"])
    ms = MaskSet(model, k=0.5, granularity="nm", scope="global", nm=(2, 4))
    ms.step(force=True)
    opt = OptimSettings(optimizer="sgd", lr=0.5, momentum=0.0, wd=0.0, schedule="constant", epochs=1)
    trainer = TRAINERS["base"](model=model, maskset=ms, mode="prune", device=torch.device("cpu"), weight_optim=opt,
                               score_optim=opt, progress=False, log=lambda line: None)
    before = ms.masks()
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        trainer.step((torch.randn(16, 3, 4, 4, generator=g), torch.randint(0, 4, (16,), generator=g)))
    after = ms.masks()
    assert any(not torch.equal(before[n], after[n]) for n in after)  # the scores moved the masks...
    for mask in after.values():
        assert bool((groups(mask, 4).sum(1) == 2).all())  # ...and every group still keeps exactly 2


# -- WoodFisher and magnitude with N:M -------------------------------------------------------------
def linear_setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 3, bias=False))
    to_masked(model, granularity="nm")
    model = model.double()
    G = torch.randn(5, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1)) * 0.3
    return model, {"0": model[0]}, G


@pytest.mark.parametrize("joint", [True, False])
def test_woodfisher_nm_event_against_a_float64_brute_force(joint):
    """Per group the 2 largest w^2/[F^-1]_qq are kept; the update is the OBS one for the removed set
    (joint: the KKT optimum of min 1/2 dw^T F dw with w_Q + dw_Q = 0; sum: single updates added)."""
    model, layers, G = linear_setup()
    damp = 1e-2
    solver = OBSSolver(layers, granularity="nm", method=PRUNE_METHODS["woodfisher"], nm=(2, 4),
                       fisher=FisherSettings(m=5, damp=damp, blocks="layer"))
    solver.add_gradients(G)
    w = layers["0"].weight.detach().reshape(-1).clone()
    F = damp * torch.eye(24, dtype=torch.float64) + G.T @ G / 5
    Finv = torch.linalg.inv(F)
    stat = w ** 2 / Finv.diagonal()
    expected_mask = reference_nm(stat.view(3, 8), 2, 4)
    masks = solver.prune_to(0.5, scope="global", joint=joint)
    assert torch.equal(masks["0"], expected_mask) and torch.equal(layers["0"].mask, expected_mask)
    Q = (~expected_mask).reshape(-1).nonzero().squeeze(1)
    if joint:
        E = torch.zeros(24, len(Q), dtype=torch.float64)
        E[Q, torch.arange(len(Q))] = 1.0
        kkt = torch.cat([torch.cat([F, E], 1), torch.cat([E.T, torch.zeros(len(Q), len(Q), dtype=torch.float64)], 1)])
        dw = torch.linalg.solve(kkt, torch.cat([torch.zeros(24, dtype=torch.float64), -w[Q]]))[:24]
    else:
        dw = -(Finv[:, Q] * (w[Q] / Finv.diagonal()[Q])).sum(1)
    expected = (w + dw).masked_fill(~expected_mask.reshape(-1), 0.0).view(3, 8)
    torch.testing.assert_close(layers["0"].weight.detach(), expected, rtol=1e-7, atol=1e-10)
    survivors = expected_mask
    assert not torch.allclose(layers["0"].weight.detach()[survivors], w.view(3, 8)[survivors])  # the update moved them
    assert solver.record.solve == ("joint" if joint else "sum") and solver.record.pruned == 12


@pytest.mark.parametrize("method", ["magnitude", "globalmagnitude"])
def test_magnitude_nm_is_the_per_group_top_n_of_abs_w(method):
    model, layers, _ = linear_setup()
    w = layers["0"].weight.detach().clone()
    solver = OBSSolver(layers, granularity="nm", method=PRUNE_METHODS[method], nm=(1, 4))
    masks = solver.prune_to(0.25, scope=PRUNE_METHODS[method].scope or "global")
    assert torch.equal(masks["0"], reference_nm(w, 1, 4))
    assert torch.equal(layers["0"].weight.detach(), w * masks["0"])  # zeroed, nothing else moved


def woodfisher_options(**kw):
    base = dict(prune_start=0, prune_freq=1, prune_end=1, init_sparsity=0.3, fisher_subsample_size=6,
                fisher_mini_bsz=2, fittable_params=16)
    return WoodFisherOptions(**{**base, **kw})


def woodfisher(options, epochs=3):
    model = to_masked(net(), granularity="nm", exclude=["0"])
    ms = MaskSet(model, k=0.5, granularity="nm", scope="global", nm=(2, 4))
    opt = OptimSettings(optimizer="sgd", lr=0.1, momentum=0.0, wd=0.0, schedule="constant", epochs=epochs)
    return TRAINERS["woodfisher"](model=model, maskset=ms, mode="prune", device=torch.device("cpu"),
                                  weight_optim=opt, progress=False, log=lambda line: None, options=options)


def test_woodfisher_nm_prunes_once_at_prune_end_and_refuses_what_has_no_meaning():
    trainer = woodfisher(woodfisher_options(prune_end=2))
    assert [(e.epoch, e.sparsity) for e in trainer.events] == [(2, 0.5)]
    assert "one pruning event at epoch 2" in trainer.pop_notes()[0]
    for kw, needle in [({"recompute_num": 2}, "--recompute-num"), ({"flops_power": 1.0}, "--flops-power"),
                       ({"flops_target": 0.5}, "--flops-target"), ({"prune_end": 3}, "--epochs 4")]:
        with pytest.raises(UserError, match=needle):
            woodfisher(woodfisher_options(**kw))


# -- options and train.py ---------------------------------------------------------------------------
def test_parse_nm():
    assert parse_nm("2:4") == (2, 4) and parse_nm(" 4 : 8 ") == (4, 8)
    for bad in ("3:2", "0:4", "4:4", "abc", "2:", "124"):
        with pytest.raises(ValueError):
            parse_nm(bad)


def test_config_scope_is_moot_but_k_must_be_n_over_m():
    base = ["--exp-mode", "prune", "--layer-type", "nm", "--source-net", "pretrained.pth.tar"]
    assert load_config([*base, "--k", "0.5", "--scope", "layer"]).scope == "layer"  # accepted; logged as moot
    assert load_config([*base, "--k", "0.25", "--nm", "1:4"]).nm == "1:4"


@pytest.mark.parametrize("args,needle", [
    (["--nm", "3:2"], "--nm must be N:M with 0 < N < M"),
    (["--nm", "0:4"], "--nm must be N:M with 0 < N < M"),
    (["--nm", "abc"], "--nm must be N:M, e.g. 2:4"),
    (["--k", "0.3"], "pass --k 0.5 (got --k 0.3)"),
    (["--nm", "1:4"], "pass --k 0.25 (got --k 0.5)"),
    (["--layer-floor", "1"], "drop --layer-floor"),
    ([], "conv1 (1); keep them dense with --exclude-layers conv1"),
    (["--exclude-layers", "fc2"], "--exclude-layers fc2,conv1"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, digits_pretrained, args, needle):
    base = ["--exp-mode", "prune", "--layer-type", "nm", "--k", "0.5", "--source-net", digits_pretrained, *QUICK]
    assert needle in run_error(tmp_path, capsys, *base, *args)


def test_nm_runs_on_digits_and_export(tmp_path, capsys, digits_pretrained):
    """HYDRA then WoodFisher, 2:4 with conv1 kept dense (the user's one flag); the checkpoints hold
    exact 2:4 masks; the sparse export round-trips them and the semi-structured conversion says why not."""
    common = ["--exp-mode", "prune", "--layer-type", "nm", "--k", "0.5", "--exclude-layers", "conv1",
              "--source-net", digits_pretrained, "--result-dir", str(tmp_path / "res"), *QUICK]
    assert train.main([*common, "--exp-name", "hydra", "--scaled-score-init"]) == 0
    assert train.main([*common, "--exp-name", "wf", "--trainer", "woodfisher", "--prune-end", "0",
                       "--fisher-subsample-size", "8", "--fisher-mini-bsz", "2"]) == 0
    out = capsys.readouterr().out
    assert "N:M masks: every group of 4" in out and "one pruning event at epoch 0" in out
    for name in ("hydra", "wf"):
        path = glob.glob(str(tmp_path / "res" / name / "prune" / "*" / "checkpoint" / "checkpoint.pth.tar"))[0]
        ckpt = load_checkpoint(path)
        assert sorted(ckpt["masks"]) == ["conv2", "conv3", "fc1", "fc2"]
        for mask in ckpt["masks"].values():
            assert bool((groups(mask, 4).sum(1) == 2).all())
    hydra = glob.glob(str(tmp_path / "res" / "hydra" / "prune" / "*" / "checkpoint" / "model_best.pth.tar"))[0]
    finetune = ["--exp-mode", "finetune", "--layer-type", "nm", "--k", "0.5", "--exclude-layers", "conv1",
                "--source-net", hydra, "--result-dir", str(tmp_path / "res"), "--exp-name", "ft", *QUICK]
    assert train.main([*finetune, "--nm", "4:8"]) == 2  # same k, another pattern: refused
    assert "written with nm='2:4'" in capsys.readouterr().err
    assert train.main(finetune) == 0
    ft = glob.glob(str(tmp_path / "res" / "ft" / "finetune" / "*" / "checkpoint" / "checkpoint.pth.tar"))[0]
    hydra_masks = load_checkpoint(hydra)["masks"]
    for name, mask in load_checkpoint(ft)["masks"].items():
        assert torch.equal(mask, hydra_masks[name])  # fine-tuning keeps the 2:4 mask
    model = train_model_from(path)
    result = export_model(model, example=torch.zeros(1, 1, 8, 8), format="sparse", path=str(tmp_path / "m.pth"))
    assert result.max_abs_diff == 0.0
    restored = load_sparse(str(tmp_path / "m.pth"))
    assert bool((groups(restored["fc1.weight"] != 0, 4).sum(1) <= 2).all())
    if unavailable_reason() is not None:  # this CPU machine: one line saying why, the dense network back
        converted = semi_structured(model)
        assert converted.converted == [] and len(converted.notes) == 1 and "not done" in converted.notes[0]
        x = torch.randn(3, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(converted.model(x), model(x))
    assert all(is_two_four(layer.mask) for name, layer in model.named_modules() if name in ("fc1", "fc2"))


def train_model_from(path):
    import export
    model, _ = export.model_from_checkpoint(load_checkpoint(path), source=path, image_size=None)
    return model
