"""Images/s of the CPU data path (PIL in DataLoader workers) against the device path (--decode gpu).

    .venv/bin/python bench/bench_decode.py [--images 512] [--size 224x224] [--workers 2] [--device auto]

Writes N ImageNet-like JPEGs into train.lmdb/val.lmdb (``data.lmdb_writer``), builds ImageNet's
splits once, and times full passes of the training loader (RandomResizedCrop 224 + flip) and the
evaluation loader (Resize 256 + CenterCrop 224), normalized float batches, with the CPU path and
with the device path, in this process, so the ratio compares like with like. The device is CUDA
when present, else the CPU (then the figure is torchvision's CPU decoder plus float resampling in
the main process, not a GPU figure). CUDA passes end with a synchronize. Best of --repeats passes
after a warm-up pass (other processes on a shared machine only ever make a pass slower).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_data import make_images  # noqa: E402
from data import build_dataset, build_loaders  # noqa: E402
from data.gpu_decode import encoded_splits  # noqa: E402
from data.image_folder import scan_image_folder  # noqa: E402
from data.lmdb_writer import write_lmdb  # noqa: E402


def time_loader(loaders, name: str, *, device: torch.device, repeats: int) -> float:
    loader = getattr(loaders, name)

    def one_pass(epoch: int) -> float:
        loaders.set_epoch(epoch)  # the training stream's order and crops; evaluation has none
        count = 0
        start = time.perf_counter()
        for x, _ in loader:
            count += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return count / max(time.perf_counter() - start, 1e-9)

    one_pass(0)  # warm-up: page cache, workers, decoder handles, kernels
    return max(one_pass(1 + r) for r in range(repeats))


def run(*, images: int, size: tuple[int, int], workers: int, batch_size: int, repeats: int,
        device: torch.device, directory: str | None = None, source: str = "lmdb") -> list[tuple[str, str, float]]:
    """Rows (pipeline, path, images/s)."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        tree = os.path.join(tmp, "train")
        make_images(tree, count=images, size=size)
        listing = scan_image_folder(tree, fix="bench")
        if source == "lmdb":
            for name in ("train.lmdb", "val.lmdb"):
                write_lmdb(listing, os.path.join(tmp, name), progress=False)
        else:  # ImageNet's folder layout: DIR/train/<class>/ and DIR/val/<class>/ (the same images)
            os.symlink(tree, os.path.join(tmp, "val"))
        cpu = build_dataset("ImageNet", data_dir=tmp, normalize=True, num_classes=len(listing.classes))
        paths = {"cpu": cpu, f"device ({device.type})": encoded_splits(cpu, dataset="ImageNet", normalize=True,
                                                                        device=device)}
        rows = []
        for path, splits in paths.items():
            loaders = build_loaders(splits, batch_size=batch_size, test_batch_size=batch_size,
                                    num_workers=workers, pin_memory=device.type == "cuda")
            rows.append(("train", path, time_loader(loaders, "train", device=device, repeats=repeats)))
            rows.append(("eval", path, time_loader(loaders, "test", device=device, repeats=repeats)))
        return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", default="224x224", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of both paths")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per row; the best is reported")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument("--source", default="lmdb", choices=("lmdb", "folder"),
                        help="train.lmdb/val.lmdb, or ImageNet's class folders (no lmdb package needed)")
    parser.add_argument("--dir", default=None, help="where to put the temporary files (default: system temp)")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    width, height = (int(v) for v in args.size.lower().split("x"))
    start = time.perf_counter()
    rows = run(images=args.images, size=(width, height), workers=args.workers, batch_size=args.batch_size,
               repeats=args.repeats, device=device, directory=args.dir, source=args.source)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    print(f"{args.images} JPEGs of {width}x{height}, batch {args.batch_size}, {args.workers} workers, "
          f"{os.cpu_count()} CPUs, {name}, {args.source}, best of {args.repeats} passes")
    print("| pipeline | path | images/s | vs cpu |")
    print("|---|---|---|---|")
    baseline = {pipeline: rate for pipeline, path, rate in rows if path == "cpu"}
    for pipeline, path, rate in rows:
        print(f"| {pipeline} | {path} | {rate:,.0f} | {rate / baseline[pipeline]:.2f}x |")
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
