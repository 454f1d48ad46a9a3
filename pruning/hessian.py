"""The exact diagonal of the loss Hessian of each masked layer's weights, by double backpropagation
(``--prune-method naivehess``: WoodFisher's ``NaiveHessianPruner``, pruners/naivehess.py of
IST-DASLab/WoodFisher).

The loss is the mean cross-entropy over the calibration samples (the Fisher's sample stream, the first
``--fisher-subsample-size`` x ``--fisher-mini-bsz`` samples of it), the model in eval mode, as the reference
does (it sums the loss over the subset's batches and divides by the subset size). One backward pass with
``create_graph=True`` gives the gradient g(w) as a differentiable function of the weights; then, for every
alive weight q of a layer, one more backward pass of the scalar g_q gives row q of the Hessian, of which
H_qq is kept. This is exact (up to round-off), not an estimate (no Hutchinson probing): the reference loops
over every coordinate with a basis vector in the same way. What that costs: one backward pass through the
whole graph per alive weight, so an event costs (alive weights) x (one backward over all calibration
samples), and the graph of all calibration samples is held during it. That is fine for small layers and
small models and hours for a CIFAR/ImageNet network (the reference's README calls it "naive"). Pruned
weights are skipped (their H_qq is 0: a masked layer computes with weight * mask), which the reference does
not do.

``HessianDiagonal`` hands H_qq to the statistic (``pruning.obs.naivehess_statistic``) through the curvature
interface of ``pruning.obs`` (``fisher_diag()``); it has no inverse and no product: naivehess moves no
surviving weight, as the reference's pruner only masks.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from layers.masked import MaskedLayer


def take_samples(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], samples: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``samples`` (inputs, labels) of ``batches``, on ``device``; a stream that ends early is an error."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    done = 0
    for x, y in batches:
        x, y = x[: samples - done], y[: samples - done]
        xs.append(x.to(device))
        ys.append(y.to(device))
        done += len(y)
        if done >= samples:
            break
    if done < samples:
        raise ValueError(f"the batch stream ended after {done} samples; {samples} are needed for the curvature")
    return torch.cat(xs), torch.cat(ys)


class PlainForward:
    """Within: every masked layer computes with weight * mask (no straight-through path: its score gradient
    would not be a second derivative of anything), its weight requires grad, the model is in eval mode
    (BatchNorm with its running statistics, not updated); everything restored on exit."""

    def __init__(self, model: nn.Module, layers: Mapping[str, MaskedLayer]) -> None:
        self.model, self.layers = model, list(layers.values())

    def __enter__(self) -> PlainForward:
        self.was_training = self.model.training
        self.flags = [(layer.score_grad, layer.weight.requires_grad) for layer in self.layers]
        for layer in self.layers:
            layer.score_grad = False
            layer.weight.requires_grad_(True)
        self.model.eval()
        return self

    def __exit__(self, *exc: object) -> None:
        for layer, (score_grad, requires) in zip(self.layers, self.flags):
            layer.score_grad = score_grad
            layer.weight.requires_grad_(requires)
        self.model.train(self.was_training)


def hessian_diagonal(model: nn.Module, layers: Mapping[str, MaskedLayer],
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, samples: int,
                     device: torch.device, probes: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """H_qq, weight-shaped by layer: the diagonal of the Hessian of the mean cross-entropy over the first
    ``samples`` samples of ``batches`` with respect to each layer's weight (see the module docstring); 0 at
    pruned weights. Exact with ``probes=0`` (one backward pass per alive weight); else Hutchinson's estimate
    with that many probes (``rademacher_probes``, drawn from ``seed``)."""
    x, y = take_samples(batches, samples, device)
    weights = [layer.weight for layer in layers.values()]
    out = {name: torch.zeros_like(layer.weight, dtype=layer.weight.dtype).detach() for name, layer in layers.items()}
    with PlainForward(model, layers), torch.enable_grad():
        logits = model(x.to(weights[0].dtype) if x.is_floating_point() else x)
        loss = F.cross_entropy(logits, y)
        grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
        # a layer whose gradient is None or constant: the loss is linear in its weight (or does not read it)
        curved = [(name, layer, g) for (name, layer), g in zip(layers.items(), grads)
                  if g is not None and g.requires_grad]
        if probes:
            _hutchinson(curved, out, probes=probes, generator=torch.Generator().manual_seed(seed))
            return out
        for name, layer, g in curved:
            flat, diag = g.reshape(-1), out[name].view(-1)
            for q in layer.mask.reshape(-1).nonzero().flatten().tolist():
                row = torch.autograd.grad(flat[q], layer.weight, retain_graph=True, allow_unused=True)[0]
                if row is not None:
                    diag[q] = row.reshape(-1)[q].detach()
    return out


def rademacher_probes(layers: Iterable[MaskedLayer], *, generator: torch.Generator) -> list[torch.Tensor]:
    """One Hutchinson probe: +-1 with equal odds at every alive weight of each layer, 0 at pruned ones (so the
    estimate is 0 there, as the exact diagonal is). Drawn on the CPU, layer by layer, so that a seed gives
    the same probes on every device."""
    return [(torch.randint(0, 2, layer.weight.shape, generator=generator).mul_(2).sub_(1)
             .to(device=layer.weight.device, dtype=layer.weight.dtype) * layer.mask) for layer in layers]


def _hutchinson(curved: list[tuple[str, MaskedLayer, torch.Tensor]], out: dict[str, torch.Tensor], *, probes: int,
                generator: torch.Generator) -> None:
    """out[name] = mean over ``probes`` Rademacher z of z * (H z), H the Hessian of every curved layer's weights
    jointly (E[z z^T] = I, so the mean is unbiased for diag(H); its variance is sum_j!=q H_qj^2 per probe). One
    Hessian-vector product, a backward pass of g . z through the gradient's graph, per probe."""
    grads = [g for _, _, g in curved]
    weights = [layer.weight for _, layer, _ in curved]
    for i in range(probes):
        z = rademacher_probes([layer for _, layer, _ in curved], generator=generator)
        hz = torch.autograd.grad(grads, weights, grad_outputs=z, retain_graph=i < probes - 1, allow_unused=True)
        for (name, _, _), zl, hl in zip(curved, z, hz):
            if hl is not None:
                out[name].add_(zl * hl.detach())
    for name, _, _ in curved:
        out[name].div_(probes)


