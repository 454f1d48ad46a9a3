"""Projected gradient descent (PGD) in an L-inf or L2 ball, intersected with the pixel range.

One attack serves every use: training with PGD (Madry et al.: maximise the cross-entropy, random
start in the ball), TRADES (maximise the KL divergence to the clean prediction, start at
x + 0.001 N(0, 1)) and the robust evaluation (--val-method adv).

Two choices, and why:
- **Gradients w.r.t. the input only.** Each step takes ``torch.autograd.grad(loss, x_adv)``: the
  autograd engine then runs only the part of the graph between the loss and the input, so no weight
  or score gradient is computed (a convolution's backward skips its weight gradient when nothing
  asks for it) and no ``.grad`` of the model is touched. The mask is the model's current one: the
  forward passes are the model's own (a MaskSet re-selects from the current scores before each).
- **Eval mode while generating** (``eval_mode``): BatchNorm uses its running statistics and
  dropout is off, and the previous mode of every module is restored afterwards. This is what
  HYDRA's ``trades_loss`` does (``model.eval()`` around the attack, as TRADES' reference code). It
  keeps the attack's extra forward passes from moving BatchNorm's running statistics (a PGD-10
  step would otherwise update them eleven times per batch, ten of them on half-made examples), and
  makes each example's attack independent of the rest of the batch.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

STARTS = ("ball", "gauss", "none")  # uniform in the ball (PGD), x + 0.001 N(0, 1) (TRADES), x itself
TRADES_START_STD = 0.001


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode within the block; each one's own mode restored after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, *, epsilon: float, distance: str, clip_min: float,
            clip_max: float) -> torch.Tensor:
    """The point of (ball of radius ``epsilon`` around ``x``) and [clip_min, clip_max] nearest ``x_adv``
    for linf; for l2, the radial projection onto the ball then the clip. Clipping after the ball keeps
    the point in the ball: ``x`` is in the box, so clipping moves every coordinate towards it."""
    delta = x_adv - x
    if distance == "linf":
        delta = delta.clamp(-epsilon, epsilon)
    else:
        norm = _per_sample_norm(delta)
        delta = delta * (epsilon / norm.clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(clip_min, clip_max)


def random_start(x: torch.Tensor, *, start: str, epsilon: float, distance: str, clip_min: float, clip_max: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    if start == "none" or epsilon == 0:
        return x.clone()
    if start == "gauss":
        noise = TRADES_START_STD * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif distance == "linf":
        noise = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * epsilon
    else:  # uniform in the L2 ball: a uniform direction, radius eps * U^(1/d)
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / _per_sample_norm(direction).clamp_min(1e-12)
        d = x[0].numel()
        u = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
        noise = direction * (epsilon * u.pow(1.0 / d)).view(-1, *([1] * (x.dim() - 1)))
    return project(x + noise, x, epsilon=epsilon, distance=distance, clip_min=clip_min, clip_max=clip_max)


def cross_entropy_loss(y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The attack loss of PGD: the summed cross-entropy (a sum, so each sample's gradient is its own)."""
    return lambda logits: F.cross_entropy(logits, y, reduction="sum")


def kl_loss(clean_probs: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """TRADES' attack loss: KL(clean || adversarial) summed over the batch, as nn.KLDivLoss(sum)."""
    return lambda logits: F.kl_div(F.log_softmax(logits, dim=1), clean_probs, reduction="sum")


def pgd(model: nn.Module, x: torch.Tensor, *, loss: Callable[[torch.Tensor], torch.Tensor], epsilon: float,
        step_size: float, num_steps: int, distance: str, clip_min: float, clip_max: float, start: str = "ball",
        generator: torch.Generator | None = None) -> torch.Tensor:
    """``num_steps`` steps of projected gradient ascent of ``loss(model(x_adv))`` from ``start``;
    returns the detached adversarial batch, inside the ball around ``x`` and the pixel range.

    linf: x_adv += step_size * sign(g); l2: x_adv += step_size * g / ||g|| (per sample; a zero
    gradient leaves the sample where it is). The model runs in eval mode (see the module docstring).
    """
    if distance not in ("linf", "l2"):
        raise ValueError(f"distance must be linf or l2, got {distance!r}")
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    x = x.detach()
    x_adv = random_start(x, start=start, epsilon=epsilon, distance=distance, clip_min=clip_min, clip_max=clip_max,
                         generator=generator)
    if epsilon == 0:
        return x_adv
    with eval_mode(model), torch.enable_grad():
        for _ in range(num_steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(loss(model(x_adv)), x_adv)
            with torch.no_grad():
                if distance == "linf":
                    step = grad.sign()
                else:
                    step = grad / _per_sample_norm(grad).clamp_min(1e-12)
                x_adv = project(x_adv.detach() + step_size * step, x, epsilon=epsilon, distance=distance,
                                clip_min=clip_min, clip_max=clip_max)
    return x_adv.detach()
