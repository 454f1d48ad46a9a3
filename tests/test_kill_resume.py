"""SIGKILL at any point, then the same ``--resume auto`` command: the run ends as if never interrupted.

A job is run once uninterrupted (folder A), then again (folder B) as a child process that is killed
with SIGKILL (nothing of the run can react to it: no handler, no cleanup) and restarted with the very
same command until it finishes. B's starts are forks of the test process that run ``train.main``
with the command's arguments: every kill point lies after start-up, and a fork has the modules
imported already (a ``python train.py`` spends ~3 s importing torch before the first point, five
times over); A, run alongside, is the command itself, ``python train.py``. The kill points come from ``random.Random(seed)`` and are positions
in the run, not wall-clock delays, so every run of the test kills at the same places. The child runs in
slices of a millisecond, stopped (SIGSTOP) between them while the test reads its output and looks at
its folder (``Child``), so what the test sees is still true when the SIGKILL arrives, on a loaded
machine too:

- as soon as the run folder exists (``run folder:`` is printed after config.yml is written), before
  the first checkpoint: the restart must take that folder over, not start a second run;
- in the middle of a pruning trainer's epoch (after its ``epoch E [B/N]`` line; for WoodFisher after
  the epoch's pruning event, whose masks and update are then lost and must be redone identically);
- while checkpoint.pth.tar is being written: after an epoch's summary line the checkpoint folder is
  looked at after every slice for the atomic writer's temporary file (``engine.checkpoint.TMP_PREFIX``
  + random + ``-checkpoint.pth.tar``) and the child is killed the moment it is there; that the
  temporary file is still there after the kill proves the kill landed inside the write.

B must then equal A: the final checkpoint (and model_best) key by key with ``torch.equal`` (weights,
scores, masks, both optimizers, RNG state, history rows except their ``seconds``), metrics.csv with
each epoch once, summary.json except its time and path fields, no temporary file anywhere and a
single run folder.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch

import train
from engine.checkpoint import load_checkpoint
from engine.files import TMP_PREFIX
from tests.helpers.cli import interrupt_at
from trainers.base import BaseTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3
BATCHES = 12  # Digits, --data-fraction 0.3, --batch-size 32: 12 training batches an epoch
COMMON = ["--epochs", str(EPOCHS), "--data-fraction", "0.3", "--batch-size", "32", "--print-freq", "1",
          "--no-progress", "--exp-name", "k", "--resume", "auto"]
CASES = {
    # HYDRA: weights frozen, the scores (and so the masks) are what every step changes
    "hydra": ["--configs", os.path.join(ROOT, "configs", "Digits", "hydra.yml")],
    # WoodFisher: an OBS pruning event at the start of every epoch (5 % -> 79 % -> 90 %), training between
    "woodfisher": ["--configs", os.path.join(ROOT, "configs", "Digits", "woodfisher.yml"), "--prune-end", "2",
                   "--prune-freq", "1", "--fisher-subsample-size", "16"],
}
TIME_FIELDS = {"seconds"}  # history / metrics.csv: wall-clock
SUMMARY_VOLATILE = {"wall_seconds", "train_seconds", "finished_at", "run_dir"}  # time and path fields
LIMIT = 300  # seconds a child may take: a hang fails the test instead of blocking the suite
SLICE = 0.001  # seconds a stepped child runs between two looks


@dataclass(frozen=True)
class Kill:
    kind: str  # "folder" | "step" | "write"
    epoch: int = 0  # step: 0-based epoch of the batch line; write: 1-based epoch whose checkpoint is written
    batch: int = 0

    def __str__(self) -> str:
        return {"folder": "once the run folder exists, before any checkpoint",
                "step": f"in epoch {self.epoch} after batch {self.batch}",
                "write": f"while checkpoint.pth.tar of epoch {self.epoch} is written"}[self.kind]


def kill_plan(seed: int) -> list[Kill]:
    """Reachable in this order: each kill lies at or after the epoch the previous one resumes from."""
    rng = random.Random(seed)
    step = rng.randrange(1, EPOCHS)  # a pruning step after at least one checkpoint (epoch 0 is the folder kill's)
    write = rng.randrange(step + 1, EPOCHS + 1)  # the redone epoch `step` or a later one
    late = rng.randrange(write - 1, EPOCHS)  # the epoch the write kill resumes at, or a later one
    return [Kill("folder"), Kill("step", step, rng.randrange(1, BATCHES)), Kill("write", write),
            Kill("step", late, rng.randrange(1, BATCHES))]


def command(case: str, source: str, result_dir: str) -> list[str]:
    return [sys.executable, "train.py", *CASES[case], "--source-net", source, "--result-dir", result_dir, *COMMON]


def run_dirs(result_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(result_dir, "k", "prune", "*")))  # hidden .N.claim files excluded


def temp_files(folder: str) -> list[str]:
    return glob.glob(os.path.join(folder, "**", TMP_PREFIX + "*"), recursive=True)


def run_forked(cmd: list[str], stdout: int, stderr: int) -> None:
    """In a forked child: ``python train.py ARGS`` as train.main(ARGS), stdout and stderr on the given
    descriptors, unbuffered (PYTHONUNBUFFERED), from the project folder; never returns."""
    code = 70
    try:
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(ROOT)
        assert cmd[:2] == [sys.executable, "train.py"], cmd
        code = train.main(cmd[2:])
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # a child must never return into pytest
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


class Child:
    """A train.py child that runs only in slices of about ``SLICE`` seconds: between slices it is stopped
    (SIGSTOP, and waited for until it is), its output is read and its folder looked at. Whatever the
    test sees, the child is still at that point when it is killed, however loaded the machine: a
    checkpoint write (about 16 ms of the child's time here) spans many slices, so its temporary file
    cannot be missed. The child is a fork of this process running ``cmd`` (see run_forked)."""

    def __init__(self, cmd: list[str], log) -> None:
        read, write = os.pipe()
        log.flush()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            run_forked(cmd, write, log.fileno())
        os.close(write)
        self.pid = pid
        self.returncode: int | None = None
        self.fd = read
        os.set_blocking(self.fd, False)
        self.pending = b""
        self.lines: list[str] = []

    def step(self) -> bool:
        """Let the child run one slice and stop it; False once it has ended (its exit code is kept)."""
        os.kill(self.pid, signal.SIGCONT)
        time.sleep(SLICE)
        os.kill(self.pid, signal.SIGSTOP)  # a child that just ended is a zombie: no error
        _, status = os.waitpid(self.pid, os.WUNTRACED)
        if os.WIFSTOPPED(status):
            return True
        self.returncode = os.waitstatus_to_exitcode(status)
        return False

    def read(self) -> list[str]:
        """The complete lines written since the last call (all of them: the child is stopped)."""
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.pending += chunk
        *done, self.pending = self.pending.split(b"\n")
        lines = [line.decode() for line in done]
        self.lines += lines
        return lines

    def finish(self) -> int:
        """Let the child run to its end (at most LIMIT seconds); its exit code (its lines: ``lines``)."""
        deadline = time.monotonic() + LIMIT
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            self.read()
            if pid:
                break
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the last restart did not end within {LIMIT} s")
            time.sleep(0.01)
        self.read()
        os.close(self.fd)
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        _, status = os.waitpid(self.pid, 0)
        assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
        self.read()
        os.close(self.fd)


def checkpoint_being_written(result_dir: str) -> bool:
    """The atomic writer's temporary file of checkpoint.pth.tar is in a run's checkpoint folder."""
    return any(os.path.basename(path).endswith("-checkpoint.pth.tar")
               for path in glob.glob(os.path.join(result_dir, "k", "prune", "*", "checkpoint", TMP_PREFIX + "*")))


def kill_at(child: Child, kill: Kill, result_dir: str) -> None:
    """Step the child to ``kill``'s point and SIGKILL it there."""
    step_line = re.compile(rf"^epoch {kill.epoch} \[{kill.batch}/")
    epoch_line = re.compile(rf"^epoch +{kill.epoch}/{EPOCHS} ")
    summary_seen = False  # write kill: the epoch's summary line is out, its checkpoint writes follow
    deadline = time.monotonic() + LIMIT
    while child.step():
        for line in child.read():
            if (kill.kind == "folder" and line.startswith("run folder: ")) or \
                    (kill.kind == "step" and step_line.match(line)):
                child.kill()
                return
            summary_seen = summary_seen or (kill.kind == "write" and bool(epoch_line.match(line)))
        if summary_seen and checkpoint_being_written(result_dir):
            child.kill()
            return
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"the child did not reach the kill point ({kill}) within {LIMIT} s")
    raise AssertionError(f"the run ended (exit {child.returncode}) before the kill {kill}")


