"""One training epoch of the embedded Digits data with 1 and with N gloo processes (torchrun), on CPU.

    python bench/bench_ddp.py [--trainer-config hydra] [--procs 2] [--repeats 3] [--epochs 2]

Each configuration runs ``train.py`` end to end (pretrain of smallcnn for the source once, then
the pruning run), rounds alternating between the configurations; the figure is the median over
--repeats of the LAST epoch's training+evaluation seconds (metrics.csv, column ``seconds``: the
first epoch pays for start-up), as images/s of the 1,257 training images, and the ratio to the
1-process run with the same number of threads in all (torchrun gives each process one thread).
Rows:
- 1 process, 1 thread      (the baseline of the ratio)
- 1 process, N threads     (what a plain ``python train.py`` uses on an N-core machine)
- N processes x 1 thread   (torchrun --nproc_per_node=N, gloo)
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_IMAGES = 1257  # Digits' training split


def train(args: list[str], *, procs: int, threads: int, result_dir: str) -> None:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
                if procs > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ROOT}
    done = subprocess.run([*launcher, "train.py", *args, "--result-dir", result_dir], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"train.py failed:\n{done.stderr[-2000:]}")


def last_epoch_seconds(result_dir: str) -> float:
    (path,) = glob.glob(os.path.join(result_dir, "**", "metrics.csv"), recursive=True)
    with open(path, encoding="utf-8") as fh:
        return float(list(csv.DictReader(fh))[-1]["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer-config", default="hydra", help="configs/Digits/<name>.yml (hydra, bip, ...)")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    opts = parser.parse_args()
    n = opts.procs
    with tempfile.TemporaryDirectory() as tmp:
        train(["--configs", "configs/Digits/pretrain.yml", "--epochs", "1", "--no-progress", "--device", "cpu"],
              procs=1, threads=n, result_dir=os.path.join(tmp, "source"))
        (source,) = glob.glob(os.path.join(tmp, "source", "**", "checkpoint.pth.tar"), recursive=True)
        args = ["--configs", f"configs/Digits/{opts.trainer_config}.yml", "--source-net", source, "--epochs",
                str(opts.epochs), "--no-progress", "--device", "cpu", "--print-freq", "1000"]
        rows = {"1 process, 1 thread": (1, 1), f"1 process, {n} threads": (1, n),
                f"{n} processes x 1 thread (gloo)": (n, 1)}
        seconds: dict[str, list[float]] = {name: [] for name in rows}
        for r in range(opts.repeats):
            for name, (procs, threads) in rows.items():
                out = os.path.join(tmp, f"{r}-{procs}-{threads}")
                train(args, procs=procs, threads=threads, result_dir=out)
                seconds[name].append(last_epoch_seconds(out))
    base = statistics.median(seconds["1 process, 1 thread"])
    print(f"Digits smallcnn, {opts.trainer_config}, batch 64 (global), last of {opts.epochs} epochs, "
          f"median of {opts.repeats}")
    print(f"{'configuration':<34} {'epoch s':>8} {'images/s':>9} {'speed-up':>9}")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:<34} {median:>8.2f} {TRAIN_IMAGES / median:>9.0f} {base / median:>8.2f}x")


if __name__ == "__main__":
    main()
