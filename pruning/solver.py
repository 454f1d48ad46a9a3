"""The OBS solver: one Optimal Brain Surgeon step on a set of masked layers, for every trainer.

A small model-agnostic class in the manner of IST-DASLab's ``sparsegpt.py``; its names follow the
WoodFisher paper (m gradients, damp lambda, blocks of c weights, statistic rho, update dw):

    solver = OBSSolver(layers, granularity="unstructured", method=PRUNE_METHODS["woodfisher"],
                       fisher=FisherSettings(m=64, samples_per_grad=8, damp=1e-5, block_size=512))
    solver.collect(model, batches)          # or solver.add_gradients(G), G = m x D rows
    masks = solver.prune_to(0.1, scope="global")      # score, select (shared selector), update, install
    # or, for a mask chosen by someone else (a learned HYDRA/BiP mask):
    record = solver.compensate(new_masks)

``scores()`` is the method's statistic per weight (weight-shaped, ready for the selector: it ranks
|score| per weight and the L2 norm of a filter's/channel's scores), ``compensate(new_masks)`` the
update for removing every currently alive weight that ``new_masks`` drops: per Fisher block the
joint OBS solution dw = -F^-1[:, Q] ([F^-1]_QQ)^-1 w_Q (exact under the quadratic model), or the
sum of single-weight updates (WoodFisher's approximation) with ``joint=False`` or where the joint
system would exceed ``joint_limit`` (it never costs more than one block's inverse: at most
min(c, m)^2 numbers per block; see ``EmpiricalFisherInverse.solve_pruned``). The record says which.

Unit criteria (``PruneMethod.unit_statistic``: fpgm, taylorfo) score each filter/channel of a layer at
once from its weights, and for ``fisher="rows"`` (taylorfo) from the layer's columns of G, handed over as
they are: no inverse is built, nothing is compensated, and the update only zeroes. With a ``coupling`` a
unit criterion scores each filter in its layer, and a coupled unit ranks by the sum of its filters' scores
(what the selector makes of the weight-shaped scores).

Criteria that read the model (``PruneMethod.probe``: apoz and meanact their filters' activations, slimming
the BatchNorm gamma after each layer) get it from ``probe(model, batches)`` (``pruning.activations``) before
scoring; each layer's ``UnitProbe`` is handed to the unit statistic as ``probe=``. A method with a curvature
reader (``PruneMethod.curvature``: naivehess's Hessian diagonal, kfac's Kronecker inverse) reads it in
``probe(model, batches)`` too, and each layer's curvature is its blocks' ``fisher_inverse``.

Blocks (weights that share one Fisher inverse): chunks of ``block_size`` contiguous weights of one
layer, a whole layer, or all layers at once. Filter/channel masks always use whole-layer blocks: a
pruned group's update must be able to move the other groups of its layer (a group at least as wide
as a chunk would otherwise be a block of its own, and its update would move nothing).

Everything tensor-valued stays on the solver's device, with no host synchronisation inside the
per-layer work: the few numbers a caller logs are read once, at the end of a step. G itself may live
in host memory (``offload``); chunks of it are staged to the device when an inverse needs them.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from configs.options import FISHER_BLOCKS, FisherOptions
from layers.coupling import Coupling
from layers.masked import MaskedLayer
from layers.selector import STRUCTURED, select_masks
from pruning.activations import UnitProbe, activation_stats, batchnorm_gammas
from pruning.fisher_inverse import DiagonalFisher, EmpiricalFisherInverse
from pruning.free_memory import available_bytes
from pruning.gradients import collect_gradients
from pruning.kfac import KroneckerChannels, KroneckerInverse
from pruning.methods import PruneMethod, selector_scores
from pruning.obs import LayerCurvature, group_permutation


@dataclass(frozen=True)
class FisherSettings:
    """How the damped empirical Fisher F = damp I + G^T G / m is estimated and blocked."""

    m: int = 100                     # number of gradient rows (--fisher-subsample-size)
    samples_per_grad: int = 1        # samples averaged into each row (--fisher-mini-bsz)
    max_samples: int | None = None   # at most this many samples of a row per forward (--max-mini-bsz)
    damp: float = 1e-5               # lambda (--fisher-damp)
    block_size: int = 2000           # c, for blocks="chunk" (--fittable-params)
    blocks: str = "chunk"            # chunk | layer | all (--fisher-blocks)
    offload: bool = False            # keep G in host memory (--offload-grads; matters on a GPU only)
    joint_limit: int = 4096          # largest per-block system (min(|Q|, c, m)) of the joint solve
    hessian_probes: int = 0          # naivehess: Hutchinson probes, 0 = the exact diagonal (--hessian-probes)

    def __post_init__(self) -> None:
        if self.blocks not in FISHER_BLOCKS:
            raise ValueError(f"blocks must be one of {FISHER_BLOCKS}, got {self.blocks!r}")
        if self.m < 1 or self.samples_per_grad < 1 or self.block_size < 1 or not self.damp > 0:
            raise ValueError(f"invalid Fisher settings {self}")

    @classmethod
    def of(cls, options: FisherOptions, *, damp: float, hessian_probes: int = 0) -> FisherSettings:
        """The solver's settings (the paper's names) from the command line's (the public code's names)."""
        return cls(m=options.fisher_subsample_size, samples_per_grad=options.fisher_mini_bsz,
                   max_samples=options.max_mini_bsz, damp=damp, block_size=options.fittable_params,
                   blocks=options.fisher_blocks, offload=options.offload_grads, hessian_probes=hessian_probes)

    def offloaded(self, device: torch.device) -> bool:
        """Whether G lives in host memory for a solver on ``device`` (on a CPU there is nowhere to offload to)."""
        return self.offload and device.type == "cuda"


def collect_rows(model: nn.Module, layers: dict[str, MaskedLayer],
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, fisher: FisherSettings, device: torch.device,
                 rows: int | None = None, label_smoothing: float = 0.0, label_generator: torch.Generator | None = None,
                 masked_columns: bool = True) -> torch.Tensor:
    """G: ``rows`` (default ``fisher.m``) gradient rows of ``layers`` from ``batches``
    (``pruning.gradients``), each the mean over ``fisher.samples_per_grad`` samples, with the model in
    eval mode and no score gradient; in pinned host memory when ``fisher`` offloads on a GPU."""
    m = fisher.m if rows is None else rows
    out = None
    if fisher.offloaded(device):
        out = torch.empty(m, sum(layer.weight.numel() for layer in layers.values()),
                          dtype=next(iter(layers.values())).weight.dtype, pin_memory=torch.cuda.is_available())
    score_grad = [layer.score_grad for layer in layers.values()]
    for layer in layers.values():  # a plain weight * mask forward: no straight-through path
        layer.score_grad = False
    try:
        return collect_gradients(model, layers, batches, rows=m, samples_per_row=fisher.samples_per_grad,
                                 max_samples=fisher.max_samples, label_smoothing=label_smoothing,
                                 label_generator=label_generator, out=out, masked_columns=masked_columns)
    finally:
        for layer, flag in zip(layers.values(), score_grad):
            layer.score_grad = flag


@dataclass(frozen=True)
class BlockGroup:
    """Layers that share one block-diagonal inverse: one layer, or all layers (blocks="all")."""

    names: tuple[str, ...]
    start: int  # first column in G
    size: int   # number of columns (weights)


_Inverse = EmpiricalFisherInverse | DiagonalFisher | LayerCurvature | None  # what a block's statistic reads


@dataclass
class _Prepared:
    """A block group's weights, alive mask, gradient columns and inverse, in its (permuted) order."""

    w: torch.Tensor
    alive: torch.Tensor
    perm: torch.Tensor | None
    group_size: int
    inverse: _Inverse
    grad_mean: torch.Tensor | None
    rows: torch.Tensor | None  # G's columns of the group, in its order: a statistic that reads them (fisher "rows")
    solved: torch.Tensor | None  # per-group ([F^-1]_QQ)^-1 w_Q, kept from the statistic for the update
    kept_bytes: int


