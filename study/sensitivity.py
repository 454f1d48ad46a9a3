"""Sensitivity analysis (Distiller's): prune one layer at a time, evaluate, and budget the layers from it.

    python -m study.sensitivity CHECKPOINT [--densities 0.9,0.7,0.5,0.3,0.2,0.1] [--criterion magnitude]
                                [--layer-type unstructured] [--budget 0.2] [--out DIR]

For each masked layer alone (every other layer dense), at each density of ``--densities``, the layer's
mask from ``--criterion`` (a ``--prune-method`` that needs no gradients: magnitude, l1, random, fpgm) at
exactly n_keep(k, N) units, and the validation split's top-1 and loss of the dense checkpoint's model
(the test split where the dataset has no validation split; the output says which). Writes
``sensitivity.csv`` (layer, params, density, kept, top1, loss) and ``sensitivity.png`` (top-1 against
density, a line per layer, the dense model as a reference).

``--budget D`` also writes ``layer_k.json``: per-layer densities that keep exactly n_keep(D, W) of the W
masked weights with the least predicted loss, for ``train.py --layer-k``. The allocation is greedy on
the measured curves (linear between the measured densities): every layer starts dense; each step lowers
the one layer whose next measured density costs the least loss increase per weight removed; the step
that would overshoot the budget is taken only part of the way, to the density that meets it exactly.
The predicted loss is the sum of the layers' own increases (each measured with the others dense), the
additive model of NNI's and Distiller's sensitivity-based allocations.

``--budget D --budget-of flops`` budgets the masked layers' FLOPs instead (MACs per sample, from one forward
pass: ``pruning.flops.flops_per_weight``): a step then costs loss per FLOP removed, so a layer whose
weights are used at many positions (an early conv) is lowered first at equal loss, and the last step
keeps the masked layers' FLOPs at most D times the dense ones, within one weight's FLOPs. The overall
weight density this makes is the ``k`` of ``layer_k.json``, the ``--k`` that train.py must be given.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch import nn

from configs.errors import UserError, one_line
from data import build_dataset, build_loaders
from engine.checkpoint import load_checkpoint, load_model_state
from engine.evaluate import evaluate
from layers import masked_layers, to_masked
from layers.selector import n_keep, select_masks
from models import build_model
from pruning.flops import flops_per_weight
from pruning.methods import PRUNE_METHODS
from pruning.solver import OBSSolver

DEFAULT_DENSITIES = (0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05)


@dataclass(frozen=True)
class Point:
    layer: str
    params: int
    density: float
    kept: int
    top1: float
    loss: float


def parse_densities(text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()}, reverse=True)
    except ValueError:
        raise UserError(f"--densities {text}: comma-separated numbers in (0, 1), e.g. 0.9,0.5,0.1") from None
    if not values or any(not 0.0 < v < 1.0 for v in values):
        raise UserError(f"--densities {text}: every density must lie in (0, 1) (1 is the dense model, always measured)")
    return values


def model_and_data(path: str, *, batch_size: int) -> tuple[nn.Module, Any, str, dict[str, Any]]:
    """The dense model a train.py checkpoint holds, its evaluation split and that split's name."""
    ckpt = load_checkpoint(path)
    config = ckpt.get("config") or {}
    if "arch" not in config:
        raise UserError(f"{path} records no config (not written by train.py): sensitivity needs its arch and dataset")
    if ckpt.get("masks"):
        raise UserError(f"{path} is a pruned checkpoint: sensitivity analysis measures a dense model, pass the "
                        "pretrain checkpoint it came from")
    splits = build_dataset(config.get("dataset", "Digits"), data_dir=config.get("data_dir", "./data"),
                           normalize=bool(config.get("normalize", False)), image_dim=config.get("image_dim"),
                           num_classes=config.get("num_classes"))
    loaders = build_loaders(splits, batch_size=batch_size, test_batch_size=batch_size, seed=int(config.get("seed", 0)))
    model = build_model(config["arch"], num_classes=splits.num_classes, in_channels=splits.in_channels,
                        image_size=splits.image_size)
    load_model_state(model, ckpt["state_dict"], source=path, notice=lambda line: None)
    split, name = (loaders.val, "validation") if loaders.val is not None else (loaders.test, "test")
    return model, split, name, config


def layer_mask(layer: Any, *, density: float, granularity: str, criterion: str) -> torch.Tensor:
    """The criterion's mask of one layer at ``density`` (exactly n_keep units), from the shared selector."""
    solver = OBSSolver({"layer": layer}, granularity=granularity, method=PRUNE_METHODS[criterion])
    return select_masks([solver.scores()["layer"]], k=density, granularity=granularity, scope="layer")[0]


