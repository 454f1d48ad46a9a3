"""Fixtures shared by the test files: one small pretrained Digits model per test session."""
import glob

import pytest

import train

FAST = ["--batch-size", "128", "--no-progress", "--data-fraction", "0.3", "--lr", "0.05"]


@pytest.fixture(scope="session")
def digits_pretrained(tmp_path_factory) -> str:
    """model_best.pth.tar of a 2-epoch smallcnn pretrain on 30 % of Digits (test top-1 well above chance)."""
    tmp = tmp_path_factory.mktemp("digits_pretrained")
    assert train.main(["--result-dir", str(tmp), "--exp-name", "p", "--epochs", "2", *FAST]) == 0
    return glob.glob(str(tmp / "p" / "pretrain" / "*" / "checkpoint" / "model_best.pth.tar"))[0]
