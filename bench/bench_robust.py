"""Cost of a robust training step against the natural one, as a ratio measured in the same process.

    python bench/bench_robust.py [--repeats 7] [--threads 1] [--device cpu]

One optimisation step of the base trainer (pretrain: every weight trained; prune: HYDRA's score step
at k = 0.1) on a fixed batch, for the natural, PGD-10 and TRADES-10 objectives (10 attack steps,
linf). The variants are timed round-robin (natural, pgd, trades, natural, ...) so that a slower
moment of a shared machine hits all of them alike; each figure is the median over --repeats rounds,
after one warm-up round. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from configs.options import RobustOptions  # noqa: E402
from engine.optim import OptimSettings  # noqa: E402
from layers import MaskSet, to_masked  # noqa: E402
from models import build_model  # noqa: E402
from trainers import get_trainer  # noqa: E402

CASES = [  # (arch, channels, image size, classes, batch)
    ("smallcnn", 1, 8, 10, 64),      # Digits, what the robust study trains
    ("resnet20s", 3, 32, 10, 128),   # CIFAR-10 shapes
]
OBJECTIVES = {
    "natural": RobustOptions(),
    "pgd": RobustOptions(objective="pgd", num_steps=10),
    "trades": RobustOptions(objective="trades", num_steps=10),
}


def trainer_for(arch, channels, size, classes, mode, robust, device):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=classes, in_channels=channels, image_size=size)
    maskset = None
    if mode == "prune":
        to_masked(model, granularity="unstructured")
        maskset = MaskSet(model, k=0.1, granularity="unstructured", scope="layer")
    model.to(device).train()
    settings = OptimSettings(optimizer="sgd", lr=0.01, momentum=0.9, wd=1e-4, schedule="constant", epochs=1)
    return get_trainer("base")(model=model, maskset=maskset, mode=mode, device=device, weight_optim=settings,
                               progress=False, log=lambda line: None, robust=robust)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {device}, median of {args.repeats}\n")
    print("| model (batch) | mode | objective | seconds per step | × natural |")
    print("|---|---|---|---|---|")
    for arch, channels, size, classes, batch in CASES:
        g = torch.Generator().manual_seed(1)
        data = (torch.rand(batch, channels, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
        for mode in ("pretrain", "prune"):
            trainers = {name: trainer_for(arch, channels, size, classes, mode, robust, device)
                        for name, robust in OBJECTIVES.items()}
            times: dict[str, list[float]] = {name: [] for name in trainers}
            for round_ in range(args.repeats + 1):
                for name, trainer in trainers.items():
                    sync(device)
                    t0 = time.perf_counter()
                    trainer.step(data)
                    sync(device)
                    if round_:  # round 0 warms up
                        times[name].append(time.perf_counter() - t0)
            base = statistics.median(times["natural"])
            for name, values in times.items():
                median = statistics.median(values)
                print(f"| {arch} ({batch}) | {mode} | {name}{'-10' if name != 'natural' else ''} | {median:.4f} | "
                      f"{median / base:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
