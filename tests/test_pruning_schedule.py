"""Sparsity schedules: AGP events, the target reached exactly at the end, sub-steps from the current sparsity."""
from __future__ import annotations

import pytest

from pruning.schedule import (
    PruneEvent,
    agp_schedule,
    iterative_schedule,
    one_shot_schedule,
    polynomial_sparsity,
    pruning_epochs,
    recompute_steps,
    sparsity_at,
)


def test_pruning_epochs_on_and_off_the_grid():
    assert pruning_epochs(start=0, freq=2, end=10) == [0, 2, 4, 6, 8, 10]
    # end off the freq grid: still an event at end (the public code would stop at 14, short of the target)
    assert pruning_epochs(start=5, freq=3, end=15) == [5, 8, 11, 14, 15]
    assert pruning_epochs(start=4, freq=1, end=4) == [4]


def test_agp_sequence_exact_values():
    # s(e) = 0.9 - (0.9 - 0.05) * (1 - e/10)^3 at e = 0, 2, ..., 10
    events = agp_schedule(start=0, freq=2, end=10, initial=0.05, target=0.9)
    expect = [0.05, 0.9 - 0.85 * 0.512, 0.9 - 0.85 * 0.216, 0.9 - 0.85 * 0.064, 0.9 - 0.85 * 0.008, 0.9]
    assert [e.epoch for e in events] == [0, 2, 4, 6, 8, 10]
    assert [e.sparsity for e in events] == pytest.approx(expect, abs=1e-15)
    assert events[-1] == PruneEvent(10, 0.9)  # exactly the target, not a round-off neighbour
    assert events[-1].sparsity == 0.9


def test_agp_reaches_target_exactly_at_an_off_grid_end_and_is_monotone():
    events = agp_schedule(start=5, freq=3, end=15, initial=0.0, target=0.95, power=3)
    assert events[-1] == PruneEvent(15, 0.95)
    values = [e.sparsity for e in events]
    assert values == sorted(values)
    assert values[-2] == pytest.approx(0.95 - 0.95 * (1 - 9 / 10) ** 3, abs=1e-15)


def test_power_is_configurable():
    linear = agp_schedule(start=0, freq=1, end=4, initial=0.0, target=0.8, power=1)
    assert [e.sparsity for e in linear] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8], abs=1e-15)


def test_sparsity_at_holds_the_latest_event():
    kw = dict(start=2, freq=3, end=10, initial=0.1, target=0.7)
    assert sparsity_at(0, **kw) == 0.0 and sparsity_at(1, **kw) == 0.0  # before the first event: dense
    assert sparsity_at(2, **kw) == pytest.approx(0.1)
    assert sparsity_at(4, **kw) == sparsity_at(2, **kw)  # between events: unchanged
    assert sparsity_at(5, **kw) == pytest.approx(polynomial_sparsity(5, start=2, end=10, initial=0.1, target=0.7))
    assert sparsity_at(10, **kw) == 0.7 and sparsity_at(50, **kw) == 0.7


def test_polynomial_sparsity_clamps_progress():
    kw = dict(start=10, end=20, initial=0.2, target=0.6)
    assert polynomial_sparsity(0, **kw) == 0.2  # never below the initial sparsity
    assert polynomial_sparsity(25, **kw) == 0.6
    assert polynomial_sparsity(15, **kw) == pytest.approx(0.6 - 0.4 * 0.125)


def test_one_shot_and_iterative():
    assert one_shot_schedule(target=0.9) == [PruneEvent(0, 0.9)]
    geo = iterative_schedule(target=0.875, steps=3, start=1, freq=2)
    assert [e.epoch for e in geo] == [1, 3, 5]
    # the same half of the remaining weights at each step: densities 1/2, 1/4, 1/8
    assert [e.sparsity for e in geo] == pytest.approx([0.5, 0.75, 0.875], abs=1e-15)
    assert geo[-1].sparsity == 0.875
    lin = iterative_schedule(target=0.9, steps=3, initial=0.3, kind="linear")
    assert [e.sparsity for e in lin] == pytest.approx([0.5, 0.7, 0.9], abs=1e-15)
    assert lin[-1].sparsity == 0.9


