"""Fixtures shared by the test files: one pretrained Digits model per test session."""
import glob
import os

import pytest

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def digits_pretrained(tmp_path_factory) -> str:
    """model_best.pth.tar of smallcnn pretrained for 3 epochs with the shipped Digits config (about
    97 % test top-1: a real network to prune, a few seconds to make)."""
    tmp = tmp_path_factory.mktemp("digits_pretrained")
    assert train.main(["--configs", os.path.join(ROOT, "configs", "Digits", "pretrain.yml"), "--epochs", "3",
                       "--result-dir", str(tmp), "--exp-name", "p", "--no-progress"]) == 0
    return glob.glob(str(tmp / "p" / "pretrain" / "*" / "checkpoint" / "model_best.pth.tar"))[0]
