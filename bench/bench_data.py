"""Images/s of the LMDB reader against the image-folder reader, over the same generated JPEGs.

    .venv/bin/python bench/bench_data.py [--images 600] [--size 320x240] [--workers 2]

Writes N ImageNet-like JPEGs into a temporary ImageFolder tree, converts it with
``data.lmdb_writer``, then times (1) reading the encoded bytes of every image in a shuffled order
and (2) the full evaluation pipeline (decode, Resize 256, CenterCrop 224, to float) through a
DataLoader, with 0 and with W workers. The files were just written, so they sit in the page cache:
the figures compare per-image overhead (open/stat/read vs one mapped file), not disk speed. On a
network or spinning disk the gap in (1) is much wider. Runs in well under a minute.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.file_dataset import FileImages  # noqa: E402
from data.image_folder import scan_image_folder  # noqa: E402
from data.imagenet import imagenet_transforms  # noqa: E402
from data.lmdb_reader import LmdbImages  # noqa: E402
from data.lmdb_writer import write_lmdb  # noqa: E402


def make_images(root: str, *, count: int, size: tuple[int, int], classes: int = 10) -> None:
    """JPEGs of smooth gradients plus noise: about the bytes per pixel of real photos."""
    rng = np.random.RandomState(0)
    w, h = size
    ramp = np.linspace(0, 200, w, dtype=np.float32)[None, :, None] + np.linspace(0, 50, h, dtype=np.float32)[:, None, None]
    for i in range(count):
        folder = os.path.join(root, f"class_{i % classes:03d}")
        os.makedirs(folder, exist_ok=True)
        pixels = np.clip(ramp + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        with open(os.path.join(folder, f"img_{i:05d}.JPEG"), "wb") as handle:
            handle.write(buffer.getvalue())


def _rate(count: int, seconds: float) -> float:
    return count / max(seconds, 1e-9)


def time_raw(dataset, order: list[int]) -> float:
    start = time.perf_counter()
    for index in order:
        dataset.raw(index)
    return _rate(len(order), time.perf_counter() - start)


def time_pipeline(dataset, *, workers: int, repeats: int, batch_size: int = 32) -> float:
    """Best pass of a DataLoader after one warm-up pass (which starts the persistent workers)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        persistent_workers=workers > 0)
    for _ in loader:
        pass
    best = 0.0
    for _ in range(repeats):
        count = 0
        start = time.perf_counter()
        for images, _ in loader:
            count += len(images)
        best = max(best, _rate(count, time.perf_counter() - start))
    return best


def run(*, images: int, size: tuple[int, int], workers: int, repeats: int = 3,
        directory: str | None = None) -> list[tuple]:
    """Rows (backend, stage, workers, images/s); each the best of ``repeats`` passes, since other
    processes on a shared machine only ever make a pass slower."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        tree, out = os.path.join(tmp, "train"), os.path.join(tmp, "train.lmdb")
        make_images(tree, count=images, size=size)
        listing = scan_image_folder(tree, fix="bench")
        write_lmdb(listing, out, progress=False)
        _, eval_tf = imagenet_transforms(size=224, normalize=False)
        backends = {"folder": FileImages(listing, transform=eval_tf),
                    "lmdb": LmdbImages(out, transform=eval_tf, num_classes=len(listing.classes))}
        order = torch.randperm(images, generator=torch.Generator().manual_seed(0)).tolist()
        rows = []
        for name, dataset in backends.items():
            time_raw(dataset, order[: min(50, images)])  # warm-up: page cache, LMDB handle
            rows.append((name, "read bytes (shuffled)", 0, max(time_raw(dataset, order) for _ in range(repeats))))
        for count in sorted({0, workers}):
            for name, dataset in backends.items():
                rows.append((name, "decode+resize+crop", count,
                             time_pipeline(dataset, workers=count, repeats=repeats)))
        folder_mb = sum(os.path.getsize(listing.path(i)) for i in range(len(listing))) / 1e6
        rows.append(("sizes", f"folder {folder_mb:.1f} MB, lmdb {os.path.getsize(out) / 1e6:.1f} MB", "", 0.0))
        return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--size", default="320x240", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per row; the best is reported")
    parser.add_argument("--dir", default=None, help="where to put the temporary files (default: system temp)")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(1)  # one core per process, as in a DataLoader worker: a fair comparison
    start = time.perf_counter()
    rows = run(images=args.images, size=(width, height), workers=args.workers, repeats=args.repeats,
               directory=args.dir)
    print(f"{args.images} JPEGs of {width}x{height}, {os.cpu_count()} CPUs, files in page cache, "
          f"best of {args.repeats} passes")
    print(f"{'backend':8} {'stage':24} {'workers':>7} {'images/s':>10}")
    for backend, stage, workers, rate in rows:
        if backend == "sizes":
            print(f"({stage})")
        else:
            print(f"{backend:8} {stage:24} {workers:>7} {rate:>10.0f}")
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