@dataclass
class StepRecord:
    """What one OBS step did, for the run log (read from the device once, at the end of the step)."""

    pruned: int = 0
    alive_before: int = 0
    alive_after: int = 0
    solve: str = "none"  # joint | sum | none (no compensation)
    seconds: float = 0.0
    grad_seconds: float = 0.0
    grads_bytes: int = 0
    inverse_peak_bytes: int = 0
    notes: list[str] = field(default_factory=list)


class OBSSolver:
    """One OBS step on ``layers`` (see the module docstring)."""

    def __init__(self, layers: dict[str, MaskedLayer], *, granularity: str, method: PruneMethod,
                 fisher: FisherSettings | None = None, device: torch.device | str | None = None,
                 nm: tuple[int, int] | None = None, coupling: Coupling | None = None) -> None:
        """nm: (N, M) for granularity ``nm``: the per-weight statistic, a per-group top-N selection,
        and the unstructured update for the removed set (see ``prune_to``). coupling: filter masks
        chosen per dependency group (``layers.coupling``): a unit ranks by the sum of its members'
        statistics over the layers (exact: the Fisher is block-diagonal over layers), and a group
        statistic covers all of a unit's filters in one layer at once (a grouped conv's tied channels)."""
        if granularity not in method.granularities:
            raise ValueError(f"prune method {method.name} does not support {granularity} masks")
        if granularity == "nm" and nm is None:
            raise ValueError("granularity 'nm' needs its pattern: pass nm=(N, M)")
        self.nm = nm if granularity == "nm" else None
        if coupling is not None and granularity != coupling.granularity:
            raise ValueError(f"coupled {coupling.granularity} masks, not {granularity!r}")
        self.coupling = coupling
        if not layers:
            raise ValueError("the solver needs at least one masked layer")
        self.layers = layers
        self.granularity = granularity
        self.method = method
        self.fisher = fisher or FisherSettings()
        first = next(iter(layers.values()))
        self.device = torch.device(device) if device is not None else first.weight.device
        self.G: torch.Tensor | None = None
        self.probes: dict[str, UnitProbe] | None = None  # what ``probe`` read off the model, by layer
        self.curvatures: dict[str, LayerCurvature] | None = None  # a curvature reader's, by layer
        self.record = StepRecord()
        self._prepared: dict[int, _Prepared] = {}
        self._kept_bytes = 0
        self._budget: int | None = None  # the step's keep budget (``_keep_budget``), read at its first use
        self._peak_bytes = 0
        self._nan = torch.zeros((), dtype=torch.bool, device=self.device)  # any NaN statistic this step
        offsets, start = [], 0
        for name, layer in layers.items():
            offsets.append(BlockGroup((name,), start, layer.weight.numel()))
            start += layer.weight.numel()
        self.num_weights = start
        if method.fisher == "empirical" and self.fisher.blocks == "all" and not self._grouped():
            self.groups = [BlockGroup(tuple(layers), 0, start)]
        else:
            self.groups = offsets

    # -- gradients ------------------------------------------------------------------------------
    def _grouped(self) -> bool:
        """Group OBS: a group statistic on whole-layer blocks of the Fisher inverse."""
        return self.granularity in STRUCTURED and self.method.group_statistic is not None

    def _unit_criterion(self) -> bool:
        """A statistic per filter/channel with no inverse (``PruneMethod.unit_statistic``)."""
        return self.granularity in STRUCTURED and self.method.unit_statistic is not None

    def _offloaded(self) -> bool:
        return self.fisher.offloaded(self.device)

    def add_gradients(self, G: torch.Tensor, *, seconds: float = 0.0) -> None:
        """Use the m x D gradient rows G (columns: the layers' weights flattened, in layer order;
        pruned coordinates 0); ``seconds``: how long collecting them took, for the record."""
        if G.dim() != 2 or G.shape[1] != self.num_weights:
            raise ValueError(f"G must be (m, {self.num_weights}), got {tuple(G.shape)}")
        self.G = G
        self.free_inverses()
        self.record.grad_seconds = seconds
        self.record.grads_bytes = G.numel() * G.element_size()

    def collect(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                label_smoothing: float = 0.0, label_generator: torch.Generator | None = None,
                masked_columns: bool = True) -> None:
        """Fill G from ``batches`` (``collect_rows``); nothing for a method without a Fisher."""
        if self.method.fisher is None:
            return
        t0 = time.perf_counter()
        G = collect_rows(model, self.layers, batches, fisher=self.fisher, device=self.device,
                         label_smoothing=label_smoothing, label_generator=label_generator,
                         masked_columns=masked_columns)
        self.add_gradients(G, seconds=time.perf_counter() - t0)

    def probe(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None, *,
              samples: int = 0) -> None:
        """Read what the method's unit statistic needs off ``model`` (``PruneMethod.probe``): the per-filter
        activation counts over the first ``samples`` samples of ``batches``, or the BatchNorm gammas (no
        batches); nothing for other methods. A layer the criterion cannot measure is a UserError naming
        --exclude-layers."""
        kind, name = self.method.probe, self.method.name
        if kind == "activations":
            if batches is None or samples < 1:
                raise ValueError(f"prune method {name} needs calibration batches and samples >= 1")
            self.probes = activation_stats(model, self.layers, batches, samples=samples, device=self.device,
                                           criterion=name)
        elif kind == "batchnorm":
            self.probes = batchnorm_gammas(model, self.layers, criterion=name)
        elif self.method.curvature is not None:
            if batches is None or samples < 1:
                raise ValueError(f"prune method {name} needs calibration batches and samples >= 1")
            self.curvatures = dict(self.method.curvature(model, self.layers, batches, samples=samples,
                                                         device=self.device, damp=self.fisher.damp, criterion=name,
                                                         probes=self.fisher.hessian_probes))

    def _layer_probe(self, group: BlockGroup) -> UnitProbe | None:
        if self.method.probe is None:
            return None
        if self.probes is None:
            raise ValueError(f"prune method {self.method.name} reads the model: call probe(model, batches) first")
        (name,) = group.names  # a unit criterion's blocks are single layers (``__init__``)
        return self.probes[name]

    # -- per block group: weights, inverse, statistic --------------------------------------------
    def _prepare(self, i: int) -> _Prepared:
        if i in self._prepared:
            return self._prepared[i]
        group = self.groups[i]
        layers = [self.layers[n] for n in group.names]
        w = torch.cat([layer.weight.detach().reshape(-1) for layer in layers])
        alive = torch.cat([layer.mask.reshape(-1) for layer in layers])
        perm, gsize = None, 1
        if self.granularity in STRUCTURED:
            perm, gsize = group_permutation(shape=layers[0].weight.shape, granularity=self.granularity,
                                            device=self.device)
            if self.coupling is not None and self._grouped():
                perm, gsize = self._unit_permutation(group.names[0], filter_size=gsize, perm=perm)
        cols = None
        staged = 0
        if self.method.fisher is not None:
            if self.G is None:
                raise ValueError(f"prune method {self.method.name} needs gradients: call collect() or add_gradients()")
            cols = self.G[:, group.start:group.start + group.size]
            if perm is not None:
                cols = cols[:, perm.to(cols.device)]  # a copy, where G lives
                staged = cols.numel() * cols.element_size() if cols.device == self.device else 0
        if perm is not None:
            w, alive = w[perm], alive[perm]
        if self.method.curvature is not None:  # naivehess, kfac: the layer's own curvature, read by ``probe``
            inverse: _Inverse = self._layer_curvature(group, perm)
        else:
            inverse = self._inverse(cols, gsize)
        grad_mean = cols.mean(0).to(self.device) if (cols is not None and self.method.needs_grad_mean) else None
        rows = cols if self.method.fisher == "rows" else None
        kept = staged + (inverse.kept_memory_bytes() if inverse is not None else 0)
        if inverse is not None:
            self._peak_bytes = max(self._peak_bytes, self._kept_bytes + staged + inverse.peak_memory_bytes())
        if rows is not None:  # columns of G in host memory are staged to the device for the statistic
            staging = rows.numel() * rows.element_size() if rows.device != self.device else 0
            self._peak_bytes = max(self._peak_bytes, self._kept_bytes + staged + staging)
        prepared = _Prepared(w=w, alive=alive, perm=perm, group_size=gsize, inverse=inverse, grad_mean=grad_mean,
                             rows=rows, solved=None, kept_bytes=kept)
        if self._budget is None:  # read once per step: what is free now, with G allocated
            self._budget = self._keep_budget()
        if self._kept_bytes + kept <= self._budget:
            self._prepared[i] = prepared
            self._kept_bytes += kept
        return prepared

    def _layer_curvature(self, group: BlockGroup, perm: torch.Tensor | None) -> LayerCurvature:
        if self.curvatures is None:
            raise ValueError(f"prune method {self.method.name} reads the model: call probe(model, batches) first")
        (name,) = group.names  # no empirical Fisher: the blocks are single layers (``__init__``)
        curvature = self.curvatures[name]
        return curvature if perm is None else curvature.permuted(perm)

    def _unit_permutation(self, name: str, *, filter_size: int,
                          perm: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
        """The order that makes each unit's filters of layer ``name`` one contiguous group, and its size."""
        assert self.coupling is not None
        per_unit = self.coupling.filters_per_unit(name)
        if per_unit is None:
            raise ValueError(f"layer {name}'s coupled units hold unequal numbers of its filters: a group OBS "
                             "statistic per unit needs equal groups")
        if per_unit == 1:
            return perm, filter_size
        # The weight's indices with one row per member (a filter, or an input channel: then the rows of the
        # channel permutation), rows reordered so that each unit's members are contiguous.
        shape = self.layers[name].weight.shape
        index = torch.arange(shape.numel(), device=self.device).view(shape[0], -1)
        if self.granularity == "channel":
            index = index.view(shape).transpose(0, 1).reshape(shape[1], -1)
        order = self.coupling.unit_order(name).to(self.device)
        return index[order].reshape(-1), per_unit * filter_size

    def _keep_budget(self) -> int:
        """Bytes of inverses kept between scoring and updating (the rest are rebuilt for the update, the
        same numbers at the cost of their Gram matrices once more): with G on the device, as much as G
        takes or half the memory free there, whichever is more (a primal block's F_b weighs 2c/m times
        its columns of G, so the whole set can outweigh G up to twice); with G offloaded to the host, a
        quarter of the free GPU memory."""
        if self.G is None:
            return 0
        if self._offloaded():
            return torch.cuda.mem_get_info(self.device)[0] // 4
        free = available_bytes(self.device)
        return max(self.G.numel() * self.G.element_size(), (free or 0) // 2)

    def _inverse(self, cols: torch.Tensor | None, group_size: int) -> EmpiricalFisherInverse | DiagonalFisher | None:
        kind = self.method.fisher
        if kind is None or cols is None or not self.method.builds_inverse:
            return None
        if kind == "diagonal":
            return DiagonalFisher(cols, damp=self.fisher.damp, device=self.device)
        block: int | None = None
        if self.fisher.blocks == "chunk" and not self._grouped():
            block = self.fisher.block_size
        # layer / all, and every filter/channel run: whole-layer blocks (see the module docstring)
        return EmpiricalFisherInverse(cols, block_size=block, damp=self.fisher.damp, device=self.device)

    def free_inverses(self) -> None:
        self._prepared.clear()
        self._kept_bytes, self._budget = 0, None

    def _statistic(self, i: int) -> tuple[torch.Tensor, _Prepared]:
        """The method's statistic of group ``i`` in its permuted order (per weight, or per
        filter/channel), and the group's prepared data."""
        p = self._prepare(i)
        if self._unit_criterion():
            n_units = p.w.numel() // p.group_size
            assert self.method.unit_statistic is not None  # ``_unit_criterion``
            stat = self.method.unit_statistic(weight=p.w, group_size=p.group_size,
                                              mask=p.alive.view(n_units, p.group_size).any(1), rows=p.rows,
                                              probe=self._layer_probe(self.groups[i]))
        elif self._grouped():
            n_groups = p.w.numel() // p.group_size
            alive_groups = p.alive.view(n_groups, p.group_size).any(1)
            # grouped: a method with a group version, on the empirical Fisher or kfac's (``_grouped``)
            assert isinstance(p.inverse, EmpiricalFisherInverse | KroneckerInverse | KroneckerChannels)
            assert self.method.group_statistic is not None
            if p.solved is None:
                p.solved = p.inverse.group_solve(p.w, group_size=p.group_size)
            stat = self.method.group_statistic(weight=p.w, fisher_inverse=p.inverse, group_size=p.group_size,
                                               mask=alive_groups, solved=p.solved)
        else:
            # a method without a per-weight statistic supports filters/channels only (``granularities``)
            assert self.method.statistic is not None
            stat = self.method.statistic(weight=p.w, fisher_inverse=p.inverse, mask=p.alive, grad=p.grad_mean)
        self._nan = self._nan | stat.isnan().any()
        return stat, p

    def scores(self) -> dict[str, torch.Tensor]:
        """Weight-shaped scores by layer for the shared selector: the statistic per weight; for
        filter/channel masks sqrt(statistic / g) in every weight of a group, so that the group's L2
        norm (what the selector ranks) is sqrt(statistic), and a coupled unit's (the norm over all its
        members) the square root of its statistics' sum. Already-pruned units score 0."""
        out: dict[str, torch.Tensor] = {}
        for i, group in enumerate(self.groups):
            stat, p = self._statistic(i)
            if self._grouped() or self._unit_criterion():
                flat = (stat / p.group_size).sqrt().repeat_interleave(p.group_size)
            else:
                flat = selector_scores(stat, self.granularity).reshape(-1)
            out.update(self._split(group, p.perm, flat))
        return out

    def _split(self, group: BlockGroup, perm: torch.Tensor | None, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A group's flat vector (in its possibly permuted order) back to weight-shaped tensors."""
        if perm is not None:
            out = torch.empty_like(flat)
            out[perm] = flat
            flat = out
        layers = [self.layers[n] for n in group.names]
        parts = flat.split([layer.weight.numel() for layer in layers])
        return {n: part.view_as(layer.weight) for n, layer, part in zip(group.names, layers, parts)}

    # -- the step -------------------------------------------------------------------------------
    def prune_to(self, density: float, *, scope: str, min_units: int = 0, scale: float = 1.0,
                 joint: bool = True, scores: dict[str, torch.Tensor] | None = None,
                 layer_k: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
        """Score (or use ``scores``), keep exactly n_keep(density, N) units with the shared selector,
        apply the update, zero the pruned weights and install the masks; returns the new masks.
        N:M masks keep N per group of M whatever ``density`` and ``scope`` say; the update is the
        per-weight one (joint or sum over each Fisher block's removed set), as for unstructured masks.
        ``layer_k``: a density per layer instead (exactly n_keep(layer_k[name], its units) in each)."""
        scores = self.scores() if scores is None else scores
        names = list(self.layers)
        if layer_k is not None:
            if self.coupling is not None or self.nm is not None:
                raise ValueError("per-layer densities take per-layer masks (not coupled, not N:M)")
            new = {n: select_masks([scores[n]], k=layer_k[n], granularity=self.granularity, scope="layer",
                                   check=False)[0] for n in names}
        elif self.coupling is not None:  # n_keep(density) units over all, or within each family (scope layer)
            new = self.coupling.select(scores, k=density, scope=scope)
        else:
            masks = select_masks([scores[n] for n in names], k=density, granularity=self.granularity, scope=scope,
                                 min_units=min_units, check=False, nm=self.nm)
            new = dict(zip(names, masks))
        self.compensate(new, scale=scale, joint=joint)
        return new

    def compensate(self, new_masks: dict[str, torch.Tensor], *, scale: float = 1.0, joint: bool = True) -> StepRecord:
        """Remove every alive weight that ``new_masks`` drops (a mask chosen here or by someone else)
        with the method's update, zero the pruned weights and install ``new_masks`` on the layers.
        A mask that would revive a pruned weight is refused. Returns the step's record."""
        t0 = time.perf_counter()
        missing = set(self.layers) - set(new_masks)
        if missing:
            raise ValueError(f"new masks lack layers {sorted(missing)[:3]}")
        limit_ok = self._joint_fits()
        use_joint = joint and limit_ok and self.method.compensates and self.method.joint_update(self.granularity)
        bad = torch.zeros((), dtype=torch.bool, device=self.device)  # a mask reviving a pruned weight
        singular = torch.zeros((), dtype=torch.bool, device=self.device)  # a Cholesky factorisation failed
        counts = []
        with torch.no_grad():
            for i, group in enumerate(self.groups):
                p = self._prepare(i)
                keep = torch.cat([new_masks[n].to(self.device).reshape(-1) for n in group.names])
                if p.perm is not None:
                    keep = keep[p.perm]
                bad = bad | (keep & ~p.alive).any()
                prune = p.alive & ~keep
                counts.append(torch.stack([p.alive.sum(), prune.sum()]))
                w_new = self._update(p, prune, scale=scale, joint=use_joint)
                for name, part in self._split(group, p.perm, w_new.reshape(-1)).items():
                    self.layers[name].weight.copy_(part)
                if p.inverse is not None:
                    singular = singular | p.inverse.failed()
                self._prepared.pop(i, None)  # the weights moved: this group's cache is stale
            self._kept_bytes, self._budget = 0, None
            for name, layer in self.layers.items():
                layer.mask.copy_(new_masks[name].to(layer.mask.device, torch.bool))
                layer.weight.mul_(layer.mask)
            # The one host synchronisation of the step: failure flags and the counts for the log.
            flags = torch.stack([bad, singular, self._nan]).tolist()
            totals = torch.stack(counts).sum(0).tolist()
            failed_revive, failed_cholesky, failed_nan = flags
        self._nan = torch.zeros((), dtype=torch.bool, device=self.device)
        if failed_revive:  # the caller's masks, not the data: a defect, not a run condition
            raise ValueError("the new masks revive pruned weights")
        if failed_cholesky:  # the data: one line and exit 1 from train.py, the last checkpoint kept
            raise FloatingPointError(
                f"the damped Fisher (lambda {self.fisher.damp:g}) is not positive definite in float64: the gradient "
                "rows are (nearly) collinear and so large that lambda is lost next to them, as when a model's "
                "eval-mode gradients explode (BatchNorm statistics of a barely trained source network); start from "
                "a better-trained --source-net, or raise --fisher-damp towards the rows' squared norms")
        if failed_nan:
            raise FloatingPointError("the pruning statistic is NaN (gradients with inf/nan?); increase --fisher-damp")
        alive, pruned = int(totals[0]), int(totals[1])
        if not self.method.compensates or scale == 0:
            solve = "none"
        else:
            solve = "joint" if use_joint else "sum"
        notes = []
        if joint and self.method.compensates and not self.method.joint_update(self.granularity) and scale != 0:
            notes.append(f"{self.method.name} has no joint solve: sum of single updates")
        elif joint and self.method.compensates and not limit_ok:
            notes.append(f"joint solve over {self._joint_size()} > {self.fisher.joint_limit}: sum of single updates")
        self.record = StepRecord(pruned=pruned, alive_before=alive, alive_after=alive - pruned, solve=solve,
                                 seconds=time.perf_counter() - t0 + self.record.grad_seconds,
                                 grad_seconds=self.record.grad_seconds, grads_bytes=self.record.grads_bytes,
                                 inverse_peak_bytes=self._peak_bytes, notes=notes)
        return self.record

    def _joint_size(self) -> int:
        """The largest per-block system the joint solve would factor: min(c, m) (primal c x c, dual m x m);
        kfac's: a layer's out x out (filters) or in x in (channels) factor."""
        if self.method.curvature is not None:
            side = 0 if self.granularity == "filter" else 1
            return max((layer.weight.shape[0], layer.weight[0].numel())[side] for layer in self.layers.values())
        widest = max(g.size for g in self.groups)
        c = self.fisher.block_size if (self.fisher.blocks == "chunk" and not self._grouped()) else widest
        return min(c, widest, self.fisher.m)

    def _joint_fits(self) -> bool:
        return self._joint_size() <= self.fisher.joint_limit

    def _update(self, p: _Prepared, prune: torch.Tensor, *, scale: float, joint: bool) -> torch.Tensor:
        if self._grouped():
            n_groups = p.w.numel() // p.group_size
            assert self.method.group_update is not None  # a method with a group version (``_grouped``)
            return self.method.group_update(weight=p.w, fisher_inverse=p.inverse, group_size=p.group_size,
                                            prune=prune.view(n_groups, p.group_size).any(1),
                                            mask=p.alive.view(n_groups, p.group_size).any(1),
                                            scale_prune_update=scale, joint=joint, solved=p.solved)
        return self.method.update(weight=p.w, fisher_inverse=p.inverse, prune=prune, mask=p.alive,
                                  scale_prune_update=scale, grad=p.grad_mean, joint=joint)

    def release(self) -> None:
        """Drop G and every cached inverse."""
        self.G = None
        self.probes = None
        self.curvatures = None
        self.free_inverses()


__all__: Sequence[str] = ("BlockGroup", "FisherSettings", "OBSSolver", "StepRecord", "collect_rows")
