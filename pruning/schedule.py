"""Sparsity schedules for gradual pruning: AGP/polynomial, one-shot, iterative, and sub-steps.

Pure functions of typed keyword arguments; epochs are integers, sparsities floats in [0, 1).

Units. Everything here is in *sparsity* s (the fraction of units removed). The shared selector
(``layers.selector``) works in *density* k = 1 - s and owns the count rule: a selection over N
units keeps ``n_keep(k, N)`` of them (see its docstring; it is not re-implemented here, so that the
rule is stated once). Passing ``k = 1 - s`` is a float round trip: for some (s, N),
``1 - (1 - s)`` lands one ulp below s and a floor-based count prunes one unit fewer than s * N
(e.g. s = 0.1, N = 10). Whoever converts should keep that in mind; the schedule itself returns
the target value exactly as given at the last event (never a recomputed float).

AGP (Zhu & Gupta 2017), as in the WoodFisher code, with power p (3 by default):

    s(e) = s_f - (s_f - s_i) * (1 - min(1, (e - start) / (end - start)))^p

evaluated at the pruning epochs start, start + freq, ..., and at ``end`` itself even when
end - start is not a multiple of freq (the public code only prunes on the freq grid, so with such
an end the target is never reached). At ``end`` the value is exactly s_f.

``recompute_steps`` splits one pruning event into ``--recompute-num`` sub-steps (prune, recompute
the Fisher, prune again) that go from the *current* sparsity to the event's target; the public
code starts them from 0, which re-prunes nothing for the first sub-steps and then jumps.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple


class PruneEvent(NamedTuple):
    """Prune to ``sparsity`` at the start of ``epoch``."""

    epoch: int
    sparsity: float


def _check_sparsity(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _check_window(start: int, freq: int, end: int) -> None:
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if freq < 1:
        raise ValueError(f"freq must be >= 1, got {freq}")
    if end < start:
        raise ValueError(f"end ({end}) must be >= start ({start})")


def polynomial_sparsity(epoch: float, *, start: int, end: int, initial: float, target: float,
                        power: float = 3.0) -> float:
    """The AGP formula at any epoch; progress is clamped to [0, 1] (s_i before start, s_f after end)."""
    _check_sparsity("initial", initial)
    _check_sparsity("target", target)
    if end <= start:
        return target if epoch >= end else initial
    progress = min(1.0, max(0.0, (epoch - start) / (end - start)))
    if progress >= 1.0:
        return target  # exactly, not target - (target - initial) * 0.0 ** power round-off
    return target - (target - initial) * (1.0 - progress) ** power


def pruning_epochs(*, start: int, freq: int, end: int) -> list[int]:
    """Epochs with a pruning event: start, start + freq, ... (< end), then end."""
    _check_window(start, freq, end)
    return list(range(start, end, freq)) + [end]


def agp_schedule(*, start: int, freq: int, end: int, initial: float, target: float,
                 power: float = 3.0) -> list[PruneEvent]:
    """AGP events: (epoch, s(epoch)) at every pruning epoch; the last one is (end, target).

    An event at s = 0 (start with initial = 0) is a no-op the trainer may skip.
    """
    if initial > target:
        raise ValueError(f"initial sparsity {initial} exceeds the target {target}")
    return [PruneEvent(e, polynomial_sparsity(e, start=start, end=end, initial=initial,
                                              target=target, power=power))
            for e in pruning_epochs(start=start, freq=freq, end=end)]


def sparsity_at(epoch: int, *, start: int, freq: int, end: int, initial: float, target: float,
                power: float = 3.0) -> float:
    """Sparsity in force during ``epoch``: that of the latest pruning event at or before it
    (0.0 before the first event, the target from ``end`` on)."""
    value = 0.0
    for event in agp_schedule(start=start, freq=freq, end=end, initial=initial, target=target, power=power):
        if event.epoch > epoch:
            break
        value = event.sparsity
    return value


def one_shot_schedule(*, target: float, epoch: int = 0) -> list[PruneEvent]:
    """Prune once, to the target."""
    _check_sparsity("target", target)
    return [PruneEvent(epoch, target)]


def iterative_schedule(*, target: float, steps: int, start: int = 0, freq: int = 1,
                       initial: float = 0.0, kind: str = "geometric") -> list[PruneEvent]:
    """``steps`` events at start, start + freq, ...; the last reaches the target exactly.

    kind="geometric": the same fraction of the remaining weights is pruned at each step (classic
    iterative pruning), density_i = d_0 * (d_f / d_0)^(i / n) with d = 1 - s.
    kind="linear": equal sparsity increments, s_i = s_0 + (s_f - s_0) i / n.
    """
    _check_sparsity("initial", initial)
    _check_sparsity("target", target)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if initial > target:
        raise ValueError(f"initial sparsity {initial} exceeds the target {target}")
    _check_window(start, freq, start)
    d0, df = 1.0 - initial, 1.0 - target
    events = []
    for i in range(1, steps + 1):
        if i == steps:
            s = target
        elif kind == "geometric":
            s = 1.0 - d0 * (df / d0) ** (i / steps)
        elif kind == "linear":
            s = initial + (target - initial) * i / steps
        else:
            raise ValueError(f"kind must be 'geometric' or 'linear', got {kind!r}")
        events.append(PruneEvent(start + (i - 1) * freq, s))
    return events


def recompute_steps(*, current: float, target: float, num: int, kind: str = "linear",
                    power: float = 3.0) -> list[float]:
    """Sparsities of ``num`` sub-steps of one pruning event, from ``current`` (excluded) to
    ``target`` (the last, exactly).

    kind="linear": current + (target - current) * i / num.
    kind="poly":   target - (target - current) * (1 - i / num)^power (large steps first, as AGP).
    If current >= target there is nothing to prune: no sub-steps (an empty list).
    """
    _check_sparsity("current", current)
    _check_sparsity("target", target)
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if kind not in ("linear", "poly"):
        raise ValueError(f"kind must be 'linear' or 'poly', got {kind!r}")
    if current >= target:
        return []
    out = []
    for i in range(1, num + 1):
        if i == num:
            out.append(target)
        elif kind == "linear":
            out.append(current + (target - current) * i / num)
        else:
            out.append(target - (target - current) * (1.0 - i / num) ** power)
    return out


# -- schedules as functions of progress ------------------------------------------------------------
# A density schedule maps training progress p in [0, 1] to the density in force, from ``initial`` at
# p = 0 to ``final`` at p = 1 (exactly: the last value is the run's k, never a recomputed float). The
# shapes are fasterai's (``fasterai.sparse.schedule``: one-shot, iterative, AGP, one-cycle) plus linear,
# cosine and exponential (geometric in density: the same fraction of the survivors goes per unit of
# progress). AGP here is Zhu & Gupta's cubic in sparsity, the same curve as ``polynomial_sparsity``.
Shape = Callable[[float, float, float], float]  # (progress in [0, 1), initial, final) -> density


def _oneshot(p: float, initial: float, final: float) -> float:
    return final


def _linear(p: float, initial: float, final: float) -> float:
    return initial + (final - initial) * p


def _cosine(p: float, initial: float, final: float) -> float:
    return initial + (final - initial) * (1.0 - math.cos(math.pi * p)) / 2.0


def _exponential(p: float, initial: float, final: float) -> float:
    return initial * (final / initial) ** p


def _onecycle(p: float, initial: float, final: float, alpha: float = 14.0, beta: float = 6.0) -> float:
    """fasterai's ``sched_onecycle``: a logistic ramp, slow at both ends (alpha 14, beta 6)."""
    ramp = (1.0 + math.exp(-alpha + beta)) / (1.0 + math.exp(-alpha * p + beta))
    return initial + (final - initial) * ramp


