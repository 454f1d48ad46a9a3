"""A torch.profiler summary of one HYDRA and one BiP training step: the top operators by time and the calls
that make the host wait for the device (stream/device synchronisations and device-to-host copies).

    python bench/profile_step.py [--arch ResNet50] [--image-size 224] [--batch-size 64] [--device cuda]
                                 [--out docs/profile_step.md]

Each step is warmed up for 3 steps, then 3 are profiled; the table lists the operators by self time on the
device (CUDA) or the CPU. Written as Markdown to --out (and the console), with the machine and the command.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_step import settings  # noqa: E402  (this folder is the script's first path entry)
from layers import MaskSet, to_masked  # noqa: E402
from models import build_model  # noqa: E402
from trainers.base import BaseTrainer  # noqa: E402
from trainers.bilevel import BilevelTrainer  # noqa: E402

# Names (substrings) of the runtime calls that wait for the device.
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "Memcpy DtoH",
         "cudaMemcpy ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ResNet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    x, x2 = torch.randn(*shape, generator=g).to(device), torch.randn(*shape, generator=g).to(device)
    y = torch.randint(0, args.classes, (args.batch_size,), generator=g).to(device)
    lines = [f"# One training step under torch.profiler: {args.arch}, {args.image_size}x{args.image_size}, batch "
             f"{args.batch_size}, {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
             f"torch {torch.__version__}", "",
             f"`python bench/profile_step.py --arch {args.arch} --image-size {args.image_size} --batch-size "
             f"{args.batch_size} --device {args.device}`", ""]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name in ("HYDRA", "BiP"):
        torch.manual_seed(0)
        model = build_model(args.arch, num_classes=args.classes).to(device)
        to_masked(model, granularity="unstructured")
        model.to(device)
        ms = MaskSet(model, k=0.05, granularity="unstructured", scope="global")
        if name == "HYDRA":
            trainer = BaseTrainer(model=model, maskset=ms, mode="prune", device=device, weight_optim=settings(0.1),
                                  progress=False)

            def step() -> None:
                trainer.step((x, y))
        else:
            trainer = BilevelTrainer(model=model, maskset=ms, mode="prune", device=device,
                                     weight_optim=settings(0.01), score_optim=settings(0.1), progress=False)

            def step() -> None:
                trainer.step(((x, y), (x2, y)))
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(3):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        events = prof.key_averages()
        waits = {e.key: e.count for e in events if any(s in e.key for s in SYNCS)}
        lines += [f"## {name} ({len(ms.layers)} masked layers), 3 steps", "",
                  "Calls that wait for the device: " + (", ".join(f"{k} x{v}" for k, v in waits.items()) or "none")
                  + (" (the profile's closing torch.cuda.synchronize is one of them)" if device.type == "cuda" else ""),
                  "", "```",
                  events.table(sort_by=sort, row_limit=args.rows), "```", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
