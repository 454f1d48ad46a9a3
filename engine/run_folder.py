"""The run folders of an experiment: where a new run goes, which one ``--resume`` continues.

``RESULT_DIR/EXP_NAME/EXP_MODE/<n>--k-<k>_trainer-<t>_epochs-<E>_arch-<a>``: a run is finished when
it holds summary.json (written last), unfinished when it holds a checkpoint and no summary.
"""
from __future__ import annotations

import fcntl
import os
import re
from typing import IO

from configs.errors import UserError
from configs.schema import Config


def check_writable(folder: str, flag: str) -> None:
    """Fail before any work when ``folder`` (or the nearest existing folder above it) cannot be written."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{flag} {folder}: {probe} is a file, not a folder; pass a folder path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: {probe} is not writable (read-only or no permission); "
                        "pass a writable folder")


RUN_NUMBER = re.compile(r"(\d+)--")
CLAIM = re.compile(r"\.(\d+)\.claim")


def new_run_dir(cfg: Config) -> str:
    """RESULT_DIR/EXP_NAME/EXP_MODE/<n>--k-<k>_trainer-<t>_epochs-<E>_arch-<a>, n one past the largest in use.

    Runs started at the same time must not share n: a number is taken by creating the hidden file
    ``.<n>.claim`` with O_EXCL, which exactly one process wins; the loser tries n+1. Claims stay, so
    a number is never reused, even when its folder is deleted.
    """
    parent = os.path.join(cfg.result_dir, cfg.exp_name, cfg.exp_mode)
    name = f"--k-{cfg.k:g}_trainer-{cfg.trainer}_epochs-{cfg.epochs}_arch-{cfg.arch}"
    try:
        os.makedirs(parent, exist_ok=True)
        folders, claims = _numbers_in_use(parent)
        n = max(folders | claims, default=0) + 1
        while True:
            try:
                os.close(os.open(os.path.join(parent, f".{n}.claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                n += 1
                continue
            if n in _numbers_in_use(parent)[0]:  # a folder made without a claim (an older train.py)
                n += 1
                continue
            path = os.path.join(parent, f"{n}{name}")
            os.mkdir(path)
            return path
    except OSError as exc:
        raise UserError(f"cannot create the run folder under --result-dir {cfg.result_dir} "
                        f"({exc.strerror or exc}: {exc.filename}); pass a writable folder") from None


def _numbers_in_use(parent: str) -> tuple[set[int], set[int]]:
    folders, claims = set(), set()
    for entry in os.listdir(parent):
        if match := RUN_NUMBER.match(entry):
            folders.add(int(match.group(1)))
        elif match := CLAIM.fullmatch(entry):
            claims.add(int(match.group(1)))
    return folders, claims


def resumed_folder(checkpoint: str) -> str | None:
    """The run folder a checkpoint lies in (RUN/checkpoint/x.pth.tar), if it is one (has config.yml)."""
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    return run_dir if os.path.isfile(os.path.join(run_dir, "config.yml")) else None


LOCK = ".lock"
_held: list[IO[str]] = []  # locks this process holds (the kernel drops them when it dies)


def hold(run_dir: str) -> None:
    """Take the run folder's lock (an exclusive ``flock`` of RUN/.lock) until ``release()``; a folder
    another live process holds is refused. A killed run's lock goes with its process, so a restart
    (``--resume``, ``--resume auto``) takes it again."""
    path = os.path.join(run_dir, LOCK)
    if any(fh.name == path for fh in _held):
        return
    fh = open(path, "a", encoding="utf-8")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise UserError(f"{run_dir} is in use: another process is running this run (it holds {LOCK}); wait for it "
                        "to end, or start a new run (without --resume)") from None
    _held.append(fh)


def release() -> None:
    """Drop the locks this process holds (the end of train.py's run)."""
    while _held:
        _held.pop().close()


def in_use(run_dir: str) -> bool:
    """Whether a live process holds the folder's lock (a run going on there)."""
    path = os.path.join(run_dir, LOCK)
    if not os.path.exists(path) or any(fh.name == path for fh in _held):
        return False
    with open(path, "a", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def _runs(cfg: Config) -> list[str]:
    """The run folders of the experiment that no live process is running."""
    parent = os.path.join(cfg.result_dir, cfg.exp_name, cfg.exp_mode)
    try:
        runs = [os.path.join(parent, name) for name in os.listdir(parent)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [run for run in runs if os.path.isdir(run) and not in_use(run)]


def unfinished_checkpoint(cfg: Config) -> str | None:
    """``--resume auto``: checkpoint.pth.tar of the newest unfinished run of this experiment
    (RESULT_DIR/EXP_NAME/EXP_MODE/*: a checkpoint and no summary.json, which a run writes last, and no
    live process running it), by the time the checkpoint was written; None if there is none."""
    candidates = [os.path.join(run, "checkpoint", "checkpoint.pth.tar") for run in _runs(cfg)
                  if os.path.isfile(os.path.join(run, "checkpoint", "checkpoint.pth.tar"))
                  and not os.path.isfile(os.path.join(run, "summary.json"))]
    return max(candidates, key=lambda path: (os.path.getmtime(path), path), default=None)


def abandoned_run_dir(cfg: Config, config_text: str) -> str | None:
    """``--resume auto`` when no run has a checkpoint: the newest folder of this experiment that a start
    of the same command (its config.yml is ``config_text``) left before its first checkpoint (killed:
    no live process holds it), with no summary.json; the run starts again in it instead of leaving it
    behind as an unfinished run."""
    found = []
    for run in _runs(cfg):
        config = os.path.join(run, "config.yml")
        if (not os.path.isfile(config) or os.path.exists(os.path.join(run, "checkpoint", "checkpoint.pth.tar"))
                or os.path.exists(os.path.join(run, "summary.json"))):
            continue
        with open(config, encoding="utf-8") as fh:
            if fh.read() == config_text:
                found.append(run)
    return max(found, key=lambda run: (os.path.getmtime(os.path.join(run, "config.yml")), run), default=None)
