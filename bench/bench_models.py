"""The models users bring: what the masks cover, the true sparsity, and slimming against Torch-Pruning.

    pip install -r bench/requirements-bench.txt      # Torch-Pruning (benchmark only)
    OMP_NUM_THREADS=1 python bench/bench_models.py [--archs tv.mobilenet_v2 ...] [--side 224] [--rounds 5]

For each architecture, in one process:
- coverage: masked layers and the fraction of the model's weights they hold (``to_masked`` with
  unstructured masks: every Conv2d, Linear and nn.MultiheadAttention projection), and the true sparsity
  at k = 0.5 (one global threshold): zero effective weights among the masked layers and among all
  weights, counted from the weights (``pruning.cost``);
- slimming at 50 % of the units, ranked by the L2 norm of their weights, the criterion of Torch-Pruning's
  ``MagnitudeImportance(p=2)`` at ``pruning_ratio=0.5``: ours with per-layer filter masks (k = 0.5 per
  layer, BiP/HYDRA's semantics), ours with coupled masks (``--coupled``: one decision per dependency
  group, k = 0.5 of each family), then ``deploy.slim``; and Torch-Pruning's ``MagnitudePruner`` (DepGraph:
  one mask per dependency group); the classifier kept whole in all; parameters and MACs per sample (the
  same counter for all);
- CPU latency (``--threads`` threads, batch ``--batch``): the median of ``--rounds`` rounds that call
  dense, ours (both) and Torch-Pruning's in turn, so load from other processes hits all alike.
Attention models (no filter slimming here: structured attention masks are refused) report coverage only.
Prints a Markdown table; the figures go into the README with the command and the machine.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deploy.slim import dependency_groups, slim  # noqa: E402
from layers import build_maskset, masked_layers  # noqa: E402
from models import build_model  # noqa: E402
from pruning.cost import model_cost  # noqa: E402

ARCHS = ["tv.mobilenet_v2", "tv.efficientnet_b0", "tv.resnext50_32x4d", "tv.densenet121", "tv.convnext_tiny",
         "tv.regnet_y_400mf", "mobilenet", "tv.vit_b_16"]
ATTENTION = ("tv.vit_", "tv.swin_", "tv.maxvit_")


def coverage(arch: str, *, side: int, classes: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=classes, image_size=side)
    example = torch.zeros(1, 3, side, side)
    maskset, _ = build_maskset(model, granularity="unstructured", k=0.5, scope="global", example=example)
    cost = model_cost(model, example=example)
    return {"layers": len(maskset.layers), "covered": cost.masked_params / cost.params_total,
            "sparsity_masked": cost.sparsity_masked, "sparsity_model": cost.sparsity_model}


def ours_slimmed(dense: nn.Module, *, example: torch.Tensor, coupled: bool = False) -> nn.Module:
    model = copy.deepcopy(dense)
    groups = dependency_groups(model, example=example) if coupled else None
    maskset, _ = build_maskset(model, granularity="filter", k=0.5, scope="layer", coupled=groups)
    with torch.no_grad():
        for layer in masked_layers(model).values():
            layer.popup_scores.copy_(layer.weight)  # rank filters by their weights' L2 norm
    maskset.step(force=True)
    maskset.freeze()
    net, _ = slim(model.eval(), example=example)
    return net


def classifier(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def depgraph_slimmed(dense: nn.Module, *, example: torch.Tensor) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(dense)
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=[classifier(model)])
    pruner.step()
    return model.eval()


def median_ms(models: list[nn.Module], x: torch.Tensor, rounds: int) -> list[float]:
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for m in models:  # warm-up
            m(x)
        for _ in range(rounds):
            for i, m in enumerate(models):
                t0 = time.perf_counter()
                m(x)
                times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=ARCHS)
    p.add_argument("--side", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.side}x{args.side}, batch {args.batch}, "
          f"median of {args.rounds} interleaved rounds")
    print("| model | masked layers | weights covered | sparsity masked / model at k = 0.5 | params per-layer / coupled "
          "/ DepGraph | MACs per-layer / coupled / DepGraph | dense ms | speed-up per-layer / coupled / DepGraph |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in args.archs:
        c = coverage(arch, side=args.side, classes=args.classes)
        head = (f"| {arch} | {c['layers']} | {c['covered']:.1%} | {c['sparsity_masked']:.1%} / "
                f"{c['sparsity_model']:.1%}")
        if arch.startswith(ATTENTION):
            print(head + " | - | - | - | - |")
            continue
        torch.manual_seed(0)
        dense = build_model(arch, num_classes=args.classes, image_size=args.side).eval()
        example = torch.randn(1, 3, args.side, args.side)
        models = [dense, ours_slimmed(dense, example=example), ours_slimmed(dense, example=example, coupled=True),
                  depgraph_slimmed(dense, example=example)]
        costs = [model_cost(m, example=example) for m in models]
        params = " / ".join(f"{cost.params_total / costs[0].params_total:.3f}" for cost in costs[1:])
        macs = " / ".join(f"{cost.flops_total / costs[0].flops_total:.3f}" for cost in costs[1:])
        ms = median_ms(models, torch.randn(args.batch, 3, args.side, args.side), args.rounds)
        speed = " / ".join(f"{ms[0] / t:.2f}x" for t in ms[1:])
        print(head + f" | {params} | {macs} | {ms[0]:.1f} | {speed} |", flush=True)


if __name__ == "__main__":
    main()
