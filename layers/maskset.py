"""MaskSet: the masked layers of one model and the rule that chooses their masks.

Modelled on torch.ao.pruning's sparsifier: masks are buffers on the layers, ``step()`` updates
them, ``state_dict()`` / ``load_state_dict()`` save and restore them.

Two regimes:
- learned (HYDRA, BiP): masks are the selector's top-k of the scores, selected when the mask set is
  built. ``step()`` re-runs the selector only when a score tensor changed since the last selection
  (PyTorch bumps a tensor's ``_version`` on every in-place update, such as an optimizer step), so
  the forward pass never pays for a selection it does not need. A forward pre-hook on the model
  calls ``step()``, so a forward always sees masks consistent with the current scores;
  ``remove()`` takes the hook off.
- frozen (finetune, WoodFisher): masks are set explicitly and ``step()`` leaves them alone.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from configs.errors import UserError, one_line
from configs.options import parse_nm
from layers.convert import UnmaskableLayer, exclusion_patterns, masked_layers, to_masked
from layers.coupling import Coupling
from layers.masked import MaskedLayer
from layers.norm import MaskedLayerNorm, mask_channel_norms, norm_channel_dim
from layers.selector import (
    NAN_SCORES,
    IncrementalTopK,
    SelectionError,
    check_floor,
    n_keep,
    nm_group_dim,
    select_masks,
    unit_counts,
)

# The per-layer floor of a global selection when none is given: a structured selection keeps at
# least one filter/channel in every layer, because a layer with none left cuts the network in two
# (everything after it sees a constant). Unstructured global masks keep BiP's semantics (no floor).
DEFAULT_MIN_UNITS = {"unstructured": 0, "filter": 1, "channel": 1, "nm": 0}


def dense_masks(layers: dict[str, MaskedLayer]) -> dict[str, torch.Tensor]:
    """All-ones masks for ``layers`` (every weight alive): what a gradual pruner starts from."""
    return {name: torch.ones_like(layer.mask) for name, layer in layers.items()}


class NMShapeError(SelectionError):
    """Masked layers whose input dimension is not a multiple of M (``names``): they cannot hold an
    N:M mask and must stay dense (``--exclude-layers``)."""

    def __init__(self, message: str, names: list[str]) -> None:
        super().__init__(message)
        self.names = names


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    kind: str
    params: int
    kept: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.params if self.params else 0.0


class MaskSet:
    def __init__(self, model: nn.Module, *, k: float, granularity: str, scope: str,
                 min_units: int | None = None, nm: tuple[int, int] | None = None,
                 coupling: Coupling | None = None, layer_k: dict[str, float] | None = None,
                 sync_free: bool | None = None) -> None:
        """min_units: per-layer floor (None: ``DEFAULT_MIN_UNITS`` of the granularity). Raises
        ``SelectionError`` when the floors of a global selection do not fit in its budget.
        nm: (N, M) for granularity ``nm`` (k, scope and min_units then do not choose the masks);
        ``NMShapeError`` names the layers whose input dimension is not a multiple of M.
        coupling: filter masks chosen per dependency group (``layers.coupling``; min_units does not apply).
        layer_k: a density per layer (``--layer-k``, e.g. from ``study.sensitivity``): layer ``name`` keeps exactly
        n_keep(layer_k[name], its units), whatever ``k`` and ``scope`` say.
        sync_free: select without reading anything back to the host (None: off the CPU only; see
        ``layers.selector.IncrementalTopK``); NaN scores are then reported by ``check_finite``."""
        if coupling is not None and granularity != coupling.granularity:
            raise ValueError(f"coupled {coupling.granularity} masks, not {granularity!r}")
        self.coupling = coupling
        self.layer_k = layer_k
        self.final_k = k  # the run's k; ``k`` moves towards it under a density schedule (``set_k``)
        self.layers: dict[str, MaskedLayer] = masked_layers(model)
        self._names = {id(layer): name for name, layer in self.layers.items()}
        # Channel LayerNorms whose statistics follow the coupled masks (layers.norm)
        self.norms: dict[str, MaskedLayerNorm] = {} if coupling is None else {
            name: cast(MaskedLayerNorm, model.get_submodule(name)) for name in coupling.norm_unit_of}
        self.k = k
        self.granularity = granularity
        self.scope = scope
        self.nm = nm if granularity == "nm" else None
        if granularity == "nm":
            self._check_nm(nm)
        if layer_k is not None:
            missing, extra = sorted(set(self.layers) - set(layer_k)), sorted(set(layer_k) - set(self.layers))
            if missing or extra or coupling is not None or granularity == "nm":
                raise ValueError(f"per-layer densities must name every masked layer and no other (missing "
                                 f"{missing[:3]}, unknown {extra[:3]}), with per-layer masks (not N:M, not coupled)")
            bad = {name: v for name, v in layer_k.items() if not 0.0 < v <= 1.0}
            if bad:
                raise ValueError(f"per-layer densities must lie in (0, 1]: {bad}")
        self.min_units = DEFAULT_MIN_UNITS[granularity] if min_units is None else min_units
        if coupling is not None:
            self.min_units = 0  # a family keeps at least one unit (--scope layer); a global budget decides alone
        if scope == "global" and self.min_units and self.layers:
            check_floor(self.unit_counts(), k=k, min_units=self.min_units)
        self.frozen = False
        self.selections = 0  # how many times the selector ran (for tests and logs)
        self.sync_free = sync_free
        self._nonfinite: torch.Tensor | None = None  # sync-free selections: any NaN score seen (a device flag)
        self._signed_seen: tuple | None = None
        self._seen: tuple | None = None
        # Unstructured masks are re-selected incrementally (same result as select_masks, much faster
        # on millions of scores); one selector per group of layers sharing a threshold.
        self._incremental: list[tuple[list[MaskedLayer], IncrementalTopK]] | None = None
        if granularity == "unstructured" and self.min_units == 0:
            layers = list(self.layers.values())
            groups = [layers] if scope == "global" and layer_k is None else [[layer] for layer in layers]
            self._incremental = [(group, IncrementalTopK(sync_free=sync_free)) for group in groups]
        self._hook: RemovableHandle | None = model.register_forward_pre_hook(self._before_forward)
        self.step(force=True)  # masks that match the scores from the start, not all ones until a forward

    def remove(self) -> None:
        """Detach from the model: its forward no longer re-selects the masks. The layers keep their current
        masks (a frozen mask set needs nothing more); the model stays masked (``layers.to_dense`` undoes that)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _check_nm(self, nm: tuple[int, int] | None) -> None:
        if nm is None:
            raise ValueError("granularity 'nm' needs its pattern: pass nm=(N, M)")
        n, m = nm
        if not 0 < n < m:
            raise ValueError(f"an N:M pattern needs 0 < N < M, got {n}:{m}")
        # Refused, not skipped: a layer kept dense behind the user's back would change what k means
        # and what the checkpoint holds; --exclude-layers makes the choice visible and recorded.
        bad = {name: nm_group_dim(layer.weight.shape) for name, layer in self.layers.items()
               if nm_group_dim(layer.weight.shape) % m}
        if bad:
            depthwise = {name for name in bad if is_depthwise(self.layers[name])}
            listed = ", ".join(f"{name} ({dim}{', depthwise' if name in depthwise else ''})"
                               for name, dim in bad.items())
            why = ("; a depthwise conv has one input channel per filter, so N:M along input channels does not exist "
                   "there" if depthwise else "")
            raise NMShapeError(f"N:M {n}:{m} groups {m} consecutive input channels/features, but these layers have "
                               f"an input dimension that is not a multiple of {m}: {listed}{why}", list(bad))

    # Eager under torch.compile (--compile): the selection is host-side, data-dependent control flow
    # (thresholds, counts) that dynamo would specialise on and recompile at every score step.
    @torch.compiler.disable  # type: ignore[untyped-decorator]  # (torch leaves it untyped)
    def _before_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.step()  # must return None: a pre-hook's return value would replace the input
        self._prepare_straight_through()

    def _prepare_straight_through(self) -> None:
        """sign(s) * w of every layer whose forward will learn its scores, in two operators for all of them
        (the straight-through backward's factor, ``layers.masked``); skipped while weights and scores are
        unchanged since the last time (HYDRA's frozen weights: once per score step)."""
        if not torch.is_grad_enabled():
            return
        layers = [layer for layer in self.layers.values() if layer.wants_score_grad()]
        if not layers:
            return
        seen = tuple(key for layer in layers for key in layer.signed_key())
        if self._signed_seen is not None and len(seen) == len(self._signed_seen) and all(
                a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(seen, self._signed_seen)):
            return
        with torch.no_grad():
            signed = torch._foreach_sign([layer.popup_scores for layer in layers])
            torch._foreach_mul_(signed, [layer.weight for layer in layers])
        for layer, t in zip(layers, signed):
            layer.adopt_signed_weight(t)
        self._signed_seen = seen

    def _refresh_multipliers(self) -> None:
        """Every layer's mask in its weight's dtype, written by one operator (``layers.masked``)."""
        layers = list(self.layers.values())
        targets = [layer.multiplier_target() for layer in layers]
        with torch.no_grad():
            torch._foreach_copy_(targets, [layer.mask for layer in layers])
        for layer, t in zip(layers, targets):
            layer.adopt_multiplier(t)

    def _sync_free(self) -> bool:
        if self.sync_free is not None:
            return self.sync_free
        return next(iter(self.layers.values())).popup_scores.device.type != "cpu"

    def check_finite(self) -> None:
        """Raise FloatingPointError if a sync-free selection saw NaN scores since the mask set was built: one
        host read, for the steps that print (a host-bracketing selection raises at once instead)."""
        flags = [f for f in [self._nonfinite] + [sel.nonfinite for _, sel in self._incremental or []] if f is not None]
        if flags and bool(torch.stack([f.to(flags[0].device) for f in flags]).any()):
            raise FloatingPointError(NAN_SCORES)

    def _score_versions(self) -> tuple:
        return tuple((id(layer.popup_scores), layer.popup_scores._version) for layer in self.layers.values())

    def step(self, *, force: bool = False) -> bool:
        """Re-select masks from the scores if they changed (or ``force``); returns whether it did."""
        if self.frozen or not self.layers:
            return False
        if not force and self._seen == self._score_versions():
            return False
        with torch.no_grad():
            if self._incremental is not None:
                for group, selector in self._incremental:
                    k = self.k if self.layer_k is None else self.layer_k[self._name_of(group[0])]
                    count = n_keep(k, sum(layer.weight.numel() for layer in group))
                    selector.select_into([layer.popup_scores for layer in group], [layer.mask for layer in group],
                                         count)
            elif self.coupling is not None:
                sync_free = self._sync_free()
                chosen = self.coupling.select({n: layer.popup_scores for n, layer in self.layers.items()}, k=self.k,
                                              scope=self.scope, check=not sync_free)
                for name, layer in self.layers.items():
                    layer.mask.copy_(chosen[name])
                if sync_free:
                    self._flag_nan([layer.popup_scores for layer in self.layers.values()])
            elif self.layer_k is not None:
                for name, layer in self.layers.items():
                    layer.mask.copy_(select_masks([layer.popup_scores], k=self.layer_k[name],
                                                  granularity=self.granularity, scope="layer")[0])
            else:
                scores = [layer.popup_scores for layer in self.layers.values()]
                sync_free = self._sync_free()
                masks = select_masks(scores, k=self.k, granularity=self.granularity, scope=self.scope,
                                     min_units=self.min_units, nm=self.nm, check=not sync_free)
                torch._foreach_copy_([layer.mask for layer in self.layers.values()], masks)
                if sync_free:
                    self._flag_nan(scores)
            self._refresh_multipliers()
        self._sync_norms()
        self._seen = self._score_versions()
        self.selections += 1
        return True

    def _flag_nan(self, scores: Sequence[torch.Tensor]) -> None:
        """Record on the device whether any score is NaN (read by ``check_finite``, on print steps)."""
        norms = torch._foreach_norm(list(scores))  # NaN survives a norm
        nan = torch.stack(norms).isnan().any()
        self._nonfinite = nan if self._nonfinite is None else self._nonfinite.logical_or_(nan)

    def _name_of(self, layer: MaskedLayer) -> str:
        return self._names[id(layer)]

    def _sync_norms(self) -> None:
        """The channel masks of the coupled LayerNorms from the layers' current masks."""
        if self.coupling is None or not self.norms:
            return
        chosen = self.coupling.norm_masks({name: layer.mask for name, layer in self.layers.items()})
        for name, norm in self.norms.items():
            norm.channel_mask.copy_(chosen[name])

    def set_k(self, k: float) -> None:
        """Move the density (a schedule's value for this epoch) and re-select: exactly n_keep(k, N) again."""
        if not 0.0 < k <= 1.0:
            raise ValueError(f"a density schedule must stay in (0, 1], got {k}")
        if k != self.k:
            self.k = k
            self._incremental = None if self._incremental is None else [  # a fresh count: start over
                (group, IncrementalTopK(sync_free=self.sync_free)) for group, _ in self._incremental]
            self.step(force=True)

    @contextmanager
    def scores_fixed(self) -> Iterator[None]:
        """Within this block forward passes compute no score gradient (a weight-only step)."""
        for layer in self.layers.values():
            layer.score_grad = False
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.score_grad = True

    def freeze(self) -> None:
        """Stop following the scores: the current masks stay until set explicitly."""
        self.step()
        self.frozen = True

    def masks(self) -> dict[str, torch.Tensor]:
        self.step()
        return {name: layer.mask.detach().clone() for name, layer in self.layers.items()}

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Install explicit masks (a checkpoint's, or an OBS step's) and freeze."""
        missing = sorted(set(self.layers) - set(masks))
        extra = sorted(set(masks) - set(self.layers))
        if missing or extra:
            raise ValueError(f"mask names do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for name, layer in self.layers.items():
                mask = masks[name]
                if mask.shape != layer.mask.shape:
                    raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, "
                                     f"layer has {tuple(layer.mask.shape)}")
                layer.mask.copy_(mask.to(torch.bool))
            self._refresh_multipliers()
            self._sync_norms()
        self.frozen = True

    def report(self) -> list[LayerSparsity]:
        """Per-layer kept counts of the current masks (weights, not units)."""
        self.step()
        return [LayerSparsity(name=name, kind=type(layer).__name__.replace("Masked", ""),
                              params=layer.mask.numel(), kept=int(layer.mask.sum()))
                for name, layer in self.layers.items()]

    def density(self) -> float:
        rows = self.report()
        total = sum(r.params for r in rows)
        return sum(r.kept for r in rows) / total if total else 1.0

    def unit_counts(self) -> list[int]:
        return unit_counts([layer.weight.shape for layer in self.layers.values()], self.granularity)

    def state_dict(self) -> dict:
        return {"k": self.k, "final_k": self.final_k, "granularity": self.granularity, "scope": self.scope,
                "nm": self.nm,
                "coupled": self.coupling is not None, "min_units": self.min_units, "frozen": self.frozen,
                "masks": self.masks()}

    def load_state_dict(self, state: dict) -> None:
        # Under a density schedule the state's k is that of its epoch, its final_k the run's (= this one's k).
        scheduled = state.get("final_k", state.get("k")) != state.get("k")
        if scheduled and state.get("final_k") == self.final_k:
            self.k = state["k"]
        for key in ("k", "granularity", "scope", "nm"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"mask set {key} is {state[key]!r} in the state, {getattr(self, key)!r} here")
        if state.get("coupled", False) != (self.coupling is not None):
            raise ValueError(f"mask set coupled is {state.get('coupled', False)!r} in the state, "
                             f"{self.coupling is not None!r} here")
        self.set_masks(state["masks"])
        self.frozen = bool(state["frozen"])
        self._seen = self._score_versions()  # the loaded masks belong to the loaded scores


def read_layer_k(path: str | None) -> dict[str, float] | None:
    """--layer-k's file: {layer: k}, or study.sensitivity's {"layer_k": {layer: k}, ...} (JSON: data, never code);
    None without one."""
    if path is None:
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"--layer-k {path} cannot be read as JSON ({one_line(exc)}): pass the layer_k.json of "
                        "python -m study.sensitivity") from None
    table = data.get("layer_k", data) if isinstance(data, dict) else None
    if not isinstance(table, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in table.values()):
        raise UserError(f"--layer-k {path} must map layer names to densities, e.g. {{\"conv1\": 0.5}}")
    return {str(name): float(v) for name, v in table.items()}


def build_maskset(model: nn.Module, *, granularity: str, k: float, scope: str, layer_floor: int | None = None,
                  nm: str = "2:4", exclude: str | None = None, arch: str = "the model",
                  example: torch.Tensor | None = None,
                  coupled: Sequence[Sequence[tuple[str, int]]] | None = None,
                  layer_k: dict[str, float] | None = None) -> tuple[MaskSet, list[str]]:
    """Mask ``model``'s layers (``to_masked``, keeping the ``exclude`` patterns dense) and build the run's
    mask set. A refusal is a UserError naming the flag that fixes it (--exclude-layers, --layer-type,
    --layer-floor); returns the mask set and the notices for the run log. ``example``: one input batch;
    given, a forward pass checks that every masked layer is called as a module (``check_called``).
    ``coupled``: the model's dependency groups of filters (``deploy.slim.dependency_groups``): filter
    masks chosen per group (``layers.coupling``)."""
    patterns = exclusion_patterns(exclude)
    members = {name for group in coupled or [] for name, _ in group}
    modules = dict(model.named_modules())
    # Under coupling, linear layers that produce channels of a feature map (ConvNeXt's pointwise MLPs) are
    # masked by rows like convs, and channel LayerNorms normalise over the kept channels (layers.norm).
    pointwise = {name for name in members if isinstance(modules.get(name), nn.Linear)}
    norms = {name for name in members if norm_channel_dim(modules[name]) is not None} if members else set()
    try:
        to_masked(model, granularity=granularity, exclude=patterns, also=pointwise)
    except UnmaskableLayer as exc:
        raise UserError(str(exc)) from None
    except ValueError as exc:
        raise UserError(f"--exclude-layers: {exc}") from None
    if granularity == "channel":
        check_channel_units(model, patterns)
    if example is not None:  # before the mask set exists: its forward hook would run a selection for nothing
        check_called(model, masked_layers(model), example=example, patterns=patterns)
    twins = mask_channel_norms(model, norms)
    dim = 1 if granularity == "channel" else 0  # a unit member: a filter, or an input channel
    coupling = None if coupled is None else Coupling.of(
        coupled, {name: layer.weight.shape[dim] for name, layer in masked_layers(model).items()},
        {name: norm.normalized_shape[0] for name, norm in twins.items()}, granularity=granularity)
    try:
        maskset = MaskSet(model, k=k, granularity=granularity, scope=scope, min_units=layer_floor,
                          nm=parse_nm(nm) if granularity == "nm" else None, coupling=coupling, layer_k=layer_k)
    except NMShapeError as exc:
        # The fix is one flag: the user's own exclusions plus these layers.
        keep = ",".join(patterns + exc.names)
        raise UserError(f"--layer-type nm: {exc}; keep them dense with --exclude-layers {keep}") from None
    except SelectionError as exc:
        raise UserError(str(exc)) from None
    except ValueError as exc:  # the per-layer densities do not fit the model
        if layer_k is None:
            raise
        raise UserError(f"--layer-k: {exc}") from None
    if layer_k is not None:
        counts = maskset.unit_counts()
        kept = sum(n_keep(layer_k[name], n) for name, n in zip(maskset.layers, counts))
        if kept != n_keep(k, sum(counts)):
            raise UserError(f"--layer-k keeps {kept:,} of {sum(counts):,} units ({kept / sum(counts):.6g}), not what "
                            f"--k {k:g} keeps ({n_keep(k, sum(counts)):,}): pass the --k the file was made for")
    if not maskset.layers and exclude:
        raise UserError(f"--exclude-layers {exclude} excludes every layer --layer-type {granularity} would mask: "
                        "nothing is left to prune; exclude fewer layers")
    if not maskset.layers:
        raise UserError(f"--layer-type {granularity} masks convolutions only (linear layers stay dense, as in "
                        f"BiP) and {arch} has none: use --layer-type unstructured")
    notices = []
    if coupling is not None:
        what = "filters" if granularity == "filter" else "input channels"
        notices.append(f"coupled {granularity} masks: {coupling.units:,} units, {coupling.tied():,} of them {what} "
                       "tied across layers (residual additions, depthwise convs, squeeze-excitation), kept or pruned "
                       "together")
        if twins:
            notices.append(f"coupled channel LayerNorms: {len(twins)} normalise over the kept channels only, so that "
                           f"a pruned channel leaves them (pointwise linear layers masked by rows: {len(pointwise)})")
    dense = unmasked_weights(model)
    if dense:
        notices.append(dense)
    if maskset.nm is not None:
        kept, size = maskset.nm
        notices.append(f"N:M masks: every group of {size} consecutive input channels/features keeps its {kept} "
                       f"highest-scoring weights (--scope {scope} does not apply)")
    if scope == "global" and maskset.min_units:
        unit = granularity if granularity in ("filter", "channel") else "weight"
        notices.append(f"every masked layer keeps at least {maskset.min_units} {unit}(s) "
                       f"(--layer-floor {maskset.min_units}), so no layer is emptied")
    return maskset, notices


def is_depthwise(layer: nn.Module) -> bool:
    """A conv with one group per input channel (MobileNet's and EfficientNet's 3x3 convs)."""
    groups = getattr(layer, "groups", 1)
    return groups > 1 and getattr(layer, "in_channels", 0) == groups


def check_channel_units(model: nn.Module, patterns: list[str]) -> None:
    """Refuse channel masks on grouped convolutions. A channel unit is an input channel: dim 1 of the
    weight, shared by every filter. In a grouped conv dim 1 indexes the channels WITHIN a group, so
    unit j would be the j-th input channel of every group at once (several real channels), and a
    depthwise conv (groups = channels) would be a single unit, kept or removed whole. For a depthwise
    conv a filter is also its channel: --layer-type filter masks it by channel."""
    grouped = [(name, layer.groups) for name, layer in masked_layers(model).items()
               if getattr(layer, "groups", 1) > 1]
    if grouped:
        depthwise = sum(1 for name, _ in grouped if is_depthwise(model.get_submodule(name)))
        shown = ", ".join(f"{name} (groups {g})" for name, g in grouped[:4])
        more = f" and {len(grouped) - 4} more" if len(grouped) > 4 else ""
        keep = ",".join(patterns + [name for name, _ in grouped])
        raise UserError(f"--layer-type channel: {shown}{more} are grouped convolutions ({depthwise} depthwise), whose "
                        "input channels are not units shared by all their filters; use --layer-type filter (for a "
                        f"depthwise conv a filter is its channel) or keep them dense with --exclude-layers {keep}")


def check_called(model: nn.Module, layers: dict[str, MaskedLayer], *, example: torch.Tensor,
                 patterns: list[str]) -> None:
    """Refuse masked layers that the forward pass never calls as modules: their parent reads their weight
    in its own code (torchvision's Swin attention calls ``F.linear(x, self.qkv.weight)``), so their mask
    would change nothing while the report counted it. One forward pass of ``example`` in eval mode,
    without gradients (nothing is trained or updated), then the model's mode is put back."""
    called: set[str] = set()
    handles = [layer.register_forward_pre_hook(lambda module, args, name=name: called.add(name))
               for name, layer in layers.items()]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    missed = [name for name in layers if name not in called]
    if missed:
        parent = missed[0].rpartition(".")[0]
        owner = type(model.get_submodule(parent)).__name__ if parent else type(model).__name__
        shown = ", ".join(missed[:4]) + (f" and {len(missed) - 4} more" if len(missed) > 4 else "")
        # one pattern per kind of layer (its last two name parts: Swin's 24 "features.i.j.attn.qkv" are "*.attn.qkv")
        keep = ",".join(patterns + sorted({"*." + ".".join(n.split(".")[-2:]) if n.count(".") > 1 else n
                                           for n in missed}))
        raise UserError(f"{shown}: the forward pass never calls them (their parent, e.g. {owner}, reads their weights "
                        f"in its own code), so a mask there would change nothing; keep them dense with "
                        f"--exclude-layers {keep}")


# Parameters that no mask reaches by design and that pruning never removes: summarised in one group.
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def unmasked_weights(model: nn.Module, *, listed: int = 6) -> str | None:
    """One log line naming the weights of ``model`` that stay dense (modules with a weight that hold no
    mask, and parameters of their own such as a ViT's class token), each with its parameter count;
    biases of masked layers and normalisation layers summed as one group. None when all are masked."""
    masked = {id(p) for layer in masked_layers(model).values() for p in (layer.weight, layer.popup_scores)}
    named: list[tuple[str, str, int]] = []
    norm = 0
    for name, module in model.named_modules():
        own = [p for _, p in module.named_parameters(recurse=False) if id(p) not in masked]
        if not own:
            continue
        count = sum(p.numel() for p in own)
        if isinstance(module, MaskedLayer) or isinstance(module, _NORM_TYPES):
            norm += count  # a masked layer's bias, or a norm layer's affine parameters
        else:
            named.append((name or "(model)", type(module).__name__, count))
    if not named:
        return None
    total = sum(c for *_, c in named)
    shown = ", ".join(f"{n} ({kind}, {c:,})" for n, kind, c in named[:listed])
    more = f", ... and {len(named) - listed} more" if len(named) > listed else ""
    extra = f"; plus {norm:,} biases and normalisation parameters" if norm else ""
    return (f"{total:,} weights in {len(named)} module(s) stay dense (no mask, never pruned): {shown}{more}{extra}")
