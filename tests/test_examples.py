"""examples/ keeps working: each example runs as a user runs it after `pip install -e .` (here the project
folder on PYTHONPATH stands in for the install), from another folder, and writes what it says."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The OBS path takes ~30 s on 2 CPU cores (whole-layer Fisher blocks of ResNet-18): slow; HYDRA runs by default.
@pytest.mark.parametrize("method", ["hydra", pytest.param("obs", marks=pytest.mark.slow)])
def test_prune_resnet18_example_runs_and_exports(method, tmp_path):
    out = tmp_path / "r18_slim.pt2"
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "prune_resnet18.py"), "--method", method,
                           "--steps", "2", "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "slimmed:" in done.stdout and "checked:" in done.stdout
    program = torch.export.load(str(out)).module()
    with torch.no_grad():
        assert program(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    # filter k = 0.5 per layer with the stem excluded: the slimmed network is much smaller than ResNet-18's 11.2M
    assert sum(p.numel() for p in program.parameters()) < 0.6 * 11_181_642