def test_recompute_steps_start_from_the_current_sparsity():
    steps = recompute_steps(current=0.5, target=0.7, num=4)
    assert steps == pytest.approx([0.55, 0.6, 0.65, 0.7], abs=1e-15)
    assert steps[-1] == 0.7
    assert steps[0] > 0.5  # not from 0 (the public code's sub-steps restart at zero sparsity)
    poly = recompute_steps(current=0.5, target=0.7, num=4, kind="poly")
    assert poly[-1] == 0.7 and poly == sorted(poly)
    assert poly[0] == pytest.approx(0.7 - 0.2 * 0.75 ** 3, abs=1e-15)
    assert poly[0] > steps[0]  # large steps first
    assert recompute_steps(current=0.3, target=0.6, num=1) == [0.6]
    assert recompute_steps(current=0.6, target=0.6, num=3) == []


@pytest.mark.parametrize("call", [
    lambda: pruning_epochs(start=0, freq=0, end=4),
    lambda: pruning_epochs(start=5, freq=1, end=4),
    lambda: agp_schedule(start=0, freq=1, end=4, initial=0.5, target=0.2),
    lambda: agp_schedule(start=0, freq=1, end=4, initial=0.0, target=1.0),
    lambda: recompute_steps(current=0.1, target=0.5, num=0),
    lambda: recompute_steps(current=0.1, target=0.5, num=2, kind="cubic"),
    lambda: iterative_schedule(target=0.5, steps=0),
])
def test_invalid_arguments(call):
    with pytest.raises(ValueError):
        call()


# -- schedules as functions (--k-schedule for HYDRA/BiP, --prune-schedule for the gradual pruner) ---------
SHAPE_NAMES = ["oneshot", "linear", "cosine", "exponential", "onecycle", "agp", "agp:2", "iterative", "iterative:4"]


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_every_shape_runs_from_initial_to_exactly_final_and_never_rises(name):
    from pruning.schedule import DensitySchedule
    schedule = DensitySchedule.parse(name)
    values = [schedule(i / 100, initial=0.9, final=0.1) for i in range(101)]
    assert values[-1] == 0.1 and all(a >= b for a, b in zip(values, values[1:]))
    start = {"oneshot": 0.1, "onecycle": pytest.approx(0.9 - 0.8 * (1 + 2.718281828 ** -8) / (1 + 2.718281828 ** 6))}
    assert values[0] == start.get(name, 0.9)


def test_the_shapes_are_their_formulas():
    import math

    from pruning.schedule import DensitySchedule
    at = {name: DensitySchedule.parse(name)(0.25, initial=0.8, final=0.2) for name in SHAPE_NAMES}
    assert at["linear"] == pytest.approx(0.8 - 0.6 * 0.25)
    assert at["cosine"] == pytest.approx(0.8 - 0.6 * (1 - math.cos(math.pi / 4)) / 2)
    assert at["exponential"] == pytest.approx(0.8 * 0.25 ** 0.25)
    assert at["agp"] == pytest.approx(0.2 + 0.6 * 0.75 ** 3)  # Zhu & Gupta's cubic, in density
    assert 1 - at["agp"] == pytest.approx(polynomial_sparsity(0.25, start=0, end=1, initial=0.2, target=0.8))
    assert at["iterative:4"] == pytest.approx(0.8 - 0.6 * 0.25) and at["iterative"] == pytest.approx(0.8 - 0.6 / 3)


@pytest.mark.parametrize("text,needle", [("cubic", "unknown schedule 'cubic'"), ("linear:2", "takes no parameter"),
                                         ("agp:x", "a number"), ("iterative:2.5", "an integer >= 1"),
                                         ("agp:0", ">= 1")])
def test_a_bad_schedule_is_one_line(text, needle):
    from pruning.schedule import DensitySchedule
    with pytest.raises(ValueError, match=needle):
        DensitySchedule.parse(text)


def test_the_gradual_pruner_takes_any_shape_and_ends_at_its_target():
    from configs.options import WoodFisherOptions
    from trainers.base import RunSpec
    from trainers.woodfisher import plan
    run = RunSpec(mode="prune", layer_type="unstructured", k=0.1, scope="global", epochs=8)
    agp = plan(WoodFisherOptions(prune_end=6, prune_freq=2), run=run).events
    assert agp == tuple(agp_schedule(start=0, freq=2, end=6, initial=0.05, target=0.9))  # the default, unchanged
    linear = plan(WoodFisherOptions(prune_end=6, prune_freq=2, prune_schedule="linear"), run=run).events
    assert [e.sparsity for e in linear] == pytest.approx([0.05, 0.05 + 0.85 / 3, 0.05 + 0.85 * 2 / 3, 0.9])
    assert linear[-1].sparsity == 0.9


