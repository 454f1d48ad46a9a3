"""Several processes (torchrun, gloo on CPU) give the run one process gives with the same global batch.

The end-to-end tests launch ``python -m torch.distributed.run --nproc_per_node=2 train.py`` on the
embedded Digits data with LeNet-5 (no BatchNorm: on CPU, gloo has no SyncBatchNorm, so a BatchNorm
network would normalise each rank's slice on its own and legitimately differ). The training split
has 1257 images, so the last batch of 64 has 41: the ranks get 21 and 20 samples and the loss
scaling of uneven slices is exercised every epoch.
"""
from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn

from configs.errors import RunStopped, UserError
from configs.schema import Options, read_options
from data.loaders import build_loaders, check_rank_batches
from data.registry import DatasetSplits
from data.sampling import EpochSampler, RankBatches, shard
from engine.checkpoint import load_checkpoint
from engine.distributed import Dist, mask_checksum
from tests.helpers.tiny import KeyedTensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--arch", "lenet5", "--batch-size", "64", "--no-progress", "--device", "cpu"]


# -- the global batch, split by rank ------------------------------------------------------------
@pytest.mark.parametrize("n,batch,world", [(10, 4, 2), (37, 8, 3), (37, 8, 1), (64, 64, 2), (41, 16, 4)])
def test_rank_slices_make_up_the_global_batches(n, batch, world):
    sampler = EpochSampler(range(n), seed=3, stream=0)
    for epoch in (0, 5):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        whole = [keys[b:b + batch] for b in range(0, n, batch)]  # DataLoader(sampler, batch_size=batch)
        slices = []
        for rank in range(world):
            sampler.set_epoch(epoch)
            batches = RankBatches(sampler, batch_size=batch, rank=rank, world=world)
            slices.append(list(batches))
            assert len(batches) == len(whole)
        for b, global_batch in enumerate(whole):
            parts = [slices[rank][b] for rank in range(world)]
            assert sum(parts, []) == global_batch  # rank order, contiguous: the same samples, same order
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1


def test_shard_blocks_cover_once():
    for n, world in [(7, 3), (64, 2), (5, 5), (100, 8)]:
        blocks = [shard(n, r, world) for r in range(world)]
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))


def test_a_rank_without_samples_is_refused():
    with pytest.raises(UserError, match=r"--batch-size 2 \(the global batch\) is smaller than the 4 processes"):
        check_rank_batches(2, world=4, streams={"training images": 100})
    with pytest.raises(UserError, match=r"last batch of the 65 training images has 1 sample\(s\), fewer than the 2 "
                                        r"processes.*e\.g\. 63"):
        check_rank_batches(64, world=2, streams={"training images": 65})
    check_rank_batches(64, world=2, streams={"training images": 66})  # 2 left: one each


def test_stream_skip_starts_at_that_sample():
    x = torch.arange(50, dtype=torch.float32).view(50, 1)
    data = KeyedTensors(x, torch.zeros(50, dtype=torch.int64))
    loaders = build_loaders(DatasetSplits(train=data, val=None, test=data, num_classes=2, in_channels=1,
                                          image_size=1), batch_size=8, test_batch_size=8, seed=1)
    whole = torch.cat([b[0] for _, b in zip(range(20), loaders.stream(9, epoch=2, batch_size=7))])
    for skip in (0, 5, 49, 50, 73):
        part = torch.cat([b[0] for _, b in zip(range(5), loaders.stream(9, epoch=2, batch_size=7, skip=skip))])
        assert torch.equal(part, whole[skip:skip + len(part)])


def test_mask_checksum_sees_a_moved_weight():
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[1, 2] = mask[3, 4] = True
    moved = mask.clone()
    moved[3, 4], moved[3, 3] = False, True
    assert mask_checksum(mask) == mask_checksum(mask.clone())
    assert mask_checksum(mask)[0] == mask_checksum(moved)[0] and mask_checksum(mask) != mask_checksum(moved)


def _options(*args: str) -> Options:
    return read_options(["--configs", "configs/Digits/woodfisher.yml", "--source-net", "dense.pth.tar", *args])


def _check_processes(cfg, backend):
    from configs.checks import check_run
    from trainers import TRAINERS
    check_run(cfg, trainer=TRAINERS.get(cfg.trainer), registry=TRAINERS.items(), world=2, backend=backend)


@pytest.mark.parametrize("args,needle", [
    (("--val-method", "smooth", "--noise-std", "0.25", "--no-normalize"), "--val-method smooth certifies"),
    (("--fisher-subsample-size", "1"), "--fisher-subsample-size 1 rows cannot be shared by 2 processes"),
])
def test_what_several_processes_cannot_do_is_refused(args, needle):
    with pytest.raises(UserError, match=needle):
        _check_processes(_options(*args).config(), "gloo")


def test_offloaded_fisher_rows_are_refused_with_nccl_only():
    cfg = _options("--offload-grads").config()
    _check_processes(cfg, "gloo")  # CPU tensors: gloo gathers them
    with pytest.raises(UserError, match="--offload-grads keeps the Fisher rows in host memory, which NCCL cannot"):
        _check_processes(cfg, "nccl")