def measure(model: nn.Module, split: Any, *, densities: Sequence[float], granularity: str, criterion: str,
            device: torch.device, progress: bool = True) -> list[Point]:
    """Every layer alone at every density (see the module docstring), plus the dense model (layer '')."""
    layers = masked_layers(model)
    dense = evaluate(model, split, device=device)
    points = [Point("", sum(m.weight.numel() for m in layers.values()), 1.0, 0, dense["top1"], dense["loss"])]
    total, done = len(layers) * len(densities), 0
    for name, layer in layers.items():
        full = layer.mask.clone()
        for density in densities:
            with torch.no_grad():
                layer.mask.copy_(layer_mask(layer, density=density, granularity=granularity, criterion=criterion))
            result = evaluate(model, split, device=device)
            points.append(Point(name, layer.weight.numel(), density, int(layer.mask.sum()), result["top1"],
                                result["loss"]))
            done += 1
            if progress:
                print(f"\r[{done}/{total}] {name} at {density:g}: top1 {result['top1']:.2f}", end="", file=sys.stderr,
                      flush=True)
        with torch.no_grad():
            layer.mask.copy_(full)
    if progress:
        print(file=sys.stderr)
    return points


def allocate(points: Sequence[Point], *, budget: float, costs: dict[str, int] | None = None) -> dict[str, float]:
    """Per-layer densities keeping exactly n_keep(budget, W) of the W weights, greedily (module docstring).
    ``costs``: FLOPs per weight of each layer; the budget is then the kept fraction of the layers' FLOPs,
    met from below within one weight's FLOPs."""
    dense_loss = next(p.loss for p in points if p.layer == "")
    curves: dict[str, list[tuple[float, float]]] = {}
    sizes: dict[str, int] = {}
    for p in points:
        if p.layer:
            curves.setdefault(p.layer, [(1.0, 0.0)]).append((p.density, max(0.0, p.loss - dense_loss)))
            sizes[p.layer] = p.params
    for curve in curves.values():
        curve.sort(reverse=True)
    per_weight = dict.fromkeys(curves, 1) if costs is None else {name: costs[name] for name in curves}
    total = sum(sizes.values())
    # the budget in cost units: exactly n_keep(budget, W) weights, or at most budget x the dense FLOPs
    target = n_keep(budget, total) if costs is None else budget * sum(sizes[n] * per_weight[n] for n in curves)
    at = dict.fromkeys(curves, 0)  # index into each layer's curve
    kept = {name: sizes[name] for name in curves}

    def spent() -> int:
        return sum(kept[n] * per_weight[n] for n in curves)

    while spent() > target:
        best, best_cost = None, math.inf
        for name, curve in curves.items():
            i = at[name]
            if i + 1 < len(curve):
                removed = (curve[i][0] - curve[i + 1][0]) * sizes[name] * per_weight[name]
                cost = (curve[i + 1][1] - curve[i][1]) / max(removed, 1e-12)
                if cost < best_cost:
                    best, best_cost = name, cost
        if best is None:
            lowest = min(p.density for p in points if p.layer)
            unit = "weights" if costs is None else "FLOPs"
            raise UserError(f"--budget {budget:g} is below what the measured densities reach (every layer at "
                            f"{lowest:g} keeps {spent():,} > {target:,.0f} {unit}): add smaller --densities")
        next_density = curves[best][at[best] + 1][0]
        excess = spent() - target
        step = kept[best] - n_keep(next_density, sizes[best])
        if step * per_weight[best] >= excess:  # part of the way: the budget exactly (weights) or just met (FLOPs)
            kept[best] -= math.ceil(excess / per_weight[best])
            break
        kept[best] = n_keep(next_density, sizes[best])
        at[best] += 1
    return {name: density_of(count, sizes[name]) for name, count in kept.items()}


def density_of(count: int, size: int) -> float:
    """A density k with n_keep(k, size) == count: count / size, nudged back through the float round trip of
    the count rule where it lands a count off."""
    k = count / size
    while n_keep(k, size) != count:
        k = math.nextafter(k, 2.0 if n_keep(k, size) < count else 0.0)
    return k


def write_csv(points: Sequence[Point], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "params", "density", "kept", "top1", "loss"])
        for p in points:
            writer.writerow([p.layer or "(dense)", p.params, p.density, p.kept, f"{p.top1:.4f}", f"{p.loss:.6f}"])