def _agp(power: float) -> Shape:
    def shape(p: float, initial: float, final: float) -> float:
        return final + (initial - final) * (1.0 - p) ** power
    return shape


def _iterative(steps: int) -> Shape:
    """fasterai's ``sched_iterative``: ``steps`` equal jumps, the first as soon as progress starts."""
    def shape(p: float, initial: float, final: float) -> float:
        return initial + (final - initial) * math.ceil(p * steps) / steps
    return shape


# name -> (factory of the shape from its parameter, the parameter's default, its meaning)
SHAPES: dict[str, tuple[Callable[[float], Shape], float | None, str]] = {
    "oneshot": (lambda _: _oneshot, None, ""),
    "linear": (lambda _: _linear, None, ""),
    "cosine": (lambda _: _cosine, None, ""),
    "exponential": (lambda _: _exponential, None, ""),
    "onecycle": (lambda _: _onecycle, None, ""),
    "agp": (lambda power: _agp(power), 3.0, "the exponent"),
    "iterative": (lambda steps: _iterative(int(steps)), 3.0, "the number of steps"),
}


@dataclass(frozen=True)
class DensitySchedule:
    """``NAME`` or ``NAME:PARAM`` of ``SHAPES`` (``agp:3``, ``iterative:4``), as a callable of progress."""

    name: str
    param: float | None
    shape: Shape

    @staticmethod
    def parse(text: str) -> DensitySchedule:
        name, _, raw = text.partition(":")
        if name not in SHAPES:
            raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SHAPES)} (agp:POWER, iterative:STEPS)")
        factory, default, meaning = SHAPES[name]
        if raw and default is None:
            raise ValueError(f"schedule {name} takes no parameter (got {text!r})")
        try:
            param = float(raw) if raw else default
        except ValueError:
            raise ValueError(f"schedule {name}'s parameter is {meaning}, a number (got {raw!r})") from None
        whole = name != "iterative" or param == int(param or 0)
        if param is not None and (not math.isfinite(param) or param < 1 or not whole):
            raise ValueError(f"schedule {name}'s parameter is {meaning}: {'an integer ' if name == 'iterative' else ''}"
                             f">= 1 (got {raw!r})")
        return DensitySchedule(name, param, factory(param if param is not None else 0.0))

    def __call__(self, progress: float, *, initial: float, final: float) -> float:
        if not 0.0 < final <= initial <= 1.0:
            raise ValueError(f"a schedule runs from a density initial >= final > 0, got {initial} -> {final}")
        p = min(1.0, max(0.0, progress))
        if p >= 1.0:
            return final
        return min(initial, max(final, self.shape(p, initial, final)))  # no float overshoot past either end