# -- the collectives, in a real two-process gloo group ------------------------------------------
def _collectives(rank: int, world: int, init: str) -> None:
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    group = Dist(rank=rank, world=world, backend="gloo")
    try:
        # gather_rows: rank r's block of 5 rows, in rank order
        start, stop = shard(5, rank, world)
        rows = torch.arange(5 * 3, dtype=torch.float32).view(5, 3)
        assert torch.equal(group.gather_rows(rows[start:stop].clone(), 5), rows)
        # reduce_mean: means over 3 and 1 samples -> the mean over 4
        counts, means = (3, 1), ({"top1": 100.0, "loss": 1.0}, {"top1": 0.0, "loss": 5.0})
        assert group.reduce_mean(means[rank], counts[rank]) == {"top1": 75.0, "loss": 2.0}
        # loss_scale: n_local * world / n_global, so that DDP's mean is the global mean
        assert torch.equal(group.loss_scale(counts[rank], torch.device("cpu")),
                           torch.tensor([counts[rank] * 2 / 4]))
        # broadcast_state: rank 0's weights and (bool) masks everywhere
        layer = nn.Linear(3, 2)
        layer.register_buffer("mask", torch.tensor([[rank == 0, True, False]] * 2))
        with torch.no_grad():
            layer.weight.fill_(rank + 1.0)
        group.broadcast_state(layer)
        assert torch.equal(layer.weight, torch.ones(2, 3))
        assert layer.mask.dtype == torch.bool and bool(layer.mask[0, 0])
        # average_buffers: BatchNorm statistics averaged, the number of batches untouched
        bn = nn.BatchNorm1d(2)
        bn.running_mean.fill_(float(rank))
        group.average_buffers(bn)
        assert torch.equal(bn.running_mean, torch.full((2,), 0.5)) and int(bn.num_batches_tracked) == 0
        # check_masks: equal passes, a rank-local change stops every rank
        same = {"a": torch.tensor([True, False, True])}
        group.check_masks(same, epoch=1)
        other = {"a": torch.tensor([True, rank == 1, True])}
        with pytest.raises(RunStopped, match=r"the masks of rank\(s\) 1 differ from rank 0's after epoch 2"):
            group.check_masks(other, epoch=2)
    finally:
        tdist.destroy_process_group()


def test_collectives_of_a_two_process_group(tmp_path):
    # forked, not spawned: a spawned process imports torch and this module again (~3 s)
    mp.start_processes(_collectives, args=(2, f"file://{tmp_path / 'store'}"), nprocs=2, join=True,
                       start_method="fork")


# -- whole runs: torchrun with 2 processes against 1 process ------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _train(*args: str, procs: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    return subprocess.run([*launcher, "train.py", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _train_here(*args: str) -> str:
    """The one-process run in this process (train.main, cwd the project folder as _train's): the same
    run as ``python train.py`` without its ~3 s of interpreter and torch start-up. Its stdout."""
    import train
    from io import StringIO
    out = StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out):
        code = train.main(list(args))
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


def _checkpoint(result_dir) -> dict:
    found = glob.glob(os.path.join(str(result_dir), "**", "checkpoint", "checkpoint.pth.tar"), recursive=True)
    assert len(found) == 1, found
    return load_checkpoint(found[0])


def assert_same_run(a: dict, b: dict, *, atol: float = 1e-5) -> None:
    assert a["epoch"] == b["epoch"]
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]), name
    for key, value in a["state_dict"].items():
        if value.is_floating_point():
            torch.testing.assert_close(b["state_dict"][key], value, atol=atol, rtol=0, msg=key)
        else:
            assert torch.equal(b["state_dict"][key], value), key
    assert [row["val_top1"] for row in a["history"]] == pytest.approx([row["val_top1"] for row in b["history"]])


