"""CPU inference latency of the slimmed model (``deploy.slim``) against the dense one, in one process.

    python bench/bench_export.py [--arch resnet18] [--ks 0.5 0.3] [--batches 1 64] [--repeats 7] [--threads 1]

For each granularity (filter, channel) and density k: masks are the per-layer top-k (HYDRA's scope)
of the filters'/channels' L2 weight norms of a randomly initialised network (a trained mask ranks
other units but removes the same number), the masked model is slimmed, and both are timed in
eval mode under ``torch.inference_mode`` on a random CIFAR-sized batch. Times are medians of
``--repeats`` rounds that call dense and slimmed alternately, so that load from other processes
hits both alike. ``MACs`` is the slimmed/dense ratio of conv+linear multiply-accumulates.
Prints a Markdown table; the figures go into the README with the command and the machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deploy import slim  # noqa: E402
from layers import masked_layers, to_masked  # noqa: E402
from models import build_model  # noqa: E402


def magnitude_masked(arch: str, granularity: str, k: float, *, side: int, classes: int) -> torch.nn.Module:
    from layers import MaskSet

    torch.manual_seed(0)
    model = build_model(arch, num_classes=classes, in_channels=3, image_size=side)
    to_masked(model, granularity=granularity)
    with torch.no_grad():
        for layer in masked_layers(model).values():
            layer.popup_scores.copy_(layer.weight)  # rank units by their weight norm
    maskset = MaskSet(model, k=k, granularity=granularity, scope="layer")
    maskset.freeze()
    return model.eval()


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--ks", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--side", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense = build_model(args.arch, num_classes=10, in_channels=3, image_size=args.side).eval()
    rows = []
    for granularity in ("filter", "channel"):
        for k in args.ks:
            masked = magnitude_masked(args.arch, granularity, k, side=args.side, classes=10)
            net, report = slim(masked, example=torch.zeros(1, 3, args.side, args.side))
            for batch in args.batches:
                x = torch.randn(batch, 3, args.side, args.side)

                def run(model, x=x):
                    with torch.inference_mode():
                        model(x)

                t = interleaved({"dense": lambda: run(dense), "slim": lambda: run(net)}, args.repeats)
                rows.append((granularity, k, batch, t["dense"], t["slim"], report))
                print(f"# {granularity} k={k} batch {batch}: dense {t['dense'] * 1e3:.1f} ms, "
                      f"slim {t['slim'] * 1e3:.1f} ms", file=sys.stderr)
    print(f"{args.arch} ({args.side}x{args.side}), CPU, {args.threads} thread(s), median of {args.repeats} "
          "interleaved rounds\n")
    print("| mask | k | batch | params slim/dense | MACs slim/dense | dense ms | slim ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for granularity, k, batch, td, ts, rep in rows:
        print(f"| {granularity} | {k:g} | {batch} | {rep.slim_params / rep.dense_params:.2f} | "
              f"{rep.slim_macs / rep.dense_macs:.2f} | {td * 1e3:.1f} | {ts * 1e3:.1f} | {td / ts:.2f}x |")


if __name__ == "__main__":
    main()
