"""Speed options (--amp, --channels-last) on the training steps of every trainer, as ratios measured in one process.

    python bench/bench_amp.py [--arch resnet18] [--batch-size 32] [--image-size 32] [--steps 5] [--device auto]
    python bench/bench_amp.py --arch ResNet50 --image-size 224 --classes 1000 --batch-size 64 --device cuda

For each trainer (dense = the plain training step of pretrain mode, HYDRA = base prune mode, BiP =
bilevel, WoodFisher = its weight step between pruning events) and each setting (float32, bf16
autocast, channels_last, bf16 + channels_last; fp16 too on CUDA), one trainer on its own copy of
the same model (masked: global unstructured k = 0.05); the steps of all settings are timed
round-robin (median of --steps after one warm-up), so load from other processes affects each alike.
Columns: images/s, the float32 step's time over the setting's (above 1 = faster) and the step's time
over the float32 DENSE step (the cost of pruning). The second command is the issue's GPU figure
(ResNet-50 at ImageNet size on synthetic tensors); the OBS step's time for it is
``python bench/bench_event.py --cases resnet50 --device cuda``.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_step import interleaved_medians  # noqa: E402
from configs.options import SpeedOptions  # noqa: E402
from engine.optim import OptimSettings  # noqa: E402
from layers import MaskSet, to_masked  # noqa: E402
from models import build_model  # noqa: E402
from trainers.base import BaseTrainer  # noqa: E402
from trainers.bilevel import BilevelTrainer  # noqa: E402
from trainers.woodfisher import WoodFisherTrainer  # noqa: E402
from configs.options import WoodFisherOptions  # noqa: E402


def settings(device: torch.device) -> dict[str, SpeedOptions]:
    out = {"float32": SpeedOptions(), "bf16": SpeedOptions(amp="bf16"),
           "channels-last": SpeedOptions(channels_last=True),
           "bf16 + channels-last": SpeedOptions(amp="bf16", channels_last=True)}
    if device.type == "cuda":
        out["fp16 (HYDRA only)"] = SpeedOptions(amp="fp16")
    return out


TRAINERS = ("dense", "HYDRA", "BiP", "WoodFisher")


def trainer(kind: str, base_model: torch.nn.Module, speed: SpeedOptions, device: torch.device) -> BaseTrainer:
    model = copy.deepcopy(base_model)
    sgd = OptimSettings(optimizer="sgd", lr=0.01, momentum=0.9, wd=5e-4, schedule="constant", epochs=2)
    if kind == "dense":
        return BaseTrainer(model=model.to(device), maskset=None, mode="pretrain", device=device, weight_optim=sgd,
                           progress=False, speed=speed)
    to_masked(model, granularity="unstructured")
    model.to(device)
    ms = MaskSet(model, k=0.05, granularity="unstructured", scope="global")
    if kind == "WoodFisher":
        return WoodFisherTrainer(model=model, maskset=ms, mode="prune", device=device, weight_optim=sgd,
                                 progress=False, speed=speed, options=WoodFisherOptions(prune_end=1))
    cls = BaseTrainer if kind == "HYDRA" else BilevelTrainer
    return cls(model=model, maskset=ms, mode="prune", device=device, weight_optim=sgd, score_optim=sgd,
               progress=False, speed=speed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(0)
    base_model = build_model(args.arch, num_classes=args.classes, in_channels=3, image_size=args.image_size)
    g = torch.Generator().manual_seed(0)

    def data() -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g),
                torch.randint(0, args.classes, (args.batch_size,), generator=g))

    b1, b2 = data(), data()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.arch}, batch {args.batch_size}, {args.image_size}x{args.image_size}, {name}, "
          f"torch {torch.__version__}; median of {args.steps} interleaved steps\n")
    print("| trainer | setting | step (s) | images/s | float32 / setting | x dense float32 step |")
    print("|---|---|---|---|---|---|")
    dense = None
    for kind in TRAINERS:
        fns = {}
        for name, speed in settings(device).items():
            if kind == "BiP" and speed.amp == "fp16":
                continue  # refused: BiP's autograd.grad gradients are not loss-scaled
            t = trainer(kind, base_model, speed, device)
            batch = (b1, b2) if kind == "BiP" else b1
            fns[name] = (lambda t=t, batch=batch: t.step(batch))
        medians = interleaved_medians(fns, args.steps, device)
        dense = dense or medians["float32"]
        for setting, seconds in medians.items():
            print(f"| {kind} | {setting} | {seconds:.3f} | {args.batch_size / seconds:.0f} | "
                  f"{medians['float32'] / seconds:.2f}x | {seconds / dense:.2f}x |")


if __name__ == "__main__":
    main()
