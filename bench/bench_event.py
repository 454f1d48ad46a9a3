"""Time of one WoodFisher pruning event (gradients + inverse + statistic + selection + update), this
tree against another checkout of the project (e.g. the commit before a change), in one run.

    python bench/bench_event.py [--baseline /path/to/other/checkout] [--repeats 5] [--device auto] [--sum]

Cases:
- digits:   smallcnn on the Digits data, the shipped config's Fisher (m 64 x 8 samples, blocks of
            512, lambda 1e-5), one event from dense to 64.8 % sparsity;
- resnet20: resnet20s on CIFAR-shaped random images, m 64 x 8 samples, blocks of 1000 (the CIFAR-10
            config's block size), one event to 50 %.
- resnet50: ResNet-50 (torchvision's, ImageNet stem) on 224x224 random images (1000 classes), m 64 x 1 sample, blocks of 2000 (the
            ImageNet config's), one event to 50 % (for a GPU: pass --cases resnet50 --device cuda).
Each repeat runs every (case, tree) pair once in a fresh subprocess, round-robin, so that load from
other processes affects both trees alike; the table gives medians and the baseline/ours ratio.
Gradient collection time is reported separately where a tree logs it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "digits": dict(arch="smallcnn", dataset="digits", m=64, b=8, block=512, sparsity=0.6481, batch=64),
    "resnet20": dict(arch="resnet20s", dataset="random-cifar", m=64, b=8, block=1000, sparsity=0.5, batch=64),
    "resnet20-config": dict(arch="resnet20s", dataset="random-cifar", m=1000, b=1, block=1000, sparsity=0.5, batch=64),
    # the GPU figure: ResNet-50 at ImageNet size, m = 64, the ImageNet config's blocks of 2000
    "resnet50": dict(arch="ResNet50", dataset="random-imagenet", m=64, b=1, block=2000, sparsity=0.5, batch=64),
}


def worker(case: str, device: str, extra: dict | None = None) -> dict:
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
                   fisher_mini_bsz=c["b"], fittable_params=c["block"], fisher_damp=1e-5, **(extra or {}))
    try:  # typed options (this tree)
        from configs.options import WoodFisherOptions
        trainer = WoodFisherTrainer(model=model, maskset=ms, mode="prune", device=dev, weight_optim=settings,
                                    progress=False, options=WoodFisherOptions(**options))
    except ImportError:  # options by keyword (a tree from before configs/options.py)
        trainer = WoodFisherTrainer(model=model, maskset=ms, mode="prune", device=dev, weights=settings,
                                    progress=False, **options)
    record = trainer.prune_step(c["sparsity"], epoch=0, loaders=loaders)
    return {"seconds": record["seconds"], "grad_seconds": record.get("grad_seconds"),
            "sparsity": record["sparsity"]}


def run_in(tree: str, case: str, device: str, extra: dict | None = None) -> dict:
    code = (f"import sys; sys.path.insert(0, {tree!r}); sys.path.insert(1, {HERE + '/bench'!r}); "
            f"import os; os.chdir({tree!r}); import json, bench_event; "
            f"print(json.dumps(bench_event.worker({case!r}, {device!r}, {extra!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="another checkout of the project to compare with")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cases", default="digits,resnet20,resnet20-config")
    parser.add_argument("--sum", action="store_true",
                        help="also time this tree with --obs-solve sum (WoodFisher's summed update, no joint solve)")
    args = parser.parse_args()
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
                times[(case, tree_name)].append(run_in(tree, case, args.device, extra))
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


if __name__ == "__main__":
    main()
