"""Fixtures shared by the test files: one pretrained Digits model per test session, train.py processes
without a start-up each; one CPU thread."""
import glob
import os

# One intra-op thread for the session and for the train.py processes it starts (they inherit the
# environment). The models here are tiny: a second thread buys nothing, and on a small machine shared
# with other jobs its synchronisation costs a lot (measured on 2 busy cores: the in-process
# trainer/solver/WoodFisher tests ran in 26 s with 2 threads, 2 s with 1). OMP_NUM_THREADS set by the
# caller wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

import train
from tests.helpers.processes import TrainProcesses

_threads = os.environ["OMP_NUM_THREADS"]
torch.set_num_threads(int(_threads) if _threads.isdigit() and int(_threads) > 0 else 1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def digits_pretrained(tmp_path_factory) -> str:
    """model_best.pth.tar of smallcnn pretrained for 3 epochs with the shipped Digits config (about
    97 % test top-1: a real network to prune, a few seconds to make)."""
    tmp = tmp_path_factory.mktemp("digits_pretrained")
    assert train.main(["--configs", os.path.join(ROOT, "configs", "Digits", "pretrain.yml"), "--epochs", "3",
                       "--result-dir", str(tmp), "--exp-name", "p", "--no-progress"]) == 0
    return glob.glob(str(tmp / "p" / "pretrain" / "*" / "checkpoint" / "model_best.pth.tar"))[0]


@pytest.fixture(scope="session")
def train_processes():
    """``python train.py ...`` runs as processes of their own, forked from one Python that imported
    train once (tests/helpers/processes.py): ~2.5 s less start-up each."""
    processes = TrainProcesses()
    yield processes
    processes.close()
