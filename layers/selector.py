"""The one top-k selector: which units of which layers are kept.

Every trainer, the dense export, evaluation and the sparsity report go through
``select_masks``; nothing else in the project decides a mask from scores.

Counting rule (stated once, here): a selection over N units at density k keeps

    n_keep(k, N) = N - floor((1 - k) * N)      (at least 1 unit)

the public HYDRA/BiP rule (``N - int((1 - k) * N)`` in float64), so that a checkpoint they wrote
gives the same mask here for the same k; in exact arithmetic it is ceil(k * N). One difference:
float64 noise of a few ulps just below an integer is rounded away (1 - 0.9 is 0.0999...98, so
their code keeps all 10 units at k = 0.9, N = 10; this rule keeps 9). See below for where exactly.

Ties at the threshold are broken by a fixed rule of this project: among equal unit scores the one
with the HIGHER flat index (module order, then row-major order) is kept, i.e. the order of a stable
ascending sort whose first (N - n_keep) entries are pruned. The public GetSubnet has no such rule:
it prunes the first entries of ``torch.sort``, which is not stable, and whose order among equal
values is the kernel's (by increasing index up to 16 elements; from 17 on, scattered: a zeros tensor
of 17 sorts as [8, 16, 15, 14, ...]). No deterministic rule reproduces it, so a public checkpoint
gives its own mask here exactly when no tie straddles its threshold, which learned real-valued
scores practically never do; with ties, the mask here is this rule's, the same on every run,
device and thread count. Higher index rather than lower because it is what their sort gives on
the short tensors (<= 16) where its order is defined.

Where the counts differ from theirs: only where (1 - k) * N, computed in float64, lands a few ulps
below an integer j. Their ``int()`` then prunes j - 1 units and this rule prunes j, so they keep one
unit more. ``public_count_differs`` names those (k, N). Among the densities people use (the
k = 0.9 ... 0.005 grid and the BiP paper's lottery series 0.8, 0.64, ..., 0.0092, checked for every
N < 200,000) it happens at four: k = 0.9 for every N that is a multiple of 10 (so every
10-class classifier: 5,120 weights on 512 features keep 4,608 here, 4,609 there), k = 0.8 for every
multiple of 5, and k = 0.3 / 0.328 for some multiples of 10 / 125.
Everywhere else the counts are identical.

The selector never sorts: it finds the n_keep-th largest unit score with a partial
``torch.topk`` (a selection) and only counts/cumsums the entries equal to it when there is a tie.

N:M masks (granularity ``nm``, pattern (N, M)): every group of M consecutive weights along the
input dimension keeps exactly the N with the largest |score|; k, scope and floors do not apply
(the density is N/M in every group, hence in every layer). Groups follow NVIDIA's 2:4 convention
(ASP): a Linear weight (out, in) is grouped along ``in`` in each row; a Conv2d weight
(out, in, kh, kw) along the input channels at each (out, kh, kw) position, i.e. in the
(out, kh, kw, in) order. That is the order in which sparse tensor cores reduce a convolution run as
an implicit GEMM over channels-last input, so a mask chosen here is one the hardware accelerates; it
also means that a layer qualifies when its input channels (features) are a multiple of M, whatever
its kernel. Ties inside a group keep the higher input index, the same rule as above.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence

import torch

from configs.choices import GRANULARITIES, SCOPES

STRUCTURED = ("filter", "channel")  # units of several weights; the others rank weight by weight


def n_keep(k: float, n: int) -> int:
    """Number of units kept at density ``k`` out of ``n`` (see the module docstring)."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"density k must be in (0, 1], got {k}")
    pruned = (1 - k) * n
    pruned = math.floor(pruned + 8 * sys.float_info.epsilon * max(1.0, pruned))
    return min(n, max(1, n - pruned))


def public_n_keep(k: float, n: int) -> int:
    """The count HYDRA/BiP's GetSubnet keeps: n - int((1 - k) * n) in float64 (for comparisons)."""
    return n - int((1 - k) * n)


