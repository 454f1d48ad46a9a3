"""``python train.py ARGS`` as separate processes without paying the interpreter's start-up each time.

Every train.py process spends ~2.5 s (of a 2-core machine) importing torch and the project before it
reads its first argument; a test that checks what a user's process prints and returns does not test
that start-up. ``TrainProcesses`` starts one Python that imports ``train`` (keeping whatever that
import prints) and then forks it for each run: a run is a process of its own (its own stdin, stdout,
stderr, signals, resource limits, exit status), starts with the output the import printed, runs the
program a test gives it (train.py itself, as ``__main__``, for ``run``) with ``sys.argv`` set,
and exits as a Python program does (SystemExit, interpreter shutdown, atexit). What it does not
repeat is the import itself, which happened once in the parent before any run.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The forking parent: reads one JSON request a line on stdin, answers {"pid": ...} then {"code": ...}.
_PARENT = r'''
import json, os, sys, tempfile
replies = os.fdopen(os.dup(1), "w", buffering=1)
heads = []
for fd in (1, 2):  # what the import prints goes where a train.py process would print it: first in its output
    keep, saved = tempfile.TemporaryFile(), os.dup(fd)
    os.dup2(keep.fileno(), fd)
    heads.append((fd, keep, saved))
import train  # the start-up every run shares
sys.stdout.flush()
sys.stderr.flush()
startup = {}
for fd, keep, saved in heads:
    keep.seek(0)
    startup[fd] = keep.read()
    os.dup2(saved if fd == 2 else os.open(os.devnull, os.O_WRONLY), fd)
for line in sys.stdin:
    request = json.loads(line)
    if request.get("quit"):
        os._exit(0)
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(out, startup[fd])
            os.dup2(out, fd)
            os.close(out)
        replies.close()
        sys.stdin = open(os.devnull)
        os.chdir(request["cwd"])
        sys.argv = request["argv"]
        exec(compile(request["program"], request["argv"][0], "exec"), {"__name__": "__main__", "__file__": request["file"]})
        sys.exit(0)
    replies.write(json.dumps({"pid": pid}) + "\n")
    _, status = os.waitpid(pid, 0)
    replies.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
'''


class TrainProcesses:
    """Runs as separate processes forked from one Python that has imported train (see the module's
    docstring); the environment is this process's when it is made, the folder the project's unless
    told."""

    def __init__(self) -> None:
        self.parent = subprocess.Popen([sys.executable, "-c", _PARENT], cwd=ROOT, env=dict(os.environ),
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.folder = tempfile.mkdtemp(prefix="train-processes-")
        self.count = 0

    def _reply(self) -> dict:
        line = self.parent.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"the forking parent ended (exit {self.parent.wait()})")
        return json.loads(line)

    def run_program(self, program: str, argv: list[str], *, cwd: str = ROOT, file: str | None = None,
                    timeout: float = 300) -> subprocess.CompletedProcess:
        """``program`` (Python source) as ``python argv[0] argv[1:]`` would run it, in a fork; its
        exit status, stdout and stderr, as subprocess.run(..., capture_output=True, text=True)."""
        self.count += 1
        out, err = (os.path.join(self.folder, f"{self.count}.{name}") for name in ("out", "err"))
        request = {"program": program, "argv": argv, "cwd": str(cwd), "file": file, "stdout": out, "stderr": err}
        self.parent.stdin.write(json.dumps(request) + "\n")  # type: ignore[union-attr]
        self.parent.stdin.flush()  # type: ignore[union-attr]
        pid = self._reply()["pid"]
        expired: list[bool] = []

        def kill() -> None:
            expired.append(True)
            os.kill(pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            code = self._reply()["code"]
        finally:
            timer.cancel()
        if expired:
            raise subprocess.TimeoutExpired(argv, timeout)
        with open(out, encoding="utf-8", errors="replace") as fh_out, open(err, encoding="utf-8", errors="replace") as fh_err:
            result = subprocess.CompletedProcess(argv, code, fh_out.read(), fh_err.read())
        os.remove(out)
        os.remove(err)
        return result

    def run(self, *args: str, cwd: str = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
        """``python train.py ARGS``: train.py itself runs as ``__main__`` (its imports are done)."""
        return self.run_script(os.path.join(ROOT, "train.py"), *args, argv0="train.py", cwd=cwd, timeout=timeout)

    def run_script(self, path: str, *args: str, argv0: str | None = None, cwd: str = ROOT,
                   timeout: float = 300) -> subprocess.CompletedProcess:
        """``python PATH ARGS`` (``argv0``: sys.argv[0] if not PATH)."""
        with open(path, encoding="utf-8") as fh:
            return self.run_program(fh.read(), [argv0 or str(path), *args], cwd=cwd, file=str(path), timeout=timeout)

    def close(self) -> None:
        # a request, not the end of its stdin: a process forked from this one (a DataLoader worker) may
        # still hold the pipe open
        self.parent.stdin.write(json.dumps({"quit": True}) + "\n")  # type: ignore[union-attr]
        self.parent.stdin.close()  # type: ignore[union-attr]
        try:
            self.parent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.parent.kill()
            self.parent.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
