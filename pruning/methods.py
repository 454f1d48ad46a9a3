"""Prune methods (``--prune-method``): one registry entry per criterion, each a statistic and an update.

| method          | curvature | statistic                                   | update                       |
|-----------------|-----------|---------------------------------------------|------------------------------|
| woodfisher      | empirical | w^2 / [F^-1]_qq (group: w_Q^T [F^-1]_QQ^-1 w_Q) | OBS: -F^-1 s (joint or sum)  |
| woodtaylor      | empirical | (w - F^-1 g)^2 / [F^-1]_qq                  | -F^-1 (g + s)                |
| diagfisher      | diagonal  | w^2 F_qq (group: summed)                    | none (pruned weights zeroed) |
| magnitude       | none      | |w| per layer (group: L2 norm)              | none                         |
| globalmagnitude | none      | |w| over all layers                         | none                         |
| l1              | none      | filter/channel L1 norm sum |w|, per layer   | none                         |
| random          | none      | uniform random, per layer                   | none                         |
| fpgm            | none      | filter/channel: sum of L2 distances to the  | none                         |
|                 |           | layer's other alive units, per layer        |                              |
| taylorfo        | rows      | filter/channel: mean_r (g_r,U . w_U)^2,     | none                         |
|                 |           | per layer                                   |                              |
| apoz            | none      | filter: 1 - APoZ, the fraction of non-zero  | none                         |
|                 |           | post-ReLU outputs on calibration samples,   |                              |
|                 |           | per layer                                   |                              |
| meanact         | none      | filter: mean post-ReLU output on            | none                         |
|                 |           | calibration samples, per layer              |                              |
| slimming        | none      | filter: |gamma| of the following BatchNorm, | none                         |
|                 |           | over all layers                             |                              |
| naivehess       | hessian   | w^2 H_qq (OBD; exact Hessian diagonal by    | none                         |
|                 |           | double backprop, or Hutchinson's estimate   |                              |
|                 |           | with --hessian-probes), signed, per layer   |                              |
| kfac            | kfac      | w^2 / [F^-1]_qq, F^-1 = G~^-1 (x) A~^-1 per | OBS: -F^-1 s (sum; joint for |
|                 |           | layer (blockwise K-FAC; group: w_Q^T        | filters/channels)            |
|                 |           | [F^-1]_QQ^-1 w_Q in closed form)            |                              |

A new criterion is one ``PRUNE_METHODS.add(PruneMethod(...))`` with functions of the signatures in
``pruning.obs``; the OBS solver and every trainer then offer it. A criterion that scores whole units and is
not a sum over their weights (fpgm, taylorfo) gives a ``unit_statistic`` and no per-weight ``statistic``;
one that reads the model itself (apoz, meanact, slimming) names what it reads in ``probe``
(``pruning.activations``), which the solver hands its unit statistic per layer. A second-order criterion
with a curvature of its own per layer (naivehess: ``pruning.hessian``; kfac: ``pruning.kfac``) gives its
reader in ``curvature`` (``probe="curvature"``): the solver reads it on the Fisher's calibration samples and
hands each layer's curvature to the per-weight statistic and update as ``fisher_inverse``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from configs.choices import GRANULARITIES
from configs.registry import Registry
from layers.masked import MaskedLayer
from layers.selector import STRUCTURED, select_masks
from pruning.hessian import read_hessian_diagonal
from pruning.kfac import read_kfac
from pruning.obs import (
    LayerCurvature,
    apoz_statistic,
    diagonal_fisher_statistic,
    diagonal_fisher_update,
    fpgm_statistic,
    group_obs_statistic,
    group_obs_update,
    l1_statistic,
    magnitude_ranking,
    magnitude_statistic,
    meanact_statistic,
    naivehess_statistic,
    obs_statistic,
    obs_update,
    random_statistic,
    slimming_statistic,
    taylorfo_statistic,
    woodtaylor_statistic,
    woodtaylor_update,
    zero_update,
)


@dataclass(frozen=True)
class PruneMethod:
    """One pruning criterion.

    fisher: which curvature it needs: ``empirical`` (the block inverse of the damped empirical
        Fisher), ``diagonal`` (its diagonal), ``rows`` (the m gradient rows themselves, G's columns per
        layer, and no inverse is built) or ``None`` (no gradients are collected).
    statistic / update: per-weight functions with the signature of ``pruning.obs`` (weight,
        fisher_inverse, mask, grad / prune, scale_prune_update, joint); ``statistic`` is ``None`` for a
        criterion that only scores units (``structured_only`` with a ``unit_statistic``).
    group_statistic / group_update: per-group versions for filter/channel masks (group OBS).
    unit_statistic: one score per filter/channel from the unit's weights (weight, group_size, mask, rows;
        ``pruning.obs.fpgm_statistic``) with no Fisher inverse, for criteria that do not add up over a
        unit's weights; the update is the per-weight ``update`` on the unit's weights (it only zeroes).
    additive: the per-weight statistic adds up over a group (a group is scored by the sum), so
        filter/channel masks work without a group version and the update only zeroes.
    scope: a fixed selection scope, or ``None``: global or per layer as the run asks.
    needs_grad_mean: the statistic and update take the mean gradient (WoodTaylor).
    default_damp: lambda when --fisher-damp is not given.
    probe: what a unit statistic reads off the model (``pruning.activations``), or ``None``: ``activations``
        (per-filter counts of its post-ReLU outputs on the Fisher's calibration samples) or ``batchnorm``
        (the gamma of the BatchNorm after each layer); handed over as ``probe=``.
    only: the granularities the criterion defines, when fewer than its statistic allows (filters only, for
        the criteria that read a filter's output).
    curvature: with ``probe="curvature"``, the reader of a per-layer curvature off the model on the
        calibration samples, ``(model, layers, batches, *, samples, device, damp, criterion) -> {layer:
        LayerCurvature}`` (naivehess's Hessian diagonal, kfac's Kronecker inverse); the solver hands each
        layer's to ``statistic`` and ``update`` as ``fisher_inverse``.
    moves_weights: the update moves surviving weights with a curvature that is not the empirical Fisher
        (kfac's OBS update).
    sum_only: the granularities whose update is always the sum of single updates, with no exact joint solve
        for a set pruned at once (kfac's single weights: [F^-1]_QQ of any set Q has no Kronecker structure;
        its filters and channels have one).
    """

    name: str
    fisher: str | None
    statistic: Callable[..., torch.Tensor] | None
    update: Callable[..., torch.Tensor]
    group_statistic: Callable[..., torch.Tensor] | None = None
    group_update: Callable[..., torch.Tensor] | None = None
    unit_statistic: Callable[..., torch.Tensor] | None = None
    additive: bool = False
    scope: str | None = None
    needs_grad_mean: bool = False
    default_damp: float = 1e-5
    structured_only: bool = False  # defined for filters/channels only (a unit criterion)
    probe: str | None = None
    only: tuple[str, ...] | None = None
    curvature: Callable[..., Mapping[str, LayerCurvature]] | None = None
    moves_weights: bool = False
    sum_only: tuple[str, ...] = ()
    help: str = ""

    @property
    def granularities(self) -> tuple[str, ...]:
        """Every method ranks single weights, hence unstructured and N:M masks (a per-group top-N of
        the per-weight statistic); filters/channels need a group version, a unit statistic or an additive
        statistic; a ``structured_only`` criterion scores filters/channels and nothing else."""
        grouped = self.group_statistic is not None or self.unit_statistic is not None or self.additive
        if self.only is not None:
            return tuple(g for g in GRANULARITIES if g in self.only)
        if self.structured_only:
            return tuple(g for g in GRANULARITIES if g in STRUCTURED)
        return tuple(g for g in GRANULARITIES if grouped or g not in STRUCTURED)

    def damp(self, given: float | None) -> float:
        """lambda: --fisher-damp when given, else this method's default."""
        return given if given is not None else self.default_damp

    def joint_update(self, granularity: str) -> bool:
        """Whether the update has the exact joint solve for a set of ``granularity`` units pruned at once."""
        return granularity not in self.sum_only

    @property
    def builds_inverse(self) -> bool:
        """Whether the solver builds a Fisher inverse (``rows`` only hands the statistic G's columns)."""
        return self.fisher in ("empirical", "diagonal")

    @property
    def compensates(self) -> bool:
        """Whether the update moves surviving weights (an empirical-Fisher OBS update, or kfac's)."""
        return self.fisher == "empirical" or self.moves_weights

    @property
    def reads_samples(self) -> bool:
        """Whether ``probe`` reads the model on calibration samples (activations, or a curvature)."""
        return self.probe in ("activations", "curvature")


PRUNE_METHODS: Registry[PruneMethod] = Registry("prune method", flag="--prune-method")


def register_prune_method(method: PruneMethod) -> PruneMethod:
    return PRUNE_METHODS.add(method.name, method)


# The OBS criterion, also the one of every step that compensates a mask chosen elsewhere (--obs-update).
OBS_METHOD = register_prune_method(PruneMethod(
    "woodfisher", "empirical", obs_statistic, obs_update, group_obs_statistic, group_obs_update,
    help="OBS statistic w^2/[F^-1]_qq and update -F^-1 s (group OBS for filters/channels)"))
# WoodTaylor applies the Newton step -F^-1 g at every event. g is the mean of the m gradient rows, so
# it lies in their span, but along the rows' small singular directions F^-1 g grows like 1/lambda:
# with a small lambda the step leaves the region where the quadratic model holds. Measured on the
# Digits config (90 % sparsity, m = 64) when this default was chosen: lambda 1e-5 -> 12 % test top-1
# (chance), 0.01 -> 49 %, 0.1 (the public code's MNIST sweep, with m = 8000) -> 61 %, 1 -> 97.8 %;
# with the batched gradients and joint solve of today, 1e-5 -> 20.3 % and 1 -> 97.2 % (README).
# Hence its own default.
register_prune_method(PruneMethod(
    "woodtaylor", "empirical", woodtaylor_statistic, woodtaylor_update, needs_grad_mean=True, default_damp=1.0,
    help="OBS with the first-order term: (w - F^-1 g)^2/[F^-1]_qq, update -F^-1 (g + s)"))
register_prune_method(PruneMethod(
    "diagfisher", "diagonal", diagonal_fisher_statistic, diagonal_fisher_update, additive=True,
    help="w^2 F_qq (diagonal Fisher), no compensation"))
register_prune_method(PruneMethod(
    "magnitude", None, magnitude_statistic, zero_update, additive=True, scope="layer",
    help="|w| per layer (same sparsity in every layer)"))
register_prune_method(PruneMethod(
    "globalmagnitude", None, magnitude_statistic, zero_update, additive=True, scope="global",
    help="|w| over all layers at once"))
# Li, Kadav, Durdanovic, Samet & Graf, "Pruning Filters for Efficient ConvNets" (ICLR 2017): a filter ranks by
# the sum of its absolute weights, the same fraction pruned in every layer (Distiller's
# L1RankedStructureParameterPruner; NNI's L1NormPruner). Distiller ranks by the mean |w|, the same order
# within a layer. Single weights by |w| are the magnitude criterion: refused here rather than duplicated.
register_prune_method(PruneMethod(
    "l1", None, l1_statistic, zero_update, additive=True, scope="layer", structured_only=True,
    help="filters/channels by their L1 norm, per layer (Li et al. 2017)"))
# The random baseline of every pruning paper (NNI's RandomPruner): the same fraction in every layer, so units
# of one size compete (a sum of uniforms over equal-size units is a uniformly random order).
register_prune_method(PruneMethod(
    "random", None, random_statistic, zero_update, additive=True, scope="layer",
    help="uniformly random weights/filters/channels, per layer (the baseline)"))
# He, Liu, Wang, Hu & Yang, "Filter Pruning via Geometric Median for Deep Convolutional Neural Networks
# Acceleration" (CVPR 2019; NNI's FPGMPruner): a filter near the geometric median of its layer's filters (the
# smallest sum of distances to the others) is the one the others can best replace, whatever its norm, so it goes
# first; the same fraction in every layer, as the paper prunes. A distance sum does not add up over weights:
# a unit statistic, which needs no gradients.
register_prune_method(PruneMethod(
    "fpgm", None, None, zero_update, unit_statistic=fpgm_statistic, scope="layer", structured_only=True,
    help="filters/channels nearest their layer's geometric median, per layer (He et al. 2019)"))
# Molchanov, Mallya, Tyree, Frosio & Kautz, "Importance Estimation for Neural Network Pruning" (CVPR 2019), the
# "FO on weights" criterion: a unit's first-order loss change per mini-batch squared, (sum_q g_q w_q)^2, averaged
# over mini-batches. It reads the Fisher's m gradient rows (one per --fisher-mini-bsz samples) but builds no
# inverse, and moves no surviving weight. Per layer, like l1 and fpgm (the paper ranks all units of the network
# at once): the squared first-order terms are not on one scale across layers of different widths.
register_prune_method(PruneMethod(
    "taylorfo", "rows", None, zero_update, unit_statistic=taylorfo_statistic, scope="layer", structured_only=True,
    help="filters/channels by first-order Taylor importance mean (g.w)^2 over the gradient rows, per layer "
         "(Molchanov et al. 2019)"))

# Hu, Peng, Tai & Tang, "Network Trimming: A Data-Driven Neuron Pruning Approach towards Efficient Deep
# Architectures" (2016; NNI's ActivationAPoZRankFilterPruner): a filter whose ReLU outputs are mostly zero
# passes little on, so the highest Average Percentage of Zeros goes first. Its activations are measured on the
# Fisher's calibration samples (--fisher-subsample-size x --fisher-mini-bsz, the same stream), with no
# gradients. Filters only: a channel's "output" is not an activation of its own. Per layer, as the paper
# trims layer by layer (and NNI prunes).
register_prune_method(PruneMethod(
    "apoz", None, None, zero_update, unit_statistic=apoz_statistic, scope="layer", structured_only=True,
    probe="activations", only=("filter",),
    help="filters with the most zero post-ReLU outputs (APoZ) on calibration samples, per layer (Hu et al. 2016)"))
# The mean-activation baseline of Molchanov, Tyree, Karras, Aila & Kautz, "Pruning Convolutional Neural Networks
# for Resource Efficient Inference" (ICLR 2017; NNI's ActivationMeanRankFilterPruner): the same activations,
# ranked by their mean; per layer, as NNI prunes (mean activations are not on one scale across layers).
register_prune_method(PruneMethod(
    "meanact", None, None, zero_update, unit_statistic=meanact_statistic, scope="layer", structured_only=True,
    probe="activations", only=("filter",),
    help="filters with the smallest mean post-ReLU output on calibration samples, per layer (Molchanov et al. "
         "2017)"))
# Liu, Li, Shen, Huang, Yan & Zhang, "Learning Efficient Convolutional Networks through Network Slimming" (ICCV
# 2017): the BatchNorm after a conv scales each normalised filter by gamma, which training with an L1 penalty on
# gamma (--bn-l1) drives towards 0 for the filters the network can do without. The paper sets one threshold over
# the whole network (gammas are on one scale: every BatchNorm's input is normalised), hence global.
register_prune_method(PruneMethod(
    "slimming", None, None, zero_update, unit_statistic=slimming_statistic, scope="global", structured_only=True,
    probe="batchnorm", only=("filter",),
    help="filters by |gamma| of the BatchNorm that follows them, over all layers (Liu et al. 2017; train with "
         "--bn-l1)"))

# WoodFisher's own second-order baselines (its README's `naivehess` and `kfac`; pruners/naivehess.py and
# pruners/kfac.py of IST-DASLab/WoodFisher). naivehess: Optimal Brain Damage (LeCun, Denker & Solla, NeurIPS
# 1990) with the exact Hessian diagonal by double backprop on the Fisher's calibration samples (one backward
# pass per alive weight: small models only), no weight update, per layer as the reference prunes (its signed
# statistic is shifted per layer, which only orders weights within one layer). Additive: a filter/channel
# ranks by the sum of its weights' w^2 H_qq, OBD's diagonal estimate for removing the unit.
register_prune_method(PruneMethod(
    "naivehess", None, naivehess_statistic, zero_update, additive=True, scope="layer", probe="curvature",
    curvature=read_hessian_diagonal,
    help="OBD w^2 H_qq with the exact Hessian diagonal by double backprop on the calibration samples, per layer "
         "(WoodFisher's naivehess; one backward pass per weight: small models only; --hessian-probes P: "
         "Hutchinson's estimate, P Hessian-vector products)"))
# K-FAC (Martens & Grosse 2015; Grosse & Martens 2016 for convs), blockwise per layer, in the OBS statistic and
# the summed OBS update as WoodFisher's KFACFisherPruner uses it; lambda is split as sqrt(lambda) on each factor.
# Filters and channels: group OBS in closed form ([F^-1]_QQ of a filter is [G~^-1]_ii A~^-1, of a channel
# G~^-1 (x) [A~^-1]_JJ), with the joint update; single weights take the summed update.
register_prune_method(PruneMethod(
    "kfac", None, obs_statistic, obs_update, group_obs_statistic, group_obs_update, probe="curvature",
    curvature=read_kfac, moves_weights=True, sum_only=("unstructured", "nm"),
    help="OBS w^2/[F^-1]_qq (group OBS for filters/channels) with a blockwise K-FAC Fisher per layer, "
         "F^-1 = (G + sqrt(lambda) I)^-1 (x) (A + sqrt(lambda) I)^-1 (WoodFisher's kfac); the summed OBS update "
         "for single weights, the joint one for filters/channels"))


def selector_scores(statistic: torch.Tensor, granularity: str) -> torch.Tensor:
    """An additive per-weight statistic as the shared selector ranks it: as it is for single weights;
    its square root for filters/channels, whose score is the L2 norm of their weights' scores, so
    that a unit ranks by the sum of its statistic."""
    return statistic.sqrt() if granularity in STRUCTURED else statistic


def magnitude_masks(layers: Mapping[str, MaskedLayer], *, k: float, granularity: str, scope: str,
                    min_units: int = 0, nm: tuple[int, int] | None = None,
                    alive_only: bool = False) -> dict[str, torch.Tensor]:
    """The masks of the magnitude criterion (``magnitude``/``globalmagnitude``) at density ``k``, from the
    shared selector: weights rank by |w| (``pruning.obs.magnitude_ranking``), filters/channels by their
    weights' L2 norm. Every weight is a candidate (HYDRA's magnitude baseline), or with ``alive_only``
    the weights the current masks keep: pruned ones rank below every survivor, so the selection only
    removes (IMP's rounds)."""
    with torch.no_grad():
        scores = [magnitude_ranking(weight=layer.weight.detach(), mask=layer.mask if alive_only else None)
                  for layer in layers.values()]
        masks = select_masks(scores, k=k, granularity=granularity, scope=scope, min_units=min_units, nm=nm)
    return dict(zip(layers, masks))


def granularity_note() -> str:
    """Which --layer-type each --prune-method supports (for errors and docs)."""
    return "; ".join(f"{m.name}: {', '.join(m.granularities)}" for m in PRUNE_METHODS.values())
