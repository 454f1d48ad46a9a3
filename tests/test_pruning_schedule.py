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
