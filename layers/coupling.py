"""Coupled filter masks: one keep/drop decision per dependency group of tied filters (``--coupled``).

Per-layer filter masks let a residual stream keep the union of what the convs adding into it keep,
and a depthwise conv keep the union of its own and its producer's filters, so slimming removes less
than k says. With coupling, the filters that share a channel (``deploy.slim.dependency_groups``:
residual additions, depthwise convs and their producers, squeeze-excitation) form one unit:

- its score is the L2 norm of all its members' scores (each member filter's score tensor), the
  per-group analogue of HYDRA/BiP's filter score (the L2 norm of a filter's scores);
- the one selector keeps n_keep(k, units) units: over all units (``--scope global``), or within each
  *family* (``--scope layer``): the units whose members come from the same set of layers, e.g. the
  channels of one residual stream, or the filters of one plain conv, so that every layer keeps k of
  its own filters, as without coupling;
- every member filter of a kept unit is kept, of a dropped one dropped: a pruned channel disappears
  everywhere it flows, and the slimmed model drops it whole.
Filters the analysis does not couple are units of their own, so a network without ties gets exactly
its per-layer masks.

Coupled channel masks (``--layer-type channel --coupled``) are the same with the readers of a channel
as members: the input channel of every conv that reads it (``dependency_groups(granularity="channel")``),
so a pruned channel is read by no layer and slimming removes it with its producers' filters.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from layers.selector import alive_units, expand_units, n_keep, top_units


@dataclass(frozen=True)
class Coupling:
    """For each masked layer, the unit (dependency group) of each of its filters; and each unit's family."""
    unit_of: dict[str, torch.Tensor]  # layer name -> LongTensor (filters,): the unit of each filter
    family_of: torch.Tensor           # LongTensor (units,): the family of each unit
    units: int
    norm_unit_of: dict[str, torch.Tensor] = field(default_factory=dict)  # channel LayerNorm -> unit per channel
    granularity: str = "filter"  # the members: filters (dim 0 of a weight) or input channels (dim 1)
    # Copies of the tensors above on the device a selection runs on, made once: a host-to-device copy
    # per step would wait on the GPU's queue like a read does.
    _copies: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def families(self) -> int:
        """How many families (read once from the host tensor ``family_of``)."""
        return int(self.family_of.max()) + 1

    def _on(self, key: str, device: torch.device) -> torch.Tensor:
        """``unit_of[key]`` (or "family"; "family:F", the indices of family F's units; "norm:NAME",
        ``norm_unit_of[NAME]``) on ``device``."""
        copy = self._copies.get((key, str(device)))
        if copy is None:
            if key == "family":
                source = self.family_of
            elif key.startswith("family:"):
                source = (self.family_of == int(key[len("family:"):])).nonzero().flatten()  # host tensors
            elif key.startswith("norm:"):
                source = self.norm_unit_of[key[len("norm:"):]]
            else:
                source = self.unit_of[key]
            copy = self._copies[(key, str(device))] = source.to(device)
        return copy

    @staticmethod
    def of(groups: Sequence[Sequence[tuple[str, int]]], filters: dict[str, int],
           norms: dict[str, int] | None = None, granularity: str = "filter") -> Coupling:
        """From ``deploy.slim.dependency_groups`` and the masked layers' filter counts; filters of masked
        layers in no group become units of their own. ``norms``: the channel LayerNorms in the groups and
        their channel counts (``layers.norm``): each channel follows its group's unit."""
        unit_of = {name: torch.full((count,), -1, dtype=torch.long) for name, count in filters.items()}
        norm_unit_of = {name: torch.full((count,), -1, dtype=torch.long) for name, count in (norms or {}).items()}
        members: list[list[tuple[str, int]]] = []
        for group in groups:
            own = [(name, j) for name, j in group if name in unit_of]
            if own:
                for name, j in own:
                    unit_of[name][j] = len(members)
                members.append(own)
                # A norm channel follows the unit, unless a plain (unmasked) layer also produces it
                plain = any(name not in unit_of and name not in norm_unit_of for name, _ in group)
                for name, j in group:
                    if name in norm_unit_of and not plain:
                        norm_unit_of[name][j] = len(members) - 1
        for name, units in unit_of.items():
            for j in (units < 0).nonzero().flatten().tolist():
                units[j] = len(members)
                members.append([(name, j)])
        families: dict[tuple[str, ...], int] = {}
        family_of = torch.tensor([families.setdefault(tuple(sorted({n for n, _ in m})), len(families))
                                  for m in members], dtype=torch.long)
        return Coupling(unit_of=unit_of, family_of=family_of, units=len(members), norm_unit_of=norm_unit_of,
                        granularity=granularity)

    def tied(self) -> int:
        """How many units couple more than one filter."""
        counts = torch.zeros(self.units, dtype=torch.long)
        for units in self.unit_of.values():
            counts.index_add_(0, units, torch.ones_like(units))
        return int((counts > 1).sum())

    def filters_per_unit(self, name: str) -> int | None:
        """How many of layer ``name``'s filters each of its units holds: 1 but for grouped convs, whose
        j-th channels of every group are one unit; None when its units hold unequal numbers."""
        counts = torch.bincount(self.unit_of[name])
        counts = counts[counts > 0]
        return int(counts[0]) if bool((counts == counts[0]).all()) else None

    def unit_order(self, name: str) -> torch.Tensor:
        """Layer ``name``'s filters sorted by unit (stable): each unit's filters of the layer contiguous."""
        return torch.argsort(self.unit_of[name], stable=True)

    def alive_units(self, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many units keep any member filter under ``masks`` (a 0-dim tensor, on the masks' device)."""
        first = next(iter(masks.values()))
        counts = torch.zeros(self.units, dtype=torch.long, device=first.device)
        for name, mask in masks.items():
            counts.index_add_(0, self._on(name, first.device), alive_units(mask, self.granularity).long())
        return (counts > 0).sum()

    def norm_masks(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each channel LayerNorm's channel mask under the layers' ``masks``: a channel is kept while its
        unit keeps any member filter (a channel in no unit always)."""
        if not self.norm_unit_of:
            return {}
        first = next(iter(masks.values()))
        counts = torch.zeros(self.units + 1, dtype=torch.long, device=first.device)
        counts[-1] = 1  # index -1: channels in no unit
        for name, mask in masks.items():
            counts.index_add_(0, self._on(name, first.device), alive_units(mask, self.granularity).long())
        return {name: counts[self._on(f"norm:{name}", first.device)] > 0 for name in self.norm_unit_of}

    def unit_scores(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each unit's score: the L2 norm of all its members' scores (float64 sums: exact ranking)."""
        squares = torch.zeros(self.units, dtype=torch.float64, device=next(iter(scores.values())).device)
        for name, s in scores.items():
            s = s.detach() if self.granularity == "filter" else s.detach().transpose(0, 1)
            per_filter = s.flatten(1).to(torch.float64).square().sum(1)
            squares.index_add_(0, self._on(name, squares.device), per_filter)
        return squares.sqrt()

    def select(self, scores: dict[str, torch.Tensor], *, k: float, scope: str,
               check: bool = True) -> dict[str, torch.Tensor]:
        """Weight-shaped boolean masks: n_keep(k, units) units kept over all units (global) or within each
        family (layer), at least one per family; ties keep the higher unit index, as everywhere.
        ``check=False``: no NaN check and no host read (``top_units``); the caller flags NaN scores itself."""
        values = self.unit_scores(scores)
        if scope == "global":
            keep = top_units(values, n_keep(k, self.units), check=check)
        else:
            keep = torch.zeros(self.units, dtype=torch.bool, device=values.device)
            for f in range(self.families):
                idx = self._on(f"family:{f}", values.device)
                keep[idx[top_units(values[idx], max(1, n_keep(k, idx.numel())), check=check)]] = True
        return {name: expand_units(keep[self._on(name, keep.device)], s.shape, self.granularity)
                for name, s in scores.items()}
