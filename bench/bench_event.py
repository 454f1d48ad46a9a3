"""Time of one WoodFisher pruning event (gradients + inverse + statistic + selection + update), this
tree against another checkout of the project (e.g. the commit before a change), in one run.

    python bench/bench_event.py [--baseline /path/to/other/checkout] [--repeats 5] [--device auto] [--sum]
                                [--rows-ratio]

Cases:
- digits:   smallcnn on the Digits data, the shipped config's Fisher (m 64 x 8 samples, blocks of
            512, lambda 1e-5), one event from dense to 64.8 % sparsity;
- resnet20: resnet20s on CIFAR-shaped random images, m 64 x 8 samples, blocks of 1000 (the CIFAR-10
            config's block size), one event to 50 %.
- resnet50: ResNet-50 (torchvision's, ImageNet stem) on 224x224 random images (1000 classes), m 64 x 1 sample, blocks of 2000 (the
            ImageNet config's), one event to 50 % (for a GPU: pass --cases resnet50 --device cuda).
- mobilenet: MobileNetV1 (the WoodFisher paper's, ImageNet stem) on 224x224 random images, the paper's Fisher
            (m = 400, blocks of 10,000, lambda 1e-5, gradients in host memory) with one sample per row, one event
            to 50 %; mobilenet-paper: the same with the paper's 2400 samples per row (passes of 800).
Each repeat runs every (case, tree) pair once in a fresh subprocess, round-robin, so that load from
other processes affects both trees alike; the table gives medians and the baseline/ours ratio, with
the machine's load average over the run.

Parts of the event (second table; medians): rows = the m gradient rows; inverse = forming the blockwise
Fisher (Gram matrices, factors and diag(F^-1)), wherever it happens: for every layer before the
statistic, and again in the update for the layers whose inverse did not fit the solver's keep budget;
statistic = the rest of ``OBSSolver.scores``; update = the rest of ``OBSSolver.compensate`` (the joint
solve, F^-1 s, writing the weights); other = the event's remainder (selection, FLOPs, masks). Parts are
timed by wrapping the tree's functions, so a tree that lacks one leaves it blank.

--rows-ratio (third table): the m gradient rows against dense backward passes over the same samples
(same model in eval mode, the same cut into passes as the rows use, the weight gradients of the same
layers), both from one materialised sample list, alternating, --ratio-repeats times each in the
worker process, before the event; medians. The issue's goal is rows <= 3x backward.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "digits": dict(arch="smallcnn", dataset="digits", m=64, b=8, block=512, sparsity=0.6481, batch=64),
    "resnet20": dict(arch="resnet20s", dataset="random-cifar", m=64, b=8, block=1000, sparsity=0.5, batch=64),
    "resnet20-config": dict(arch="resnet20s", dataset="random-cifar", m=1000, b=1, block=1000, sparsity=0.5, batch=64),
    # the GPU figure: ResNet-50 at ImageNet size, m = 64, the ImageNet config's blocks of 2000
    "resnet50": dict(arch="ResNet50", dataset="random-imagenet", m=64, b=1, block=2000, sparsity=0.5, batch=64),
    # MobileNetV1 with the WoodFisher paper's Fisher (configs/ImageNet/woodfisher_mobilenet.yml): m = 400, blocks of
    # 10,000, gradients in host memory; "mobilenet" draws one sample per row, "mobilenet-paper" the paper's 2400 (in
    # passes of 800: 960,000 forward/backward samples, minutes even on a GPU; the inverse is the same)
    "mobilenet": dict(arch="mobilenet", dataset="random-imagenet", m=400, b=1, block=10000, sparsity=0.5, batch=64,
                      options=dict(offload_grads=True)),
    "mobilenet-paper": dict(arch="mobilenet", dataset="random-imagenet", m=400, b=2400, block=10000, sparsity=0.5,
                            batch=64, options=dict(offload_grads=True, max_mini_bsz=800)),
}


class PartTimer:
    """Wall seconds spent inside wrapped functions, by part; a call nested in another wrapped call (of any
    part) counts for the outer one only, so the parts never overlap. Calls running side by side in
    several threads (the inverse's CPU batches) count once, for the time any of them runs."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._depth = threading.local()
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}
        self._since: dict[str, float] = {}

    def wrap(self, owner: Any, name: str, part: str) -> None:
        fn = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        if fn is None:  # a tree without this function: the part stays blank
            return
        timer = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(timer._depth, "n", 0)
            if depth:
                return fn(*args, **kwargs)
            timer._depth.n = 1
            with timer._lock:
                if not timer._running.get(part):
                    timer._since[part] = time.perf_counter()
                timer._running[part] = timer._running.get(part, 0) + 1
            try:
                return fn(*args, **kwargs)
            finally:
                timer._depth.n = 0
                with timer._lock:
                    timer._running[part] -= 1
                    if not timer._running[part]:
                        elapsed = time.perf_counter() - timer._since[part]
                        timer.seconds[part] = timer.seconds.get(part, 0.0) + elapsed

        setattr(owner, name, timed)