def public_count_differs(k: float, n: int) -> bool:
    """Whether ``n_keep`` keeps fewer units than HYDRA/BiP for this (k, n) (float noise; see above)."""
    return n_keep(k, n) != public_n_keep(k, n)


class SelectionError(ValueError):
    """A selection that the settings make impossible (e.g. per-layer floors above the budget)."""


def check_floor(unit_counts: Sequence[int], *, k: float, min_units: int) -> None:
    """Raise SelectionError when every layer's floor of ``min_units`` cannot fit in a global
    selection at density ``k`` (the floors would crowd out whole layers instead of adding up)."""
    floors = sum(min(min_units, n) for n in unit_counts)
    budget = n_keep(k, sum(unit_counts))
    if floors > budget:
        raise SelectionError(
            f"--layer-floor {min_units} asks for {floors} units over {len(unit_counts)} layers, but k={k:g} keeps "
            f"only {budget} of {sum(unit_counts)}: lower --layer-floor (at most {budget // max(1, len(unit_counts))} "
            f"per layer here) or raise --k")


# A unit score per granularity: |s| per weight, or the L2 norm of the scores of a filter
# (dim 0: conv output channel / linear row) or a channel (dim 1: conv input channel / linear column).
def _unstructured_units(scores: torch.Tensor) -> torch.Tensor:
    return scores.abs().flatten()


