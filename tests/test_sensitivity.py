"""Sensitivity analysis (study.sensitivity) and per-layer densities (--layer-k): each layer alone at each density,
the greedy allocation that meets its budget exactly, and masks that keep exactly n_keep(k_l, N_l) per layer."""
import csv
import json
import os

import pytest
import torch

from layers import MaskSet, build_maskset
from layers.selector import n_keep
from study.sensitivity import Point, allocate
from study.sensitivity import main as sensitivity
from tests.helpers import tiny
from tests.helpers.cli import run_ok


def curve(name, params, losses, densities=(0.5, 0.1)):
    return [Point(name, params, d, n_keep(d, params), 90.0, loss) for d, loss in zip(densities, losses)]


def test_the_allocation_prunes_the_insensitive_layer_first_and_meets_the_budget_exactly():
    points = [Point("", 3000, 1.0, 0, 99.0, 0.10)]
    points += curve("robust", 2000, [0.10, 0.11])     # nearly free down to 0.1
    points += curve("fragile", 1000, [0.50, 2.00])    # costly at once
    layer_k = allocate(points, budget=0.4)
    kept = {name: n_keep(k, 2000 if name == "robust" else 1000) for name, k in layer_k.items()}
    assert sum(kept.values()) == n_keep(0.4, 3000)
    assert kept["robust"] == n_keep(0.1, 2000) and kept["fragile"] == n_keep(0.4, 3000) - n_keep(0.1, 2000)


def test_a_flops_budget_lowers_the_layer_whose_weights_cost_most_flops_first_and_is_met_from_below():
    points = [Point("", 3000, 1.0, 0, 99.0, 0.10)]
    points += curve("early", 1000, [0.20, 0.40])   # the same losses per weight removed...
    points += curve("late", 2000, [0.30, 0.70])    # ... as this one (twice the weights, twice the loss)
    costs = {"early": 9, "late": 1}                # but each early weight is used at 9 positions
    layer_k = allocate(points, budget=0.5, costs=costs)
    kept = {"early": n_keep(layer_k["early"], 1000), "late": n_keep(layer_k["late"], 2000)}
    flops = kept["early"] * 9 + kept["late"]
    assert flops <= 0.5 * (1000 * 9 + 2000) < flops + 9  # met from below, within one weight's FLOPs
    assert kept["late"] == 2000 and kept["early"] < 1000  # only the FLOP-heavy layer was lowered
    weights = allocate(points, budget=0.5)  # the weight budget of the same curves lowers the other one
    assert n_keep(weights["early"], 1000) + n_keep(weights["late"], 2000) == n_keep(0.5, 3000)


def test_a_budget_below_the_measured_densities_is_one_line():
    from configs.errors import UserError
    points = [Point("", 100, 1.0, 0, 99.0, 0.1)] + curve("a", 100, [0.2, 0.3])
    with pytest.raises(UserError, match="add smaller --densities"):
        allocate(points, budget=0.05)


@pytest.mark.parametrize("granularity", ["unstructured", "filter"])
def test_per_layer_densities_keep_exact_counts_in_every_layer(granularity):
    model = tiny.tiny_net(granularity, convs=2)
    names = [n for n, m in model.named_modules() if hasattr(m, "popup_scores")]
    layer_k = {name: (0.5, 0.25, 0.75)[i % 3] for i, name in enumerate(names)}
    ms = MaskSet(model, k=0.5, granularity=granularity, scope="global", layer_k=layer_k)
    for (name, layer), units in zip(ms.layers.items(), ms.unit_counts()):
        alive = layer.mask.sum() if granularity == "unstructured" else layer.mask.flatten(1).any(1).sum()
        assert int(alive) == n_keep(layer_k[name], units), name


def test_layer_k_must_name_every_layer_and_match_k():
    from configs.errors import UserError
    from models import build_model
    model = build_model("smallcnn", num_classes=10, in_channels=1)
    with pytest.raises(UserError, match="must name every masked layer"):
        build_maskset(model, granularity="unstructured", k=0.5, scope="layer", layer_k={"conv1": 0.5})
    layer_k = {name: 0.5 for name in ("conv1", "conv2", "conv3", "fc1", "fc2")}
    with pytest.raises(UserError, match="pass the --k the file was made for"):
        build_maskset(build_model("smallcnn", num_classes=10, in_channels=1), granularity="unstructured", k=0.3,
                      scope="layer", layer_k=layer_k)