@dataclass(frozen=True)
class EpochDensity:
    """HYDRA/BiP's density by epoch (``--k-schedule``): ``schedule`` from ``initial`` at epoch 0 to ``final``
    (the run's k) at epoch ``epochs - 1`` and after; epoch -> density, the form a library user may give
    directly as any callable."""

    schedule: DensitySchedule
    initial: float
    final: float
    epochs: int

    def __call__(self, epoch: int) -> float:
        if epoch >= self.epochs - 1:
            return self.final
        return self.schedule(epoch / (self.epochs - 1), initial=self.initial, final=self.final)


def gradual_events(*, start: int, freq: int, end: int, initial: float, target: float,
                   schedule: DensitySchedule) -> list[PruneEvent]:
    """The gradual pruner's events under any shape: (epoch, sparsity) at every pruning epoch, progress
    (epoch - start) / (end - start); the last one is (end, target) exactly."""
    _check_sparsity("initial", initial)
    _check_sparsity("target", target)
    if initial > target:
        raise ValueError(f"initial sparsity {initial} exceeds the target {target}")
    events = []
    for e in pruning_epochs(start=start, freq=freq, end=end):
        if e == end:
            events.append(PruneEvent(e, target))
            continue
        progress = (e - start) / (end - start)
        events.append(PruneEvent(e, 1.0 - schedule(progress, initial=1.0 - initial, final=1.0 - target)))
    return events


def layer_densities(layer_k: Mapping[str, float], *, k: float, density: float,
                    geometric: bool = False) -> dict[str, float]:
    """Each layer's density when the run as a whole stands at ``density`` on its way from 1 to ``k``, such that
    every layer reaches its own ``layer_k[name]`` exactly when the run reaches ``k`` (``--layer-k`` under a pruning
    schedule). Linear (default): every layer has made the same fraction of its removals as the run, the pacing
    of the gradual pruner's events, whose schedule shapes the sparsity. ``geometric``: every layer has kept the
    same power of its final density, i.e. each step removes the same fraction of each layer's survivors (IMP's
    rounds). A density at or below ``k`` gives ``layer_k`` itself."""
    if density <= k or k >= 1.0:
        return dict(layer_k)
    if geometric:
        power = math.log(density) / math.log(k)
        return {name: v ** power for name, v in layer_k.items()}
    done = (1.0 - density) / (1.0 - k)
    return {name: 1.0 - (1.0 - v) * done for name, v in layer_k.items()}