def _filter_units(scores: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(scores.flatten(1), dim=1)


def _channel_units(scores: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(scores.transpose(0, 1).flatten(1), dim=1)


UNIT_SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "unstructured": _unstructured_units,
    "filter": _filter_units,
    "channel": _channel_units,
}


def expand_units(keep: torch.Tensor, shape: torch.Size, granularity: str) -> torch.Tensor:
    """Broadcast a per-unit boolean vector to a full weight-shaped boolean mask (N:M units are weights)."""
    if granularity not in STRUCTURED:
        return keep.view(shape)
    extra = [1] * (len(shape) - 2)
    if granularity == "filter":
        return keep.view(-1, 1, *extra).expand(shape).contiguous()
    if granularity == "channel":
        return keep.view(1, -1, *extra).expand(shape).contiguous()
    raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")


def alive_units(mask: torch.Tensor, granularity: str) -> torch.Tensor:
    """One bool per unit of ``mask``: a filter/channel is alive while any of its weights is."""
    if granularity not in STRUCTURED:
        return mask.reshape(-1)
    if granularity == "filter":
        return mask.flatten(1).any(1)
    return mask.transpose(0, 1).flatten(1).any(1)


NAN_SCORES = "importance scores became NaN (training diverged); lower --lr / --mask-lr"


def check_finite(values: torch.Tensor) -> None:
    """Scores that became NaN cannot be ranked: stop with a clear error instead of a wrong mask."""
    if bool(torch.isnan(values).any()):
        raise FloatingPointError(NAN_SCORES)


def top_units(values: torch.Tensor, count: int, *, check: bool = True) -> torch.Tensor:
    """Boolean vector with exactly ``count`` True entries at the largest ``values``.

    Ties at the threshold keep the highest indices (the project's rule, see the module docstring).
    ``values`` is 1-D and free of NaN (+-inf is fine); ``check=False`` skips the NaN check, whose
    result must be read on the host: with it off the selection never synchronises with a GPU (the
    OBS step checks its statistics once for all layers instead).
    """
    if check:
        check_finite(values)
    n = values.numel()
    if count >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    # The count-th largest value, found by a partial top-k on the smaller side (measured ~5x
    # faster than torch.kthvalue on CPU for 11M entries; both are selections, not sorts).
    if count <= n // 2:
        threshold = torch.topk(values, count, sorted=False).values.min()
    else:
        threshold = torch.topk(values, n - count + 1, largest=False, sorted=False).values.max()
    if check:  # the NaN check has read back already, so one more host read costs no extra sync
        keep = values >= threshold
        if int(torch.count_nonzero(keep)) == count:  # the common case: no tie straddles the threshold
            return keep
    above = values > threshold
    at = values == threshold
    need = count - above.sum()  # a 0-dim tensor: nothing here is read back on the host
    # Rank of each tied entry counted from the end: the last ``need`` of them are kept.
    from_end = torch.cumsum(at.flip(0), 0).flip(0)
    return above | (at & (from_end <= need))


def global_ranking(units: Sequence[torch.Tensor], *, min_units: int = 0) -> torch.Tensor:
    """All layers' unit scores in one vector, as a global selection ranks them: each layer's best
    ``min_units`` (the per-layer floor) raised above everything else, so the total stays exact."""
    flat = torch.cat(list(units))
    offset = 0
    for u in units:
        floor = min(min_units, u.numel())
        if floor:  # top_units, not topk: the floor breaks ties like every other selection
            flat[offset:offset + u.numel()].masked_fill_(top_units(u, floor, check=False), float("inf"))
        offset += u.numel()
    return flat


def unit_counts(shapes: Sequence[torch.Size], granularity: str) -> list[int]:
    """Number of selectable units of each layer (weights for N:M masks)."""
    if granularity not in STRUCTURED:
        return [int(torch.Size(s).numel()) for s in shapes]
    dim = 0 if granularity == "filter" else 1
    return [int(s[dim]) for s in shapes]


def nm_group_dim(shape: Sequence[int]) -> int:
    """Length of the dimension N:M groups run along: input channels (Conv2d) or features (Linear)."""
    return int(shape[1])


def _nm_groups(t: torch.Tensor, m: int) -> torch.Tensor:
    """(groups, m) view of a weight-shaped tensor in the N:M group order (module docstring)."""
    return t.movedim(1, -1).reshape(-1, m)


def _nm_weight_shaped(groups: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of ``_nm_groups``."""
    moved = (shape[0], *shape[2:], shape[1])
    return groups.reshape(moved).movedim(-1, 1).contiguous()


def check_nm_shape(shape: Sequence[int], nm: tuple[int, int]) -> None:
    """ValueError unless the group dimension of a weight of ``shape`` is a multiple of M."""
    n, m = nm
    if not 0 < n < m:
        raise ValueError(f"an N:M pattern needs 0 < N < M, got {n}:{m}")
    if len(shape) < 2 or nm_group_dim(shape) % m:
        raise ValueError(f"N:M groups of {m} need an input dimension that is a multiple of {m}, "
                         f"got a weight of shape {tuple(shape)}")


def select_nm(scores: torch.Tensor, nm: tuple[int, int], *, check: bool = True) -> torch.Tensor:
    """Boolean weight-shaped mask keeping, in every group of M, the N weights of largest |score|.

    A stable ascending sort of each group's M values (M is small: 4 or 8) lists equal values by
    increasing index; the last N positions are kept, so ties keep the higher index, as in
    ``top_units``. Costs one sort of M values per group, no global threshold.
    """
    n, m = nm
    check_nm_shape(scores.shape, nm)
    values = _nm_groups(scores.detach().abs(), m)
    if check:
        check_finite(values)
    order = torch.sort(values, dim=1, stable=True).indices
    keep = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    keep.scatter_(1, order[:, m - n:], True)
    return _nm_weight_shaped(keep, scores.shape)


def select_masks(
    scores: Sequence[torch.Tensor],
    *,
    k: float,
    granularity: str,
    scope: str,
    min_units: int = 0,
    check: bool = True,
    nm: tuple[int, int] | None = None,
) -> list[torch.Tensor]:
    """Boolean masks (weight-shaped) keeping the top-``k`` fraction of units.

    scores: one tensor per masked layer, in module order, shaped like the layer's weight.
    scope: ``global`` (one threshold over all layers' units) or ``layer`` (k in every layer).
    min_units: per-layer floor; every layer keeps at least this many of its best units
        (only changes which units a global selection keeps, never the total).
    check: refuse NaN scores (a host synchronisation; see ``top_units``).
    nm: (N, M) for granularity ``nm``, which keeps N in every group of M whatever k, scope and
        min_units say (``select_nm``).
    """
    if granularity == "nm":
        if nm is None:
            raise ValueError("granularity 'nm' needs its pattern: pass nm=(N, M)")
        with torch.no_grad():
            return [select_nm(s, nm, check=check) for s in scores]
    if granularity not in UNIT_SCORES:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    with torch.no_grad():
        units = [UNIT_SCORES[granularity](s.detach()) for s in scores]
        if scope == "layer":
            keep = [top_units(u, max(n_keep(k, u.numel()), min(min_units, u.numel())), check=check) for u in units]
        else:
            flat = global_ranking(units, min_units=min_units)
            keep = list(top_units(flat, n_keep(k, flat.numel()), check=check).split([u.numel() for u in units]))
        return [expand_units(kk, s.shape, granularity) for kk, s in zip(keep, scores)]


class _Unbracketable(Exception):
    """The threshold cannot be bracketed by finite values (infinite scores)."""


class IncrementalTopK:
    """Exact top-``count`` selection over |scores| of several tensors, written into their mask buffers.

    Two kernels give the same masks as ``select_masks`` (ties keep the highest indices), chosen by the
    scores' device, as an ATen operator has a kernel per device:

    - **host-bracketing** (CPU, ``sync_free=False``): scores move a little per optimizer step, so the new
      threshold lies near the old one. Instead of a selection over all N scores, it brackets the new
      threshold around the old one with a few counting passes, takes the exact threshold from the few
      values inside the bracket, and writes ``|s| >= threshold``. Its decisions (bracket widths, early
      exits) read counts on the host: free on a CPU, where no queue waits, and 3x cheaper there than
      a full selection (0.05 against 0.17 s for ResNet-18's 11M scores on the 2-core machine).
    - **sync-free** (every other device, ``sync_free=True``): one partial ``torch.topk`` on the device
      gives the threshold and the tie rule is applied with tensor arithmetic (``top_units(check=False)``);
      nothing is read back, so a GPU's queue never drains inside a step (a full selection of 25M scores
      costs a GPU about a millisecond). NaN scores cannot stop the step there: ``nonfinite`` is a device
      flag that the mask set's ``check_finite`` reads when the trainer prints.

    Both write the masks and read the scores through one flat buffer each (``torch._foreach_copy_``),
    so a selection dispatches the same handful of operators however many layers share it.
    Used by ``MaskSet`` for unstructured masks; the stateless function stays the reference.
    """

    def __init__(self, *, sync_free: bool | None = None) -> None:
        self.sync_free = sync_free  # None: by the scores' device (sync-free off the CPU)
        self.threshold: float | None = None
        self.last_move = 0.0  # |change of the threshold| at the last selection: the next bracket's width
        self.passes = 0       # counting passes over all scores (for tests and benchmarks)
        # |scores| of all layers in ONE buffer (``_abs`` are its per-layer views), the masks in another:
        # a counting pass is one kernel and one host read, not one per layer (on a GPU each read waits for
        # the queue: ResNet-50's 54 layers made ~160 waits per step), and the copies in and out are one
        # foreach operator each.
        self._flat = torch.empty(0)
        self._abs: list[torch.Tensor] = []
        self._flat_mask = torch.empty(0, dtype=torch.bool)
        self._mask_views: list[torch.Tensor] = []
        self.nonfinite: torch.Tensor | None = None  # sync-free kernel: whether any score was NaN

    def _buffers(self, scores: Sequence[torch.Tensor]) -> None:
        if len(self._abs) == len(scores) and all(a.shape == s.shape and a.device == s.device and a.dtype == s.dtype
                                                 for a, s in zip(self._abs, scores)):
            return
        sizes = [s.numel() for s in scores]
        device = scores[0].device
        self._flat = torch.empty(sum(sizes), dtype=scores[0].dtype, device=device)
        self._abs = [part.view(s.shape) for part, s in zip(self._flat.split(sizes), scores)]
        self._flat_mask = torch.empty(sum(sizes), dtype=torch.bool, device=device)
        self._mask_views = [part.view(s.shape) for part, s in zip(self._flat_mask.split(sizes), scores)]
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def _count_at_least(self, value: float) -> int:
        self.passes += 1
        return int(torch.count_nonzero(torch.ge(self._flat, value)))

    def select_into(self, scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], count: int) -> None:
        self._buffers(scores)
        torch._foreach_copy_(self._abs, list(scores))
        self._flat.abs_()
        total = self._flat.numel()
        if count >= total:
            self._flat_mask.fill_(True)
        elif self.sync_free if self.sync_free is not None else self._flat.device.type != "cpu":
            self._flat_mask.copy_(top_units(self._flat, count, check=False))
            assert self.nonfinite is not None  # set with the buffers
            self.nonfinite.logical_or_(torch.isnan(self._flat).any())
        else:
            self._host_bracketing(count)
        torch._foreach_copy_(list(masks), self._mask_views)

    def _host_bracketing(self, count: int) -> None:
        """The CPU kernel: the threshold bracketed from the last one, ``self._flat_mask`` written."""
        t = self.threshold
        if t is None or not math.isfinite(t):
            t = self._exact_threshold(count)
        if not math.isfinite(t):  # NaN raises; an infinite threshold cannot be bracketed: exact path
            self.threshold = None
            self._copy_reference(count)
            return
        above = self._count_at_least(t)
        if above != count:
            try:
                lo, hi, n_hi = self._bracket(t, above, count)
            except _Unbracketable:  # infinite scores around the threshold: the exact path decides
                self.threshold = None
                self._copy_reference(count)
                return
            need = count - n_hi
            if need == 0:  # exactly count values at or above hi: hi separates them from the rest
                t = hi
            else:
                flat = self._flat
                band = flat[(flat >= lo) & (flat < hi)]
                t = float(torch.topk(band, need, sorted=False).values.min())
            above = self._count_at_least(t)
        if self.threshold is not None:
            self.last_move = abs(t - self.threshold)
        self.threshold = t
        if above != count:  # a tie straddles the threshold: of the entries equal to it, the highest indices
            # (the reference rule) fill the count. Common with millions of float32 scores (ResNet-18's 11M put
            # about a third of a value per ulp near the threshold), so not the full reference selection.
            torch.gt(self._flat, t, out=self._flat_mask)
            tied = torch.nonzero(self._flat == t).flatten()
            need = count - (above - tied.numel())
            self._flat_mask[tied[tied.numel() - need:]] = True
            return
        torch.ge(self._flat, t, out=self._flat_mask)

    def _copy_reference(self, count: int) -> None:
        self._flat_mask.copy_(top_units(self._flat, count))

    def _exact_threshold(self, count: int) -> float:
        check_finite(self._flat)
        return float(torch.topk(self._flat, count, sorted=False).values.min())

    def _bracket(self, t: float, above: int, count: int) -> tuple[float, float, int]:
        """(lo, hi, count(|s| >= hi)) with count(|s| >= lo) >= count > count(|s| >= hi), widening
        geometrically from the last move of the threshold."""
        # Thresholds drift smoothly: a bracket 1.5x the last move usually needs a single probe.
        step = max(1.5 * self.last_move, abs(t) * 1e-4, 1e-12)
        if above > count:  # threshold moved up
            lo, hi = t, t + step
            n_hi = self._count_at_least(hi)
            while n_hi > count:
                if not math.isfinite(hi):  # more than count infinite scores
                    raise _Unbracketable
                lo, step = hi, step * 4
                hi = hi + step
                n_hi = self._count_at_least(hi)
            return lo, hi, n_hi
        # too few at or above t: the threshold moved down
        lo, hi, n_hi = t - step, t, above
        n_lo = self._count_at_least(lo)
        while n_lo < count:
            if not math.isfinite(lo):
                raise _Unbracketable
            hi, n_hi, step = lo, n_lo, step * 4
            lo = lo - step
            n_lo = self._count_at_least(lo)
        return lo, hi, n_hi