def check_killed_there(kill: Kill, result_dir: str) -> None:
    """What the kill left proves where it landed."""
    folders = run_dirs(result_dir)
    assert len(folders) == 1, folders  # a restart continues the run: never a second folder
    ckpt = os.path.join(folders[0], "checkpoint", "checkpoint.pth.tar")
    if kill.kind == "folder":
        assert os.path.isfile(os.path.join(folders[0], "config.yml")) and not os.path.exists(ckpt)
    if kill.kind == "write":  # killed inside the write: its temporary file is left, the previous checkpoint whole
        assert checkpoint_being_written(result_dir)
        assert load_checkpoint(ckpt)["epoch"] == kill.epoch - 1
    if kill.kind == "step":  # killed mid-epoch: the checkpoint is the previous epoch's
        assert load_checkpoint(ckpt)["epoch"] == kill.epoch


def killed_run(cmd: list[str], result_dir: str, kills: list[Kill], log) -> list[str]:
    """Start ``cmd``, SIGKILL it at each point of ``kills`` in turn, restarting it with the same command,
    until it finishes; returns its stdout lines."""
    out: list[str] = []
    for kill in kills:
        child = Child(cmd, log)
        kill_at(child, kill, result_dir)
        out += child.lines
        check_killed_there(kill, result_dir)
    last = Child(cmd, log)  # never stopped: it runs to the end
    assert last.finish() == 0, f"the last restart failed, see {log.name}"
    return out + last.lines


