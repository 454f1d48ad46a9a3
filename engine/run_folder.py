"""The run folders of an experiment: where a new run goes, which one ``--resume`` continues, and the
configuration a run starts with (``settle_config``).

``RESULT_DIR/EXP_NAME/EXP_MODE/<n>--k-<k>_trainer-<t>_epochs-<E>_arch-<a>``: a run is finished when
it holds summary.json (written last), unfinished when it holds a checkpoint and no summary.
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from configs.errors import UserError
from configs.schema import Config, Options, resumed_config
from engine.checkpoint import check_resumable, load_checkpoint
from engine.distributed import Dist
from engine.files import check_within, remove_stale_temps, write_text


@dataclass(frozen=True)
class Start:
    """The run's configuration and, for ``--resume``, the checkpoint it continues."""

    config: Config
    resume: dict[str, Any] | None
    changed: dict[str, tuple[Any, Any]]  # run-control options the resume changed: (saved, now)
    auto: bool  # --resume auto


def settle_config(options: Options, *, group: Dist, notice: Callable[[str], None]) -> Start:
    """A fresh run's config is the command line's; a resumed run's is its checkpoint's
    (``configs.schema.resumed_config``). ``--resume auto`` (the same command for a first start and every
    restart, as torchrun's --max-restarts needs) continues the newest unfinished run of the experiment,
    or starts a new one; rank 0 looks, so that every rank continues the same one."""
    auto = options.values["resume"] == "auto"
    if auto:
        cfg = options.config()
        found = group.broadcast_object(unfinished_checkpoint(cfg) if group.main else None)
        where = os.path.join(cfg.result_dir, cfg.exp_name, cfg.exp_mode)
        notice(f"--resume auto: continuing {found}" if found else
               f"--resume auto: no unfinished run under {where}; starting a new one")
        options = dataclasses.replace(options, values={**options.values, "resume": found})
    source = options.values["resume"]
    if not source:
        return Start(config=options.config(), resume=None, changed={}, auto=auto)
    resume = load_checkpoint(source)
    check_resumable(resume, source)
    resumed = resumed_config(resume["config"], options, source=source)
    if resumed.defaulted:
        notice(f"{source}: its config predates {', '.join(resumed.defaulted)}: they take their defaults")
    return Start(config=resumed.config, resume=resume, changed=resumed.changed, auto=auto)


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


# The longest names a run writes below RESULT_DIR/EXP_NAME/EXP_MODE: its folder (a number, k, trainer,
# epochs, arch) and, in it, checkpoint/.tmp-<pid>-<random>-checkpoint.pth.tar.
RUN_PATH_RESERVE = 200
NAME_MAX = 255  # bytes of one path component on the file systems runs write to (ext4, xfs, ...)


def check_names(*, result_dir: str, exp_name: str) -> None:
    """--result-dir and --exp-name as paths a run can create and log: UTF-8 text, an experiment name
    that is one folder inside the results folder, components and a whole path the file system takes."""
    for flag, value in (("--result-dir", result_dir), ("--exp-name", exp_name)):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"{flag} {value!r} is not valid UTF-8 text (the run log and summary.json are UTF-8); "
                            "rename it") from None
    if exp_name in ("", ".", "..") or "/" in exp_name or os.sep in exp_name or "\0" in exp_name:
        raise UserError(f"--exp-name {exp_name!r} must be one folder name inside --result-dir (no '/', not '.' or "
                        "'..'); use --result-dir to choose where runs go")
    parts = [p for p in os.path.abspath(result_dir).split(os.sep) if p] + [exp_name]
    long = next((p for p in parts if len(p.encode("utf-8")) > NAME_MAX), None)
    if long is not None:
        raise UserError(f"a folder name of {len(long.encode('utf-8'))} bytes ({long[:20]}...) is longer than the "
                        f"{NAME_MAX} a file system takes; shorten --result-dir or --exp-name")
    limit = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096
    size = len(os.path.join(os.path.abspath(result_dir), exp_name, "finetune").encode("utf-8")) + RUN_PATH_RESERVE
    if size > limit:
        raise UserError(f"--result-dir is too long: its run folders' files would have paths of about {size} bytes, "
                        f"more than this system's {limit}; choose a shorter --result-dir")


