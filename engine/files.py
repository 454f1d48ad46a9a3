"""The one writer of every file the project produces: checkpoints, run logs, summaries, the results
report and exports.

``atomic_write`` (a writer to a file object) and ``atomic_write_path`` (a writer that needs a path:
torch.export, ONNX) write a temporary ``.tmp-<pid>-*`` file in the target's own folder, fsync it,
then rename it over the target, with SIGINT/SIGTERM held until the file is complete. So:
- a reader never sees half a file, and a crash or a full disk leaves the previous file whole (the
  OSError names the target);
- a symlink at the target is replaced by the new file, never followed: nothing outside the folder is
  overwritten through it; and ``within=ROOT`` refuses a target whose folder resolves outside ROOT
  (a folder that is a symlink out of it);
- the temporary files of writers that were killed (their process is gone) are removed at the next
  write into the same folder; ``remove_stale_temps`` removes all of a run folder's on resume.
``safe_name`` turns text from data (a dataset or architecture name read from a summary) into a file
name of a safe character set, so data never chooses where a file goes.
"""
from __future__ import annotations

import errno
import os
import re
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from configs.errors import UserError

TMP_PREFIX = ".tmp-"
TMP_SUFFIXES = (".pth.tar", ".json", ".csv", ".yml", ".txt")  # the files a run rewrites atomically
# A full or failing disk: the run cannot go on, but nothing about its input is wrong.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})
_TEMP_PID = re.compile(r"^\.tmp-(\d+)-")


def is_storage_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def safe_name(text: object, *, max_length: int = 80) -> str:
    """``text`` as a file name: runs of characters outside ``A-Za-z0-9 . _ + -`` become ``_``, no
    leading dot or dash (no hidden file, no ``..``, no option), at most ``max_length`` characters."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).lstrip(".-")[:max_length]
    return name or "_"


def check_within(path: str, root: str) -> None:
    """A UserError unless ``path``'s folder, with every symlink resolved, lies inside ``root``'s."""
    folder, top = os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.realpath(root)
    if os.path.commonpath([folder, top]) != top:
        raise UserError(f"{os.path.dirname(os.path.abspath(path))} resolves to {folder}, outside {top} "
                        "(a symlink out of the folder); remove the link or choose another folder")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a pid we cannot ask about): keep its file
    return True


def remove_dead_temps(folder: str) -> list[str]:
    """Delete the temporary files in ``folder`` whose writer process no longer runs (killed between
    its first byte and its rename). A live writer's file, and any file not named by this module, stay."""
    removed: list[str] = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return removed
    for name in names:
        match = _TEMP_PID.match(name)
        path = os.path.join(folder, name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))) \
                and os.path.isfile(path) and not os.path.islink(path):
            try:
                os.remove(path)
                removed.append(name)
            except OSError:
                pass  # gone already, or not ours to remove: the write itself decides
    return removed


def _temp_in(folder: str, path: str) -> tuple[int, str]:
    os.makedirs(folder, exist_ok=True)
    remove_dead_temps(folder)
    return tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix="-" + os.path.basename(path), dir=folder)


def _sync_folder(folder: str) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

_holding = False  # a deferred_interrupts block is active (blocks nest: the outermost one holds)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs, then raise KeyboardInterrupt if one came.

    An interrupt inside ``torch.save`` surfaces as a RuntimeError with a traceback; held, the
    file is finished first and the run ends with its one-line "interrupted" message. Python
    runs signal handlers in the main thread only, so elsewhere this does nothing. If the block
    itself raises, that error is the one reported.
    """
    global _holding
    if _holding or threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    _holding = True
    try:
        yield
    finally:
        _holding = False
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    if received:
        raise KeyboardInterrupt


class _RecordingWriter:
    """A file wrapper that keeps the OSError of a failed write: torch.save reports it as a
    RuntimeError ("unexpected pos"), losing the errno that tells a full disk from a bug."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def make_readable(tmp: str) -> None:
    """Give a temporary file the mode ``open()`` would have given it (0666 less the umask):
    mkstemp's 0600 would hide checkpoints and logs from the other users of a shared machine."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


def atomic_write(path: str, write: Callable[[Any], None], *, within: str | None = None) -> None:
    """Write ``path`` with ``write(file)`` atomically: the old content stays until the new one is
    complete on disk. An OSError carries ``path`` as its filename. ``within``: see ``check_within``."""
    if within is not None:
        check_within(path, within)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = _temp_in(folder, path)
    with _renamed_into_place(tmp, path, folder):
        with os.fdopen(fd, "wb") as fh:
            out = _RecordingWriter(fh)
            try:
                write(out)
            except RuntimeError:
                if out.error is not None:
                    raise out.error from None
                raise
            fh.flush()
            os.fsync(fh.fileno())


@contextmanager
def _renamed_into_place(tmp: str, path: str, folder: str) -> Iterator[None]:
    """Around the writing of ``tmp``: with SIGINT/SIGTERM held, then give it open()'s mode and rename it
    over ``path``; on any failure remove it, and name ``path`` in an OSError that names no file."""
    try:
        with deferred_interrupts():
            yield
            make_readable(tmp)
            os.replace(tmp, path)
            _sync_folder(folder)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = path
        raise




def remove_stale_temps(folder: str) -> list[str]:
    """Delete the temporary files an interrupted ``atomic_write`` left in ``folder``; only ours
    (the prefix and a suffix of a file we write), never anything else. Returns their names."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIXES) and os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    return removed




def atomic_write_path(path: str, write: Callable[[str], None], *, within: str | None = None) -> None:
    """``write(tmp_path)``, then rename to ``path``: for writers that need a path (torch.export, ONNX).
    The same guarantees as ``atomic_write``; the temporary file is removed on failure."""
    if within is not None:
        check_within(path, within)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = _temp_in(folder, path)
    os.close(fd)
    with _renamed_into_place(tmp, path, folder):
        write(tmp)


def write_text(path: str, text: str, *, within: str | None = None) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")), within=within)


def write_bytes(path: str, data: bytes, *, within: str | None = None) -> None:
    atomic_write(path, lambda fh: fh.write(data), within=within)
