"""Step-time ratios against a dense training step, measured in one process.

    python bench/bench_step.py [--arch resnet18] [--batch-size 64] [--steps 5] [--device auto]

Rows (median over --steps after one warm-up step; each a ratio to the dense SGD step):
- dense:        plain model, forward + backward + SGD step on the weights
- prune (ours): HYDRA prune step, global unstructured k=0.05, scores trained, weights frozen
- bilevel (ours): one BiP iteration (lower weight step + upper score step with the implicit term)
- prune (public-code algorithm): the same step when, as in the public BiP code, every forward
  concatenates and fully sorts all scores to build the global mask (re-implemented here)
- selector alone vs a full sort of all scores
- the same HYDRA and BiP steps with the other selection kernel (on a CPU the sync-free one that other
  devices use by default, see layers.selector.IncrementalTopK)
Targets (issue 2): prune <= 1.15x dense, bilevel <= 2.3x dense. The last table counts the operators and
host reads of each step (engine.dispatch_count), the same on every device.
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

from engine.dispatch_count import DispatchCount  # noqa: E402
from layers import MaskSet, masked_layers, n_keep, select_masks, to_masked  # noqa: E402
from models import build_model  # noqa: E402
from engine.optim import OptimSettings  # noqa: E402
from trainers.base import BaseTrainer  # noqa: E402
from trainers.bilevel import BilevelTrainer  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(fns: dict, steps: int, device) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin (one call of each per round),
    so that load from other processes affects every variant alike."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


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


def public_bilevel_step(model: nn.Module, opt_w, opt_s, weights, scores, batch1, batch2, lr2: float) -> None:
    """One iteration of the public BiP bilevel trainer's algorithm (re-implemented, not copied):
    a weight step on one batch, then a backward for weights+scores and another for scores only on
    the other batch, the implicit term, a score step, and an extra forward for its accuracy log.
    Every forward fully sorts all scores (SortEveryForward)."""
    (x1, y1), (x2, y2) = batch1, batch2
    ce = nn.functional.cross_entropy
    for p, g in zip(weights, torch.autograd.grad(ce(model(x2), y2), weights)):
        p.grad = g
    opt_w.step()
    both = torch.autograd.grad(ce(model(x1), y1), weights + scores)[len(weights):]
    g_s = torch.autograd.grad(ce(model(x1), y1), scores)
    for p, gs, gb in zip(scores, g_s, both):
        p.grad = gs - lr2 * gs * gb
    opt_s.step()
    with torch.no_grad():
        model(x1)


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

    def fresh(masked: bool, sync_free: bool | None = None):
        model = build_model(args.arch, num_classes=10).to(device)
        if not masked:
            return model, None
        to_masked(model, granularity="unstructured")
        model.to(device)
        return model, MaskSet(model, k=args.k, granularity="unstructured", scope="global", sync_free=sync_free)

    model, _ = fresh(False)
    dense = BaseTrainer(model=model, maskset=None, mode="pretrain", device=device, weight_optim=settings(0.01), progress=False)
    model, ms = fresh(True)
    n_weights = sum(l.weight.numel() for l in ms.layers.values())
    prune = BaseTrainer(model=model, maskset=ms, mode="prune", device=device, weight_optim=settings(0.1), progress=False)
    model, ms = fresh(True)
    bilevel = BilevelTrainer(model=model, maskset=ms, mode="prune", device=device, weight_optim=settings(0.01),
                             score_optim=settings(0.1), progress=False)
    # The other selection kernel: sync-free where the default is host-bracketing (the CPU), and vice versa.
    other = device.type == "cpu"
    model, ms_other = fresh(True, sync_free=other)
    prune_other = BaseTrainer(model=model, maskset=ms_other, mode="prune", device=device, weight_optim=settings(0.1),
                              progress=False)
    model, ms_other2 = fresh(True, sync_free=other)
    bilevel_other = BilevelTrainer(model=model, maskset=ms_other2, mode="prune", device=device,
                                   weight_optim=settings(0.01), score_optim=settings(0.1), progress=False)
    kernel = "sync-free" if other else "host-bracketing"
    model, ms = fresh(True)
    ms.frozen = True  # masks come from the sort-every-forward hook below instead
    SortEveryForward(model, args.k)
    public = BaseTrainer(model=model, maskset=ms, mode="prune", device=device, weight_optim=settings(0.1), progress=False)
    model_pb, ms_pb = fresh(True)
    ms_pb.frozen = True
    SortEveryForward(model_pb, args.k)
    pb_scores = [l.popup_scores for l in ms_pb.layers.values()]
    pb_weights = [p for n, p in model_pb.named_parameters() if not n.endswith("popup_scores")]
    for p in pb_scores + pb_weights:
        p.requires_grad_(True)
    pb_opt_w = torch.optim.SGD(pb_weights, lr=0.01, momentum=0.9, weight_decay=5e-4)
    pb_opt_s = torch.optim.SGD(pb_scores, lr=0.1, momentum=0.9, weight_decay=5e-4)
    scores = [l.popup_scores.detach() for l in ms.layers.values()]
    flat = torch.cat([s.abs().flatten() for s in scores])
    t = interleaved_medians({
        "dense SGD step": lambda: dense.step((x, y)),
        f"prune step (ours, HYDRA, global k={args.k})": lambda: prune.step((x, y)),
        "bilevel step (ours, BiP)": lambda: bilevel.step(((x, y), (x2, y2))),
        f"prune step (ours, HYDRA, {kernel} selection)": lambda: prune_other.step((x, y)),
        f"bilevel step (ours, BiP, {kernel} selection)": lambda: bilevel_other.step(((x, y), (x2, y2))),
        "prune step, public-code algorithm (sort every forward)": lambda: public.step((x, y)),
        "bilevel step, public-code algorithm": lambda: public_bilevel_step(
            model_pb, pb_opt_w, pb_opt_s, pb_weights, pb_scores, (x, y), (x2, y2), 1e-4),
        "selector": lambda: select_masks(scores, k=args.k, granularity="unstructured", scope="global"),
        "sort": lambda: flat.sort(),
    }, args.steps, device)
    t_sel, t_sort = t.pop("selector"), t.pop("sort")
    rows = list(t.items())
    t_dense = t["dense SGD step"]
    # the incremental selector as the trainers use it (scores drift a little between calls)
    inc = ms.__class__(model, k=args.k, granularity="unstructured", scope="global")
    inc.step(force=True)

    def drift_and_select():
        with torch.no_grad():
            for layer in inc.layers.values():
                layer.popup_scores.mul_(1.001)
                layer.popup_scores.add_(1e-4, alpha=1.0)
        sync(device)
        t0 = time.perf_counter()
        inc.step()
        sync(device)
        return time.perf_counter() - t0

    drift_and_select()
    t_inc = statistics.median(drift_and_select() for _ in range(args.steps))

    print(f"{args.arch}, batch {args.batch_size}, {n_weights:,} masked weights, device {device} "
          f"({torch.get_num_threads()} CPU threads), torch {torch.__version__}, median of {args.steps} steps")
    print(f"{'step':<58} {'seconds':>8} {'x dense':>8}")
    for name, t in rows:
        print(f"{name:<58} {t:>8.3f} {t / t_dense:>7.2f}x")
    print(f"{'selector alone (global top-k, ' + format(n_keep(args.k, n_weights), ',') + ' kept)':<58} {t_sel:>8.3f}")
    print(f"{'incremental re-selection after a score step (MaskSet)':<58} {t_inc:>8.3f}")
    print(f"{'full sort of all scores (torch.sort)':<58} {t_sort:>8.3f}  selector {t_sort / t_sel:.1f}x, "
          f"incremental {t_sort / t_inc:.1f}x faster")
    # What a step dispatches and waits for, the same on every device (engine.dispatch_count); budgets (issue 21):
    # HYDRA <= dense + 3 per masked layer, BiP <= 2 x dense + 3 per masked layer, no host read inside a step.
    counted = {}
    for name, fn in (("dense SGD step", lambda: dense.step((x, y))), ("prune step (HYDRA)", lambda: prune.step((x, y))),
                     ("bilevel step (BiP)", lambda: bilevel.step(((x, y), (x2, y2)))),
                     (f"prune step (HYDRA, {kernel} selection)", lambda: prune_other.step((x, y))),
                     (f"bilevel step (BiP, {kernel} selection)", lambda: bilevel_other.step(((x, y), (x2, y2))))):
        with DispatchCount() as count:
            fn()
        counted[name] = (count.operators, count.host_reads)
    ops_dense = counted["dense SGD step"][0]
    layers = len(ms.layers)
    print(f"{'step':<58} {'operators':>9} {'host reads':>10}  ({layers} masked layers)")
    for name, (ops, reads) in counted.items():
        extra = f"  {(ops - ops_dense) / layers:+.1f} per masked layer over dense" if name != "dense SGD step" else ""
        print(f"{name:<58} {ops:>9} {reads:>10}{extra}")


if __name__ == "__main__":
    main()