@pytest.fixture(scope="module")
def lenet_source(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("lenet_source")
    _train_here("--configs", "configs/Digits/pretrain.yml", *COMMON, "--epochs", "2", "--lr", "0.05",
                "--rewind-epoch", "1", "--result-dir", str(out))  # LTH rewinds to epoch 1
    return glob.glob(os.path.join(str(out), "**", "checkpoint", "checkpoint.pth.tar"), recursive=True)[0]


RUNS = {
    "hydra": ["--configs", "configs/Digits/hydra.yml", "--epochs", "1", "--k", "0.2"],
    # lr2 1: the implicit term -lr2 * g_s * g_theta weighs as much as g_s (the config's 1e-4 would hide it)
    "bip": ["--configs", "configs/Digits/bip.yml", "--epochs", "1", "--k", "0.2", "--lr2", "1"],
    "woodfisher": ["--configs", "configs/Digits/woodfisher.yml", "--epochs", "2", "--prune-start", "0",
                   "--prune-end", "1", "--prune-freq", "1", "--k", "0.2"],
    "lth": ["--configs", "configs/Digits/lth.yml", "--epochs", "2", "--k", "0.64"],  # two rounds of one epoch
}


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_train_the_model_one_process_trains(tmp_path, lenet_source, name):
    args = [*RUNS[name], *COMMON, "--source-net", lenet_source]
    one = _train_here(*args, "--result-dir", str(tmp_path / "one"))  # exit 0 checked there
    two = _train(*args, "--result-dir", str(tmp_path / "two"), procs=2)
    assert two.returncode == 0, two.stderr
    assert "x 2 processes (gloo)" in two.stdout
    assert two.stdout.count("done: prune") == 1  # rank 0 alone prints
    assert "x 2 processes (gloo)" not in one
    assert len(os.listdir(tmp_path / "two")) == 1  # one run folder, written by rank 0
    assert_same_run(_checkpoint(tmp_path / "one"), _checkpoint(tmp_path / "two"))
    if name == "woodfisher":  # every event's m counts global samples: the same 64 rows, split 32 + 32
        assert "m 64 x 8 samples" in two.stdout


def test_bad_input_under_torchrun_is_one_line_per_process(tmp_path, lenet_source):
    done = _train("--configs", "configs/Digits/woodfisher.yml", *COMMON, "--fisher-subsample-size", "1",
                  "--source-net", lenet_source, "--result-dir", str(tmp_path), procs=2)
    assert done.returncode != 0
    ours = sorted(line for line in done.stderr.splitlines() if line.startswith("error"))
    text = "--fisher-subsample-size 1 rows cannot be shared by 2 processes: use at least 2"
    assert ours == [f"error (rank 1): {text}", f"error: {text}"]
    assert not os.listdir(tmp_path)


# Bad input that one rank alone sees (its node's copy of a file): a sitecustomize makes rank 1 fail there.
RANK1_FAILS = {
    "options": ("import configs.schema as where\nname = 'read_options'\n",
                "stopped before the run began: torchrun ends every process"),
    "data": ("import data as where\nname = 'build_dataset'\n", "error: rank 0 lost the other processes"),
}


@pytest.mark.parametrize("stage", list(RANK1_FAILS))
def test_bad_input_on_one_rank_stops_every_rank_each_with_its_line(tmp_path, stage):
    """Before joining the group (its options) or after (its data): rank 1's line, then rank 0's own line
    (it was not left waiting for a rank that never comes until torchrun's SIGKILL, 30 s later), and no
    run folder."""
    where, rank0 = RANK1_FAILS[stage]
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('RANK') == '1':\n"
        "    from configs.errors import UserError\n"
        + "".join(f"    {line}\n" for line in where.splitlines())
        + "    def fail(*args, **kwargs):\n        raise UserError('only rank 1 sees this (test): fix it')\n"
        "    setattr(where, name, fail)\n")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*launcher, "train.py", "--configs", "configs/Digits/pretrain.yml", *COMMON, "--epochs", "1",
                           "--result-dir", str(tmp_path / "res")], cwd=ROOT, capture_output=True, text=True,
                          env={**_env(), "PYTHONPATH": f"{tmp_path / 'site'}:{ROOT}"}, timeout=120)
    ours = [line for line in done.stderr.splitlines() if line.startswith(("error", "stopped"))]
    assert done.returncode != 0 and len(ours) == 2, done.stderr[-3000:]
    assert "error (rank 1): only rank 1 sees this (test): fix it" in ours
    assert any(line.startswith(rank0) and "nothing was written" in line for line in ours), ours
    assert not (tmp_path / "res").exists()


def _ranks(parent: int) -> dict[int, int]:
    """{rank: pid} of torchrun's workers (children of its agent process)."""
    found = {}
    for pid in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if b"RANK" in env:
            found[int(env[b"RANK"])] = int(pid)
    return found


@pytest.mark.slow
def test_a_dead_rank_stops_the_others_and_torchrun_restarts_the_run_where_it_was(tmp_path, lenet_source):
    """SIGKILL one of two processes after the first checkpoint: the other stops with one line (no hang),
    torchrun --max-restarts starts both again, --resume auto continues the run in the same folder, and
    it ends with the masks and weights of an uninterrupted run."""
    args = [*RUNS["hydra"][:2], *COMMON, "--epochs", "3", "--k", "0.2", "--source-net", lenet_source,
            "--resume", "auto", "--dist-timeout", "60"]
    reference = _train(*args, "--result-dir", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "--max-restarts=1", "train.py"]
    proc = subprocess.Popen([*launcher, *args, "--result-dir", str(out)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not glob.glob(os.path.join(str(out), "**", "checkpoint.pth.tar"), recursive=True):
            assert proc.poll() is None and time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.05)
        killed_at = _checkpoint(out)["epoch"]
        os.kill(_ranks(proc.pid)[1], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    # the survivor's one line: it lost the dead rank in a collective, or torchrun stopped it first
    assert "error: rank 0 lost the other processes" in stderr or "stopped: torchrun ends every process" in stderr
    assert killed_at < 3 and "--resume auto: continuing" in stdout
    assert len(os.listdir(next(iter(glob.glob(os.path.join(str(out), "*", "prune")))))) == 2  # one run (+ claim)
    assert_same_run(_checkpoint(tmp_path / "ref"), _checkpoint(out))