def test_sensitivity_measures_every_layer_and_its_budget_trains_with_exact_counts(tmp_path, capsys):
    pre = run_ok(tmp_path / "pre", "--configs", "configs/Digits/pretrain.yml", "--epochs", "2", "--rewind-epoch", "1")
    ckpt = f"{pre}/checkpoint/model_best.pth.tar"
    out = tmp_path / "sens"
    assert sensitivity([ckpt, "--densities", "0.5,0.1", "--budget", "0.2", "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "sensitivity.csv")))
    assert len(rows) == 1 + 5 * 2 and rows[0]["layer"] == "(dense)" and os.path.getsize(out / "sensitivity.png") > 0
    assert {r["layer"] for r in rows[1:]} == {"conv1", "conv2", "conv3", "fc1", "fc2"}
    for r in rows[1:]:
        assert int(r["kept"]) == n_keep(float(r["density"]), int(r["params"]))
    layer_k = json.load(open(out / "layer_k.json"))["layer_k"]
    run = run_ok(tmp_path / "p", "--configs", "configs/Digits/hydra.yml", "--source-net", ckpt, "--k", "0.2",
                 "--layer-k", str(out / "layer_k.json"), "--epochs", "1")
    summary = json.load(open(f"{run}/summary.json"))
    assert [row["kept"] for row in summary["layers"]] == [n_keep(layer_k[row["name"]], row["params"])
                                                          for row in summary["layers"]]
    assert summary["masked_kept"] == n_keep(0.2, summary["masked_params"])
    # A FLOPs budget: the file's k is the weight density it makes, which train.py then takes.
    flops_out = tmp_path / "sens_flops"
    assert sensitivity([ckpt, "--densities", "0.5,0.1", "--budget", "0.3", "--budget-of", "flops", "--out",
                        str(flops_out), "--no-progress"]) == 0
    made = json.load(open(flops_out / "layer_k.json"))
    assert made["budget_of"] == "flops" and f"--k {made['k']!r}" in capsys.readouterr().out
    run = run_ok(tmp_path / "pf", "--configs", "configs/Digits/hydra.yml", "--source-net", ckpt, "--k",
                 repr(made["k"]), "--layer-k", str(flops_out / "layer_k.json"), "--epochs", "1")
    summary = json.load(open(f"{run}/summary.json"))
    assert summary["masked_kept"] == n_keep(made["k"], summary["masked_params"])
    # The gradual pruner and IMP take the same file: their last event / round gives each layer its own density.
    for trainer, extra in (("woodfisher", ["--configs", "configs/Digits/woodfisher.yml", "--prune-end", "1",
                                           "--prune-freq", "1", "--fisher-subsample-size", "16"]),
                           ("lth", ["--configs", "configs/Digits/lth.yml", "--imp-rate", "0.6"])):
        run = run_ok(tmp_path / trainer, *extra, "--source-net", ckpt, "--k", "0.2", "--layer-k",
                     str(out / "layer_k.json"), "--epochs", "2")
        summary = json.load(open(f"{run}/summary.json"))
        assert [row["kept"] for row in summary["layers"]] == [n_keep(layer_k[row["name"]], row["params"])
                                                              for row in summary["layers"]], trainer


def test_layer_densities_reach_every_layer_k_exactly_at_the_run_k():
    from pruning.schedule import layer_densities
    layer_k = {"a": 0.5, "b": 0.05, "c": 1.0}
    for geometric in (False, True):
        assert layer_densities(layer_k, k=0.2, density=0.2, geometric=geometric) == layer_k
        assert layer_densities(layer_k, k=0.2, density=1.0, geometric=geometric) == {"a": 1.0, "b": 1.0, "c": 1.0}
        steps = [layer_densities(layer_k, k=0.2, density=d, geometric=geometric) for d in (0.9, 0.6, 0.3)]
        for name in layer_k:  # every layer's density falls (or stays at 1) as the run's does
            values = [1.0] + [s[name] for s in steps] + [layer_k[name]]
            assert all(a >= b for a, b in zip(values, values[1:])), (name, values)
    # linear: the same fraction of each layer's removals as the run's (0.6 -> half of 1 - 0.2)
    assert layer_densities(layer_k, k=0.2, density=0.6) == {"a": 0.75, "b": 1 - 0.95 / 2, "c": 1.0}
    # geometric: the same power of each final density (0.2 ** 0.5 -> 0.5 ** 0.5)
    half = layer_densities(layer_k, k=0.2, density=0.2 ** 0.5, geometric=True)
    assert abs(half["a"] - 0.5 ** 0.5) < 1e-12 and abs(half["b"] - 0.05 ** 0.5) < 1e-12


@pytest.mark.parametrize("args,needle", [
    (["--criterion", "woodfisher"], "needs gradient rows"),
    (["--criterion", "kfac"], "needs statistics read off the model"),
    (["--criterion", "apoz", "--layer-type", "filter"], "needs statistics read off the model"),
    (["--criterion", "naivehess"], "needs statistics read off the model"),
    (["--densities", "0.5,1.5"], "every density must lie in (0, 1)"),
    (["--layer-type", "filter", "--budget", "0.3"], "--budget allocates weights"),
    (["--budget-of", "flops"], "pass --budget too"),
    (["--budget-of", "params", "--budget", "0.3"], "invalid choice: 'params'"),
])
def test_bad_sensitivity_input_is_one_line(tmp_path, capsys, args, needle):
    torch.save({"config": {"arch": "smallcnn"}, "state_dict": {}}, tmp_path / "x.pth")
    assert sensitivity([str(tmp_path / "x.pth"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1