def assert_same(a, b, where: str = "checkpoint") -> None:
    """Equal structure, tensors ``torch.equal`` (dtype and shape included), everything else ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def comparable(ckpt: dict) -> dict:
    """A checkpoint less what differs between two folders of the same run: the result dir it was
    given, the checkpoint a restart resumed from (run control) and the wall-clock seconds of each
    history row."""
    return {**ckpt, "config": {k: v for k, v in ckpt["config"].items() if k not in ("result_dir", "resume")},
            "history": [{k: v for k, v in row.items() if k not in TIME_FIELDS} for row in ckpt["history"]]}


def csv_rows(run_dir: str) -> list[dict[str, str]]:
    with open(os.path.join(run_dir, "metrics.csv"), newline="", encoding="utf-8") as fh:
        return [{k: v for k, v in row.items() if k not in TIME_FIELDS} for row in csv.DictReader(fh)]


@pytest.mark.parametrize("case", [
    "hydra",
    # ~25 s each on 2 cores (the pair over the default run's share): the same kills, another trainer
    pytest.param("woodfisher", marks=pytest.mark.slow),
])
def test_sigkill_anywhere_then_resume_auto_ends_as_the_uninterrupted_run(tmp_path, digits_pretrained, case):
    seed = {"hydra": 11, "woodfisher": 12}[case]
    kills = kill_plan(seed)
    a_dir, b_dir = str(tmp_path / "a"), str(tmp_path / "b")
    with open(tmp_path / "stderr.txt", "w") as log:
        # The uninterrupted run alongside (a child uses one thread): the test takes one run's time less.
        reference = subprocess.Popen(command(case, digits_pretrained, a_dir), cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=log)
        try:
            out = killed_run(command(case, digits_pretrained, b_dir), b_dir, kills, log)
        finally:
            assert reference.wait(timeout=LIMIT) == 0, f"see {log.name}"
    [a_run], [b_run] = run_dirs(a_dir), run_dirs(b_dir)  # one folder each: every restart continued B's run
    assert not temp_files(b_run) and not temp_files(a_run)
    # The start after the first kill took its folder over; later ones continued from its checkpoints
    assert sum(line.startswith("--resume auto: starting again in ") for line in out) == 1
    assert sum(line.startswith("--resume auto: continuing ") for line in out) == len(kills) - 1

    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        a = load_checkpoint(os.path.join(a_run, "checkpoint", name))
        b = load_checkpoint(os.path.join(b_run, "checkpoint", name))
        if name == "checkpoint.pth.tar":
            assert a["epoch"] == b["epoch"] == EPOCHS
            assert [row["epoch"] for row in b["history"]] == list(range(1, EPOCHS + 1))
            assert set(b["masks"])  # a pruned run: its masks are compared below
        assert_same(comparable(a), comparable(b), name)  # state_dict, masks, optimizers, rng, history

    rows = csv_rows(b_run)
    assert [int(row["epoch"]) for row in rows] == list(range(1, EPOCHS + 1))  # each epoch exactly once
    assert rows == csv_rows(a_run)

    a_summary = json.load(open(os.path.join(a_run, "summary.json")))
    b_summary = json.load(open(os.path.join(b_run, "summary.json")))
    assert set(a_summary) == set(b_summary) and SUMMARY_VOLATILE <= set(a_summary)
    assert {k: v for k, v in a_summary.items() if k not in SUMMARY_VOLATILE} == \
        {k: v for k, v in b_summary.items() if k not in SUMMARY_VOLATILE}
    assert b_summary["run_dir"] == b_run and b_summary["trainer"] == {"hydra": "base"}.get(case, case)


def test_kill_plan_is_fixed_by_the_seed_and_reachable():
    """The kill points are the same on every run, and each is reachable after the previous restart."""
    for seed in range(200):
        kills = kill_plan(seed)
        assert kills == kill_plan(seed) and [k.kind for k in kills] == ["folder", "step", "write", "step"]
        folder, step, write, late = kills
        assert 1 <= step.epoch < EPOCHS and step.epoch < write.epoch <= EPOCHS  # resumes at step.epoch
        assert write.epoch - 1 <= late.epoch < EPOCHS  # resumes at write.epoch - 1
        assert 1 <= step.batch < BATCHES and 1 <= late.batch < BATCHES


# -- --resume auto after a start killed before its first checkpoint (in process: a Ctrl-C in epoch 1) ------
FAST = ["--epochs", "2", "--batch-size", "128", "--no-progress", "--data-fraction", "0.3", "--exp-name", "t",
        "--resume", "auto"]


def test_resume_auto_starts_again_in_the_folder_a_killed_first_start_left(tmp_path, monkeypatch, capsys):
    run = [*FAST, "--result-dir", str(tmp_path)]
    restore = interrupt_at(monkeypatch, BaseTrainer, 0)
    assert train.main(run) == 130  # stopped in epoch 1: a folder with config.yml and no checkpoint
    [left] = run_dirs_of(tmp_path)
    assert os.path.isfile(os.path.join(left, "config.yml"))
    assert not os.path.exists(os.path.join(left, "checkpoint", "checkpoint.pth.tar"))
    # what a kill inside epoch 1's writes leaves: its CSV row, a model_best and a temporary file
    with open(os.path.join(left, "metrics.csv"), "w") as fh:
        fh.write("epoch,lr\r\n1,0.05\r\n")
    os.makedirs(os.path.join(left, "checkpoint"), exist_ok=True)
    stale = os.path.join(left, "checkpoint", TMP_PREFIX + "a1b2c3-checkpoint.pth.tar")
    with open(stale, "wb") as fh:
        fh.write(b"PK\x03\x04 half")
    assert train.main([*run, "--lr", "0.2"]) == 130  # another command (lr): never takes that folder over
    assert len(run_dirs_of(tmp_path)) == 2
    restore()
    capsys.readouterr()
    assert train.main(run) == 0  # the same command: the run starts again in the folder it left
    assert f"--resume auto: starting again in {left}," in capsys.readouterr().out
    assert len(run_dirs_of(tmp_path)) == 2 and os.path.isfile(os.path.join(left, "summary.json"))
    with open(os.path.join(left, "metrics.csv")) as fh:
        assert [line.split(",")[0] for line in fh.read().splitlines()] == ["epoch", "1", "2"]  # each epoch once
    assert not os.path.exists(stale) and load_checkpoint(os.path.join(left, "checkpoint", "checkpoint.pth.tar"))[
        "epoch"] == 2


def run_dirs_of(result_dir) -> list[str]:
    return sorted(glob.glob(os.path.join(str(result_dir), "t", "pretrain", "*")))