class HessianDiagonal:
    """One layer's H_qq (flattened, in the solver's order) behind the curvature interface of ``pruning.obs``:
    ``fisher_diag()`` is the curvature's diagonal; there is no inverse (naivehess only zeroes)."""

    def __init__(self, diag: torch.Tensor) -> None:
        self.h = diag.reshape(-1)

    def fisher_diag(self) -> torch.Tensor:
        return self.h

    def diag(self) -> torch.Tensor:
        raise ValueError("the Hessian diagonal has no inverse diagonal (H_qq may be <= 0): naivehess only zeroes")

    def mul(self, v: torch.Tensor) -> torch.Tensor:
        raise ValueError("the Hessian diagonal has no inverse product: naivehess only zeroes")

    def solve_pruned(self, t: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
        raise ValueError("the Hessian diagonal has no joint solve: naivehess only zeroes")

    pruned_mul = solve_pruned  # the joint move needs the same solve: refused alike

    def permuted(self, perm: torch.Tensor) -> HessianDiagonal:
        return HessianDiagonal(self.h[perm.to(self.h.device)])

    def kept_memory_bytes(self) -> int:
        return self.h.numel() * self.h.element_size()

    def peak_memory_bytes(self) -> int:
        return self.kept_memory_bytes()

    def failed(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.bool, device=self.h.device)


def read_hessian_diagonal(model: nn.Module, layers: Mapping[str, MaskedLayer],
                          batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, samples: int, device: torch.device,
                          damp: float, criterion: str, probes: int = 0) -> dict[str, HessianDiagonal]:
    """The curvature reader of ``naivehess`` (``PruneMethod.curvature``): each layer's ``HessianDiagonal``, exact,
    or with ``probes`` > 0 (--hessian-probes) Hutchinson's estimate from probes of seed 0 (the calibration samples
    already follow the run's seed and event). ``damp`` and ``criterion`` are accepted for the readers' common
    signature and not used."""
    return {name: HessianDiagonal(h) for name, h in
            hessian_diagonal(model, layers, batches, samples=samples, device=device, probes=probes).items()}