def plot(points: Sequence[Point], path: str, *, split: str) -> None:
    from study.report import matplotlib_agg, save_figure
    plt = matplotlib_agg().pyplot
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(p.layer for p in points if p.layer):
        own = sorted((p.density, p.top1) for p in points if p.layer == name)
        ax.plot([d for d, _ in own], [t for _, t in own], marker="o", markersize=3, label=name)
    dense = next(p.top1 for p in points if p.layer == "")
    ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("density of the layer (others dense)")
    ax.set_ylabel(f"{split} top-1 (%)")
    ax.invert_xaxis()
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise UserError(message)

    p = Parser(prog="python -m study.sensitivity", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a dense train.py checkpoint (pretrain's model_best.pth.tar)")
    p.add_argument("--densities", default=",".join(map(str, DEFAULT_DENSITIES)), help="comma-separated, in (0, 1)")
    p.add_argument("--criterion", default="magnitude", help="a --prune-method without gradients "
                   "(magnitude, l1, random, fpgm)")
    p.add_argument("--layer-type", default="unstructured", choices=("unstructured", "filter", "channel"))
    p.add_argument("--budget", type=float, default=None, help="overall density: also write layer_k.json for "
                   "train.py --layer-k")
    p.add_argument("--budget-of", default="weights", choices=("weights", "flops"),
                   help="what --budget keeps a fraction of: the masked weights, or the masked layers' FLOPs")
    p.add_argument("--out", default=None, help="output folder (default: sensitivity/ beside the checkpoint's folder)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    densities = parse_densities(args.densities)
    if args.criterion not in PRUNE_METHODS.names():
        raise UserError(f"--criterion {args.criterion}: not a --prune-method; choose from "
                        f"{', '.join(PRUNE_METHODS.names())}")
    method = PRUNE_METHODS[args.criterion]
    if method.fisher is not None or method.probe is not None:
        needs = "gradient rows" if method.fisher is not None else "statistics read off the model on samples"
        raise UserError(f"--criterion {args.criterion} needs {needs}, which sensitivity analysis does not "
                        "collect: use magnitude, l1, random or fpgm")
    if args.layer_type not in method.granularities:
        raise UserError(f"--criterion {args.criterion} does not rank --layer-type {args.layer_type} units")
    if args.budget is not None and not 0.0 < args.budget < 1.0:
        raise UserError(f"--budget {args.budget:g}: an overall density in (0, 1)")
    if args.budget is not None and args.layer_type != "unstructured":
        raise UserError("--budget allocates weights: use --layer-type unstructured")
    if args.budget_of == "flops" and args.budget is None:
        raise UserError("--budget-of flops says what --budget counts: pass --budget too")
    if not os.path.isfile(args.checkpoint):
        raise UserError(f"{args.checkpoint} does not exist: pass a train.py checkpoint")
    model, split, split_name, _ = model_and_data(args.checkpoint, batch_size=args.batch_size)
    to_masked(model, granularity=args.layer_type)
    if not masked_layers(model):
        raise UserError(f"--layer-type {args.layer_type} masks no layer of this model")
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint))), "sensitivity")
    os.makedirs(out, exist_ok=True)
    points = measure(model, split, densities=densities, granularity=args.layer_type, criterion=args.criterion,
                     device=torch.device("cpu"), progress=args.progress)
    write_csv(points, os.path.join(out, "sensitivity.csv"))
    plot(points, os.path.join(out, "sensitivity.png"), split=split_name)
    print(f"wrote {os.path.join(out, 'sensitivity.csv')} and sensitivity.png ({split_name} split, "
          f"{len(points) - 1} measurements)")
    if args.budget is not None:
        costs = None
        if args.budget_of == "flops":
            example = next(iter(split))[0][:1]
            costs = flops_per_weight(model, example=example, layers=masked_layers(model))
        layer_k = allocate(points, budget=args.budget, costs=costs)
        sizes = {p.layer: p.params for p in points if p.layer}
        k = density_of(sum(n_keep(v, sizes[name]) for name, v in layer_k.items()), sum(sizes.values()))
        path = os.path.join(out, "layer_k.json")
        with open(path, "w") as f:
            json.dump({"budget": args.budget, "budget_of": args.budget_of, "k": k, "criterion": args.criterion,
                       "layer_k": layer_k}, f, indent=1)
        print(f"wrote {path}: per-layer densities for train.py --layer-k {path} --k {k!r}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
