"""The benchmark scripts keep running on the current tree (tiny settings; no timing is asserted)."""
from __future__ import annotations

import os
import runpy
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


def test_bench_amp_times_every_trainer_in_every_setting(monkeypatch, capsys):
    # The script run as a program (its __main__ block and sys.path set-up), in this process: no
    # interpreter and torch start-up (~3 s).
    script = os.path.join(ROOT, "bench", "bench_amp.py")
    monkeypatch.setattr(sys, "argv", [script, "--arch", "smallcnn", "--image-size", "8", "--batch-size", "8",
                                      "--steps", "1", "--device", "cpu"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the project folder first
    monkeypatch.chdir(ROOT)
    runpy.run_path(script, run_name="__main__")
    stdout = capsys.readouterr().out
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == [t for t in ("dense", "HYDRA", "BiP", "WoodFisher")
                                                                  for _ in range(4)]


def test_bench_models_counts_coverage_and_slims_without_torch_pruning():
    """bench_models' own parts (Torch-Pruning is a benchmark-only dependency, not installed by CI)."""
    from bench import bench_models
    from pruning.cost import model_cost

    c = bench_models.coverage("mobilenet_cifar", side=8, classes=10)
    assert c["layers"] == 28 and 0.99 < c["covered"] < 1 and c["sparsity_masked"] == 0.5
    dense = bench_models.build_model("mobilenet_cifar", num_classes=10, image_size=8).eval()
    example = torch.randn(1, 3, 8, 8)
    ours = bench_models.ours_slimmed(dense, example=example)
    assert model_cost(ours, example=example).flops_total < 0.6 * model_cost(dense, example=example).flops_total
    coupled = bench_models.ours_slimmed(dense, example=example, coupled=True)
    assert model_cost(coupled, example=example).flops_total < 0.3 * model_cost(dense, example=example).flops_total
    assert bench_models.classifier(dense) is dense.fc
