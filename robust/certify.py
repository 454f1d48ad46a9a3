"""Certified L2 robustness of the Gaussian-smoothed classifier: CERTIFY of Cohen et al. (2019).

g(x) = argmax_c P(f(x + d) = c), d ~ N(0, sigma^2 I). For one input:
1. the top class cA is the most frequent prediction of f on N0 noisy copies;
2. on N fresh copies, nA of the predictions are cA; pA_lower is the one-sided (1 - alpha)
   Clopper-Pearson lower bound of P(f(x + d) = cA), i.e. the alpha quantile of Beta(nA, N - nA + 1)
   (HYDRA's ``proportion_confint(nA, N, alpha=2 * alpha, method="beta")[0]``);
3. if pA_lower < 1/2 it abstains; else g(x) = cA within the L2 radius sigma * Phi^-1(pA_lower),
   with probability at least 1 - alpha over the noise.
The certified accuracy at radius r is the fraction of inputs with g(x) = y and radius >= r.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import torch
from scipy.stats import beta as beta_distribution
from torch import nn

ABSTAIN = -1


def lower_confidence_bound(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound of a Bernoulli proportion."""
    if successes <= 0:
        return 0.0
    return float(beta_distribution.ppf(alpha, successes, trials - successes + 1))


def radius(p_lower: float, sigma: float) -> float:
    """sigma * Phi^-1(p_lower): the certified L2 radius (0 at p_lower = 1/2)."""
    return sigma * NormalDist().inv_cdf(p_lower)


@dataclass(frozen=True)
class Certificate:
    prediction: int  # ABSTAIN, or the smoothed classifier's class
    radius: float    # 0.0 when it abstains


@torch.no_grad()
def _counts(model: nn.Module, x: torch.Tensor, *, num: int, sigma: float, batch: int, num_classes: int,
            generator: torch.Generator | None) -> torch.Tensor:
    """How often f predicts each class on ``num`` noisy copies of the single input ``x`` (C x H x W)."""
    counts = torch.zeros(num_classes, dtype=torch.long, device=x.device)
    left = num
    while left > 0:
        n = min(batch, left)
        left -= n
        noisy = x.unsqueeze(0).expand(n, *x.shape)
        noisy = noisy + sigma * torch.randn(noisy.shape, generator=generator, device=x.device, dtype=x.dtype)
        counts += torch.bincount(model(noisy).argmax(1), minlength=num_classes)
    return counts


def certify(model: nn.Module, x: torch.Tensor, *, sigma: float, n0: int, n: int, alpha: float, batch: int,
            num_classes: int, generator: torch.Generator | None = None) -> Certificate:
    """CERTIFY (module docstring) for one input ``x`` (C x H x W); the model runs as it is (call
    ``model.eval()`` first for a deterministic base classifier)."""
    def counts(num: int) -> torch.Tensor:
        return _counts(model, x, num=num, sigma=sigma, batch=batch, num_classes=num_classes, generator=generator)

    top = int(counts(n0).argmax())
    n_top = int(counts(n)[top])
    p_lower = lower_confidence_bound(n_top, n, alpha)
    if p_lower < 0.5:
        return Certificate(ABSTAIN, 0.0)
    return Certificate(top, radius(p_lower, sigma))


def certified_accuracy(certificates: list[Certificate], labels: list[int], radii: tuple[float, ...]) -> list[float]:
    """Percent of inputs certified correct at each radius: g(x) = y and radius >= r."""
    total = max(len(labels), 1)
    return [100.0 * sum(c.prediction == y and c.radius >= r for c, y in zip(certificates, labels)) / total
            for r in radii]
