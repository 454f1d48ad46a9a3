"""Step-time ratios against a dense training step, measured in one process.

    python bench/bench_step.py [--arch resnet18] [--batch-size 64] [--steps 5] [--device auto]

Rows (median over --steps after one warm-up step; each a ratio to the dense SGD step):
- dense:        plain model, forward + backward + SGD step on the weights
- prune (ours): HYDRA prune step, global unstructured k=0.05, scores trained, weights frozen
- bilevel (ours): one BiP iteration (lower weight step + upper score step with the implicit term)
- prune (public-code algorithm): the same step when, as in the public BiP code, every forward
  concatenates and fully sorts all scores to build the global mask (re-implemented here)
- selector alone vs a full sort of all scores
Targets (issue 2): prune <= 1.15x dense, bilevel <= 2.3x dense.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from layers import MaskSet, masked_layers, n_keep, select_masks, to_masked  # noqa: E402
from models import build_model  # noqa: E402
from trainers.base import BaseTrainer, OptimSettings  # noqa: E402
from trainers.bilevel import BilevelTrainer  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, steps: int, device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class SortEveryForward:
    """The public BiP code's global mask: concatenate all |scores|, full sort, threshold, every forward."""

    def __init__(self, model: nn.Module, k: float) -> None:
        self.layers = list(masked_layers(model).values())
        self.k = k
        model.register_forward_pre_hook(self._before_forward)

    def _before_forward(self, module, args) -> None:
        with torch.no_grad():
            flat = torch.cat([l.popup_scores.abs().flatten() for l in self.layers])
            _, idx = flat.sort()
            j = int((1 - self.k) * flat.numel())
            out = torch.zeros_like(flat)
            out[idx[j:]] = 1
            for layer, m in zip(self.layers, out.split([l.weight.numel() for l in self.layers])):
                layer.mask.copy_(m.view_as(layer.mask).bool())


def settings(lr: float) -> OptimSettings:
    return OptimSettings(optimizer="sgd", lr=lr, momentum=0.9, wd=5e-4, schedule="constant", epochs=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--k", type=float, default=0.05)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    x2 = torch.randn(args.batch_size, 3, 32, 32, generator=g).to(device)
    y2 = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)

    def fresh(masked: bool):
        model = build_model(args.arch, num_classes=10).to(device)
        if not masked:
            return model, None
        to_masked(model, granularity="unstructured")
        model.to(device)
        return model, MaskSet(model, k=args.k, granularity="unstructured", scope="global")

    rows = []
    model, _ = fresh(False)
    dense = BaseTrainer(model=model, maskset=None, mode="pretrain", device=device, weights=settings(0.01), progress=False)
    t_dense = median_time(lambda: dense.step((x, y)), args.steps, device)
    rows.append(("dense SGD step", t_dense))

    model, ms = fresh(True)
    n_weights = sum(l.weight.numel() for l in ms.layers.values())
    prune = BaseTrainer(model=model, maskset=ms, mode="prune", device=device, weights=settings(0.1), progress=False)
    rows.append((f"prune step (ours, HYDRA, global k={args.k})", median_time(lambda: prune.step((x, y)), args.steps, device)))

    model, ms = fresh(True)
    bilevel = BilevelTrainer(model=model, maskset=ms, mode="prune", device=device, weights=settings(0.01),
                             masks=settings(0.1), progress=False)
    rows.append(("bilevel step (ours, BiP)", median_time(lambda: bilevel.step(((x, y), (x2, y2))), args.steps, device)))

    model, ms = fresh(True)
    ms.frozen = True  # masks come from the sort-every-forward hook below instead
    SortEveryForward(model, args.k)
    public = BaseTrainer(model=model, maskset=ms, mode="prune", device=device, weights=settings(0.1), progress=False)
    rows.append(("prune step, public-code algorithm (sort every forward)",
                 median_time(lambda: public.step((x, y)), args.steps, device)))

    scores = [l.popup_scores.detach() for l in ms.layers.values()]
    t_sel = median_time(lambda: select_masks(scores, k=args.k, granularity="unstructured", scope="global"),
                        args.steps, device)
    flat = torch.cat([s.abs().flatten() for s in scores])
    t_sort = median_time(lambda: flat.sort(), args.steps, device)

    print(f"{args.arch}, batch {args.batch_size}, {n_weights:,} masked weights, device {device} "
          f"({torch.get_num_threads()} CPU threads), torch {torch.__version__}, median of {args.steps} steps")
    print(f"{'step':<58} {'seconds':>8} {'x dense':>8}")
    for name, t in rows:
        print(f"{name:<58} {t:>8.3f} {t / t_dense:>7.2f}x")
    print(f"{'selector alone (global top-k, ' + format(n_keep(args.k, n_weights), ',') + ' kept)':<58} {t_sel:>8.3f}")
    print(f"{'full sort of all scores (torch.sort)':<58} {t_sort:>8.3f}  selector is {t_sort / t_sel:.1f}x faster")


if __name__ == "__main__":
    main()