def wrap_parts(timer: PartTimer) -> Callable[[Callable[..., Any], str], Callable[..., Any]]:
    """Time the inverse's own passes (any tree's names) as "inverse"; returns a wrapper that times a
    solver phase and subtracts the inverse time spent inside it."""
    from pruning import fisher_inverse
    batch = getattr(fisher_inverse, "_BlockBatch", None)
    if batch is not None:
        # before this tree: __init__ built everything (Gram, factor, cholesky_inverse for diag); now:
        # the Gram and diag(F^-1) passes run on first use
        for name in ("__init__", "_primal_gram", "_primal_diag"):
            timer.wrap(batch, name, "inverse")

    def phase(fn: Callable[..., Any], part: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            before = timer.seconds.get("inverse", 0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                inside = timer.seconds.get("inverse", 0.0) - before
                timer.seconds[part] = timer.seconds.get(part, 0.0) + time.perf_counter() - t0 - inside
        return timed
    return phase


def rows_vs_backward(trainer: Any, loaders: Any, *, repeats: int) -> dict:
    """Seconds of the trainer's m gradient rows and of dense backward passes over the same samples, each
    the median of ``repeats`` alternating runs on one materialised sample list (no data loading timed)."""
    import torch
    import torch.nn.functional as F
    from pruning.solver import collect_rows
    fisher, layers, model, device = trainer.fisher, trainer.maskset.layers, trainer.model, trainer.device
    total = fisher.m * fisher.samples_per_grad
    xs, ys, held = [], [], 0
    for x, y in trainer.fisher_batches(loaders, epoch=0, substep=0):
        xs.append(x)
        ys.append(y)
        held += len(y)
        if held >= total:
            break
    X, Y = torch.cat(xs)[:total].to(device), torch.cat(ys)[:total].to(device)
    width = sum(layer.weight.numel() for layer in layers.values())
    try:
        from pruning.gradients import pass_samples
        cut = pass_samples(rows=fisher.m, samples_per_row=fisher.samples_per_grad, width=width,
                           element_size=4, device_type=device.type, max_samples=fisher.max_samples)
    except ImportError:  # a tree from before pass_samples: its fixed pass size
        cut = 64
    batches = [(X[i:i + cut], Y[i:i + cut]) for i in range(0, total, cut)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def rows() -> None:
        collect_rows(model, layers, iter(batches), fisher=fisher, device=device)

    def backward() -> None:
        was = model.training
        model.eval()
        flags = [layer.score_grad for layer in layers.values()]
        for layer in layers.values():  # the rows' forward: weight * mask, no straight-through path
            layer.score_grad = False
        weights = [layer.weight for layer in layers.values()]
        try:
            for x, y in batches:
                loss = F.cross_entropy(model(x), y, reduction="sum") / fisher.samples_per_grad
                torch.autograd.grad(loss, weights)
        finally:
            for layer, flag in zip(layers.values(), flags):
                layer.score_grad = flag
            model.train(was)

    times: dict[str, list[float]] = {"rows": [], "backward": []}
    for _ in range(repeats):
        for name, fn in (("rows", rows), ("backward", backward)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()} | {"cut": cut}


def worker(case: str, device: str, extra: dict | None = None, ratio_repeats: int = 0) -> dict:
    """Runs inside the tree under test (its root first on sys.path); prints one JSON line."""
    import torch
    from data.loaders import build_loaders
    from data.registry import DatasetSplits, build_dataset
    from layers import MaskSet, to_masked
    from models import build_model
    try:
        from engine.optim import OptimSettings
    except ImportError:  # a tree from before the engine/ package
        from trainers.base import OptimSettings
    from trainers.woodfisher import WoodFisherTrainer

    c = CASES[case]
    torch.manual_seed(0)
    if c["dataset"] == "digits":
        splits = build_dataset("Digits", data_dir=".", normalize=True)
    else:
        from data.tensor_dataset import InMemoryImages
        from data.tensor_ops import ToFloat
        g = torch.Generator().manual_seed(0)
        size, classes, count = (224, 1000, 256) if c["dataset"] == "random-imagenet" else (32, 10, 1024)
        images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, classes, (count,), generator=g)
        data = InMemoryImages(images, labels, transform=ToFloat())
        splits = DatasetSplits(train=data, val=None, test=data, num_classes=classes, in_channels=3, image_size=size)
    loaders = build_loaders(splits, batch_size=c["batch"], test_batch_size=256, seed=0)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model = build_model(c["arch"], num_classes=splits.num_classes, in_channels=splits.in_channels,
                        image_size=splits.image_size)
    to_masked(model, granularity="unstructured")
    model.to(dev)
    ms = MaskSet(model, k=1 - c["sparsity"], granularity="unstructured", scope="global")
    settings = OptimSettings(optimizer="sgd", lr=0.01, momentum=0.9, wd=0.0, schedule="constant", epochs=2)
    options = dict(prune_end=1, init_sparsity=c["sparsity"] / 2, fisher_subsample_size=c["m"],
                   fisher_mini_bsz=c["b"], fittable_params=c["block"], fisher_damp=1e-5, **c.get("options", {}), **(extra or {}))
    try:  # typed options (this tree)
        from configs.options import WoodFisherOptions
        trainer = WoodFisherTrainer(model=model, maskset=ms, mode="prune", device=dev, weight_optim=settings,
                                    progress=False, options=WoodFisherOptions(**options))
    except ImportError:  # options by keyword (a tree from before configs/options.py)
        trainer = WoodFisherTrainer(model=model, maskset=ms, mode="prune", device=dev, weights=settings,
                                    progress=False, **options)
    ratio = rows_vs_backward(trainer, loaders, repeats=ratio_repeats) if ratio_repeats else None
    timer = PartTimer()
    phase = wrap_parts(timer)
    try:
        from pruning.solver import OBSSolver
        for name, part in (("scores", "statistic"), ("compensate", "update")):
            setattr(OBSSolver, name, phase(getattr(OBSSolver, name), part))
    except ImportError:  # a tree from before the shared solver: no parts
        pass
    record = trainer.prune_step(c["sparsity"], epoch=0, loaders=loaders)
    parts = dict(timer.seconds)
    if record.get("grad_seconds") is not None:
        parts["rows"] = record["grad_seconds"]
        # the rows are collected before the solver's phases; the event's remainder is "other"
        parts["other"] = record["seconds"] - sum(parts.get(k, 0.0) for k in ("rows", "inverse", "statistic", "update"))
    return {"seconds": record["seconds"], "grad_seconds": record.get("grad_seconds"),
            "sparsity": record["sparsity"], "parts": parts, "ratio": ratio}


def run_in(tree: str, case: str, device: str, extra: dict | None = None, ratio_repeats: int = 0) -> dict:
    code = (f"import sys; sys.path.insert(0, {tree!r}); sys.path.insert(1, {HERE + '/bench'!r}); "
            f"import os; os.chdir({tree!r}); import json, bench_event; "
            f"print(json.dumps(bench_event.worker({case!r}, {device!r}, {extra!r}, {ratio_repeats!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(rows: list[dict], key: str) -> float | None:
    values = [r["parts"][key] for r in rows if r.get("parts") and key in r["parts"]]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="another checkout of the project to compare with")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cases", default="digits,resnet20,resnet20-config")
    parser.add_argument("--sum", action="store_true",
                        help="also time this tree with --obs-solve sum (WoodFisher's summed update, no joint solve)")
    parser.add_argument("--rows-ratio", action="store_true",
                        help="also time the gradient rows against dense backward passes over the same samples")
    parser.add_argument("--ratio-repeats", type=int, default=3,
                        help="alternating runs of rows and backward per worker for --rows-ratio")
    args = parser.parse_args()
    load_before = os.getloadavg()
    trees: dict[str, tuple[str, dict | None]] = {"ours": (HERE, None)}
    if args.sum:
        trees["ours, sum"] = (HERE, {"obs_solve": "sum"})
    if args.baseline:
        trees["baseline"] = (os.path.abspath(args.baseline), None)
    cases = args.cases.split(",")
    times: dict[tuple[str, str], list[dict]] = {(c, t): [] for c in cases for t in trees}
    for r in range(args.repeats):
        for case in cases:
            for tree_name, (tree, extra) in trees.items():
                repeats = args.ratio_repeats if args.rows_ratio else 0
                times[(case, tree_name)].append(run_in(tree, case, args.device, extra, repeats))
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    print("| case | tree | event s (median) | gradients s | sparsity |")
    print("|---|---|---|---|---|")
    for case in cases:
        for tree_name in trees:
            rows = times[(case, tree_name)]
            grad = [r["grad_seconds"] for r in rows if r.get("grad_seconds") is not None]
            print(f"| {case} | {tree_name} | {statistics.median(r['seconds'] for r in rows):.3f} | "
                  f"{statistics.median(grad):.3f} | {rows[0]['sparsity']:.4f} |" if grad else
                  f"| {case} | {tree_name} | {statistics.median(r['seconds'] for r in rows):.3f} | | "
                  f"{rows[0]['sparsity']:.4f} |")
        if "baseline" in trees:
            base = statistics.median(r["seconds"] for r in times[(case, "baseline")])
            for name in (n for n in trees if n != "baseline"):
                ours = statistics.median(r["seconds"] for r in times[(case, name)])
                print(f"| {case} | baseline / {name} | **{base / ours:.2f}x** | | |")
    print()
    print("| case | tree | rows s | inverse s | statistic s | update s | other s |")
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        for tree_name in trees:
            cells = [_median(times[(case, tree_name)], k) for k in ("rows", "inverse", "statistic", "update", "other")]
            print(f"| {case} | {tree_name} | " + " | ".join("" if v is None else f"{v:.3f}" for v in cells) + " |")
    if args.rows_ratio:
        print()
        print("| case | tree | samples per pass | rows s | dense backward s | rows / backward |")
        print("|---|---|---|---|---|---|")
        for case in cases:
            for tree_name in trees:
                ratios = [r["ratio"] for r in times[(case, tree_name)] if r.get("ratio")]
                if not ratios:
                    continue
                rows_s = statistics.median(r["rows"] for r in ratios)
                back_s = statistics.median(r["backward"] for r in ratios)
                print(f"| {case} | {tree_name} | {ratios[0]['cut']} | {rows_s:.3f} | {back_s:.3f} | "
                      f"**{statistics.median(r['rows'] / r['backward'] for r in ratios):.2f}x** |")
    load_after = os.getloadavg()
    print(f"\nload average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f} "
          f"on {os.cpu_count()} CPUs, torch threads {_threads()}")


def _threads() -> int:
    import torch
    return torch.get_num_threads()


if __name__ == "__main__":
    main()