def test_hydra_under_a_density_schedule_keeps_exact_counts_at_every_reselection():
    import torch

    from layers import MaskSet
    from layers.selector import n_keep
    from pruning.schedule import DensitySchedule, EpochDensity
    from tests.helpers import tiny
    from trainers.base import BaseTrainer
    for scope in ("global", "layer"):
        model = tiny.tiny_net("unstructured", convs=1)
        ms = MaskSet(model, k=0.1, granularity="unstructured", scope=scope)
        schedule = EpochDensity(DensitySchedule.parse("cosine"), initial=1.0, final=0.1, epochs=5)
        trainer = BaseTrainer(model=model, maskset=ms, mode="prune", device=torch.device("cpu"),
                              weight_optim=tiny.sgd(lr=0.1, epochs=5), score_optim=tiny.sgd(lr=0.1, epochs=5),
                              progress=False, density_schedule=schedule)
        sizes = [layer.mask.numel() for layer in ms.layers.values()]
        for epoch in range(6):
            trainer.set_epoch(epoch)
            k = schedule(epoch)
            kept = [int(layer.mask.sum()) for layer in ms.layers.values()]
            want = [n_keep(k, n) for n in sizes] if scope == "layer" else [n_keep(k, sum(sizes))]
            assert (kept if scope == "layer" else [sum(kept)]) == want, (scope, epoch)
            assert trainer.final_masks(epoch) == (epoch >= 4)
        assert ms.k == 0.1


def test_a_scheduled_hydra_run_resumes_bit_exact_and_its_best_model_has_the_final_k(tmp_path, monkeypatch):
    import json
    import os

    import torch

    from engine.checkpoint import load_checkpoint
    from layers.selector import n_keep
    from tests.helpers.cli import interrupted_and_resumed, run_ok
    from trainers.base import BaseTrainer

    pre = run_ok(tmp_path / "pre", "--configs", "configs/Digits/pretrain.yml", "--epochs", "1")
    args = ["--configs", "configs/Digits/hydra.yml", "--source-net", f"{pre}/checkpoint/model_best.pth.tar",
            "--k", "0.1", "--k-schedule", "agp", "--epochs", "3"]
    full, ckpt = interrupted_and_resumed(tmp_path, monkeypatch, BaseTrainer, *args)
    a, b = load_checkpoint(os.path.join(full, "checkpoint", "checkpoint.pth.tar")), load_checkpoint(ckpt)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    summary = json.load(open(os.path.join(full, "summary.json")))  # hydra.yml: --scope layer, exact per layer
    assert [row["kept"] for row in summary["layers"]] == [n_keep(0.1, row["params"]) for row in summary["layers"]]
    best = load_checkpoint(os.path.join(full, "checkpoint", "model_best.pth.tar"))
    assert best["epoch"] == 3  # only the last epoch has the final k


@pytest.mark.parametrize("args,needle", [
    (["--trainer", "woodfisher"], "the woodfisher trainer prunes on its own schedule"),
    (["--k-schedule", "cubic"], "--k-schedule cubic: unknown schedule"),
    (["--init-density", "0.05"], "--init-density 0.05 must lie in [--k 0.1, 1]"),
    (["--schedule-epochs", "9"], "--schedule-epochs 9 exceeds --epochs 2"),
])
def test_what_a_density_schedule_cannot_do_is_one_line(tmp_path, capsys, args, needle):
    import torch

    from models import build_model
    from tests.helpers.cli import QUICK_RUN, run_error
    source = tmp_path / "dense.pth"
    torch.save(build_model("smallcnn", num_classes=10, in_channels=1).state_dict(), source)
    base = ["--exp-mode", "prune", "--source-net", str(source), "--k", "0.1", "--k-schedule", "linear"]
    err = run_error(tmp_path, capsys, *QUICK_RUN, *base, *args)
    assert needle in err, err