def check_output(*, result_dir: str, exp_name: str, run_dir: str | None) -> None:
    """Fail before any work when the run could not write its folder: ``run_dir`` (a resumed run's) or
    ``result_dir`` (where a new run's folder goes, named by ``exp_name``)."""
    if run_dir is not None:
        check_writable(run_dir, "--resume: the run folder")
    else:
        check_names(result_dir=result_dir, exp_name=exp_name)
        check_writable(result_dir, "--result-dir")
        parent = os.path.join(result_dir, exp_name)
        if os.path.exists(parent):
            check_within(os.path.join(parent, "x"), result_dir)  # an experiment folder linked elsewhere


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
        # A run folder train.py made is never a symlink: one is someone else's, possibly leading out of
        # --result-dir, and --resume auto does not follow it.
        runs = [os.path.join(parent, name) for name in os.listdir(parent)
                if not os.path.islink(os.path.join(parent, name))]
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


def claim_run_folder(cfg: Config, *, run_dir: str | None, config_text: str, auto: bool, main: bool,
                     changed: dict[str, tuple[Any, Any]], start_epoch: int, notice: Callable[[str], None]) -> str:
    """The folder the run writes, held by this process (``hold``) until it ends. ``run_dir``: a resumed
    run's; else, with ``--resume auto``, the folder a start of the same command left before its first
    checkpoint (cleared of what that start wrote), or a new one (``new_run_dir``). A new folder gets
    config.yml (``config_text``) first: a folder without it could not be started again. A resumed one
    loses the temporary files of interrupted writes and records the run-control options the resume
    ``changed``. Only rank 0 (``main``) touches the disk; the other ranks get a resumed run's folder or ""."""
    fresh = run_dir is None
    if run_dir is None and auto and main:
        run_dir = abandoned_run_dir(cfg, config_text)
        if run_dir is not None:
            hold(run_dir)  # before anything in it is removed
            notice(f"--resume auto: starting again in {run_dir}, left by a start of this command before its "
                   "first checkpoint")
            for folder in (run_dir, os.path.join(run_dir, "checkpoint")):
                remove_stale_temps(folder)
            if os.path.exists(os.path.join(run_dir, "metrics.csv")):  # rows of epochs no checkpoint holds
                os.remove(os.path.join(run_dir, "metrics.csv"))
    if not main:
        return run_dir or ""
    if run_dir is None:
        run_dir = new_run_dir(cfg)
    hold(run_dir)  # one live process per run folder (a second --resume of a live run is refused)
    if fresh:
        write_text(os.path.join(run_dir, "config.yml"), config_text)
        return run_dir
    for folder in (run_dir, os.path.join(run_dir, "checkpoint")):
        for name in remove_stale_temps(folder):
            notice(f"removed {os.path.join(folder, name)}, left by an interrupted write")
    record_changes(run_dir, changed, epoch=start_epoch, notice=notice)
    return run_dir


def record_changes(run_dir: str, changed: dict[str, tuple[Any, Any]], *, epoch: int,
                   notice: Callable[[str], None]) -> None:
    """Run-control options a resume changed: a line in run.log and a comment at the end of config.yml
    (its settings stay those the run started with; comments keep it valid YAML)."""
    if not changed:
        return
    text = "; ".join(f"{key}: {new!r} (was {old!r})" for key, (old, new) in changed.items())
    notice(f"resumed after epoch {epoch} with {text}")
    path = os.path.join(run_dir, "config.yml")
    with open(path, encoding="utf-8") as fh:
        original = fh.read()
    write_text(path, original.rstrip("\n") + f"\n# resumed after epoch {epoch} with {text}\n")


def stopped_message(exc: OSError, run_dir: str) -> str:
    """The line of a run the disk stopped: what is kept and how to continue."""
    ckpt = os.path.join(run_dir, "checkpoint", "checkpoint.pth.tar")
    kept = (f"the last complete checkpoint is kept: free space (or fix the disk) and continue with --resume {ckpt}"
            if os.path.isfile(ckpt) else "no checkpoint was written yet: free space (or fix the disk) and start again")
    return f"could not write {exc.filename} ({exc.strerror}); {kept}"
