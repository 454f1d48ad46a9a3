"""The benchmark scripts keep running on the current tree (tiny settings; no timing is asserted)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bench import bench_decode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("source", ["lmdb", "folder"])
def test_bench_decode_measures_both_paths(tmp_path, source):
    rows = bench_decode.run(images=12, size=(64, 48), workers=0, batch_size=4, repeats=1,
                            device=torch.device("cpu"), directory=str(tmp_path), source=source)
    assert [(pipeline, path) for pipeline, path, _ in rows] == [
        ("train", "cpu"), ("eval", "cpu"), ("train", "device (cpu)"), ("eval", "device (cpu)")]
    assert all(rate > 0 for _, _, rate in rows)


def test_bench_amp_times_every_trainer_in_every_setting():
    done = subprocess.run([sys.executable, "bench/bench_amp.py", "--arch", "smallcnn", "--image-size", "8",
                           "--batch-size", "8", "--steps", "1", "--device", "cpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == [t for t in ("dense", "HYDRA", "BiP", "WoodFisher")
                                                                  for _ in range(4)]
