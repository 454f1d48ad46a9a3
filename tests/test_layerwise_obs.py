"""Layer-wise OBS (pruning.layerwise) and --obs-update-solver layerwise: the update against a float64
least-squares solution, its invariants, the sequential driver, and the option end to end."""
import json
import os

import pytest
import torch
from torch import nn

import train
from layers import masked_layers, to_masked
from pruning.layerwise import LayerwiseOBS, compensate_sequential, layer_inputs
from tests.helpers.cli import run_error, run_ok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(12, 6).double()
    return nn.Conv2d(3, 6, 3, padding=1, stride=2).double()


def _inputs(kind: str, batches: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (20, 12) if kind == "linear" else (4, 3, 7, 7)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(batches)]


def _mask(kind: str, weight: torch.Tensor, granularity: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if granularity == "unstructured":
        return torch.rand(weight.shape, generator=g) > 0.6
    keep = torch.rand(weight.shape[1], generator=g) > 0.5  # channel: the same input columns for every row
    keep[0] = True
    shape = [1, -1] + [1] * (weight.dim() - 2)
    return keep.view(shape).expand_as(weight).clone()


def _error(W: torch.Tensor, W_new: torch.Tensor, X: torch.Tensor) -> float:
    return float(((W.reshape(W.shape[0], -1) - W_new.reshape(W.shape[0], -1)) @ X).pow(2).sum())


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("granularity", ["unstructured", "channel"])
def test_update_is_the_least_squares_reconstruction(kind, granularity):
    layer = _layer(kind)
    xs = _inputs(kind)
    obs = LayerwiseOBS(layer)
    for x in xs:  # H accumulated batch by batch equals 2 X X^T / n over all of them
        obs.add_batch(x)
    X = torch.cat([layer_inputs(layer, x) for x in xs], dim=1)
    assert torch.allclose(obs.H, 2 * X @ X.t() / X.shape[1], atol=1e-12)
    if kind == "conv":  # the unfolded patches reproduce the convolution
        out = (layer.weight.reshape(6, -1) @ X)
        ref = torch.cat([nn.functional.conv2d(x, layer.weight, padding=1, stride=2) for x in xs])
        assert torch.allclose(out.reshape(6, ref.shape[0], -1).transpose(0, 1).reshape(ref.shape), ref, atol=1e-12)
    W = layer.weight.detach()
    keep = _mask(kind, W, granularity)
    new = obs.solve(W, keep, percdamp=0.0, max_bytes=3 * 27 * 27 * 8)  # chunks of 3 rows
    Wr, Nr, Kr = W.reshape(6, -1), new.reshape(6, -1), keep.reshape(6, -1)
    for r in range(6):
        k = Kr[r]
        target = (Wr[r] @ X).unsqueeze(1)
        solution = torch.linalg.lstsq(X[k].t(), target, driver="gelsd").solution.squeeze(1)
        assert torch.allclose(Nr[r, k], solution, atol=1e-8, rtol=1e-8)
    assert bool((new[~keep] == 0).all()) and int((new != 0).sum()) <= int(keep.sum())
    assert _error(W, new, X) <= _error(W, W * keep, X)
    # the damped solve (the default) still never reconstructs worse than dropping the weights
    damped = obs.solve(W, keep)
    assert bool((damped[~keep] == 0).all()) and _error(W, damped, X) <= _error(W, W * keep, X)


def test_filter_mask_zeroes_pruned_rows_and_keeps_the_others():
    layer = _layer("conv")
    obs = LayerwiseOBS(layer)
    obs.add_batch(_inputs("conv")[0])
    keep = torch.zeros_like(layer.weight, dtype=torch.bool)
    keep[[0, 2, 5]] = True
    new = obs.solve(layer.weight, keep)
    assert torch.equal(new[[0, 2, 5]], layer.weight.detach()[[0, 2, 5]])
    assert bool((new[[1, 3, 4]] == 0).all())


def test_grouped_conv_and_other_layers_are_refused():
    with pytest.raises(ValueError, match="groups=2"):
        LayerwiseOBS(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="Conv2d and Linear"):
        LayerwiseOBS(nn.Conv1d(4, 4, 3))


def test_sequential_takes_each_layers_inputs_from_the_compensated_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()
    to_masked(model, granularity="unstructured")
    layers = masked_layers(model)
    g = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(layer.weight.shape, generator=g) > 0.5 for n, layer in layers.items()}
    xs = [torch.randn(64, 2, 5, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    dense_fc = layers["3"].weight.detach().clone()
    record = compensate_sequential(model, layers, masks, xs)
    assert record.layers == 2 and record.samples == 192
    for name, layer in layers.items():
        assert torch.equal(layer.mask, masks[name]) and bool((layer.weight[~masks[name]] == 0).all())
        assert record.error_after[name] <= record.error_before[name]
    # the classifier's fit used the features of the already compensated conv
    with torch.no_grad():
        feats = torch.cat([model[2](model[1](model[0](x))) for x in xs]).t()
    expected = LayerwiseOBS(layers["3"])
    expected.add_batch(feats.t())
    assert torch.allclose(expected.solve(dense_fc, masks["3"]), layers["3"].weight.detach(), atol=1e-10)


def test_layerwise_option_end_to_end_names_the_solver(tmp_path, capsys, digits_pretrained):
    run = run_ok(tmp_path, "--configs", os.path.join(ROOT, "configs", "Digits", "finetune.yml"), "--k", "0.1",
                 "--source-net", digits_pretrained, "--scaled-score-init", "--obs-update", "--obs-update-solver", "layerwise",
                 "--obs-update-samples", "64", "--epochs", "1")
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("OBS update"))
    assert "layerwise solver" in line and "64 calibration samples" in line and "test top1" in line
    record = json.load(open(os.path.join(run, "summary.json")))["obs_update"]["finetune_start"]
    assert record["solver"] == "layerwise" and record["scale"] in (0.0, 0.25, 0.5, 1.0)
    assert record["reconstruction_error"]["after"] <= record["reconstruction_error"]["before"]


def test_fisher_in_steps_end_to_end(tmp_path, capsys, digits_pretrained):
    run = run_ok(tmp_path, "--configs", os.path.join(ROOT, "configs", "Digits", "finetune.yml"), "--k", "0.1",
                 "--source-net", digits_pretrained, "--scaled-score-init", "--obs-update", "--obs-update-steps", "2",
                 "--fisher-subsample-size", "8", "--fisher-mini-bsz", "2", "--fittable-params", "256", "--epochs", "1")
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("OBS update"))
    assert "fisher solver" in line and "2 steps" in line
    record = json.load(open(os.path.join(run, "summary.json")))["obs_update"]["finetune_start"]
    assert record["solver"] == "fisher" and record["steps"] == 2


@pytest.mark.parametrize("args,needle", [
    (["--obs-update-solver", "sparsegpt"], "--obs-update-solver"),
    (["--obs-update-steps", "0"], "--obs-update-steps must be at least 1"),
    (["--obs-update-samples", "0"], "--obs-update-samples must be at least 1"),
    (["--obs-update-percdamp", "-1"], "--obs-update-percdamp must be a finite number >= 0"),
])
def test_bad_values_are_refused_with_one_line(tmp_path, capsys, args, needle):
    assert needle in run_error(tmp_path, capsys, "--exp-mode", "finetune", "--k", "0.1", "--obs-update", *args)


def test_default_is_the_fisher_solver():
    assert train is not None  # the CLI module imports with the options
    from configs.options import ObsUpdateOptions
    assert ObsUpdateOptions().obs_update_solver == "fisher" and ObsUpdateOptions().obs_update_steps == 1
