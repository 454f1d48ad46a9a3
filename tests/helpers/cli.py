"""train.main as the command line runs it: a quick Digits run that must finish, and bad input that
must be refused with exit status 2, one ``error:`` line on stderr (no traceback) and no run folder;
and a Ctrl-C at a chosen epoch of a run."""
from __future__ import annotations

import glob
import os
from collections.abc import Callable

import train

# A quick Digits run: two epochs on 30 % of the data, with the settings the run-folder tests name.
QUICK_RUN = ["--epochs", "2", "--batch-size", "128", "--no-progress", "--data-fraction", "0.3", "--lr", "0.05"]


def run_ok(tmp_path, *args: str) -> str:
    """A QUICK_RUN (``args`` added or overriding) under tmp_path/res, experiment "t", that must exit 0;
    returns its run folder (the newest one, when tmp_path/res already holds runs)."""
    assert train.main(["--result-dir", str(tmp_path / "res"), "--exp-name", "t", *QUICK_RUN, *args]) == 0
    return sorted(glob.glob(str(tmp_path / "res" / "t" / "*" / "*")), key=os.path.getmtime)[-1]


def one_line_error(capsys, code: int, expected_code: int) -> str:
    """The exit status is ``expected_code`` and stderr is one ``error:`` line without a traceback;
    returns that line."""
    err = capsys.readouterr().err.strip()
    assert code == expected_code, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def run_error(tmp_path, capsys, *args: str) -> str:
    """train.main with ``--result-dir tmp_path/res`` and ``args`` (a later --result-dir in ``args``
    wins) must exit 2 with one ``error:`` line and create nothing under tmp_path/res: bad input is
    refused before the run folder exists. Returns the error line."""
    err = one_line_error(capsys, train.main(["--result-dir", str(tmp_path / "res"), *args]), 2)
    assert not (tmp_path / "res").exists()
    return err


def interrupt_at(monkeypatch, trainer_cls, epoch: int) -> Callable[[], None]:
    """Make ``trainer_cls`` raise KeyboardInterrupt (a Ctrl-C) when it starts ``epoch`` (0-based);
    returns the function that restores it, so that the run can then be resumed."""
    original = trainer_cls.train_epoch

    def train_epoch(self, current, loaders):
        if current == epoch:
            raise KeyboardInterrupt
        return original(self, current, loaders)

    monkeypatch.setattr(trainer_cls, "train_epoch", train_epoch)
    return lambda: monkeypatch.setattr(trainer_cls, "train_epoch", original)


def interrupted_and_resumed(tmp_path, monkeypatch, trainer_cls, *args: str, epoch: int = 1) -> tuple[str, str]:
    """The run of ``args`` uninterrupted (under tmp_path/a), and the same run cut by Ctrl-C at ``epoch`` and
    resumed (under tmp_path/b): the first's run folder and the second's checkpoint.pth.tar."""
    full = run_ok(tmp_path / "a", *args)
    restore = interrupt_at(monkeypatch, trainer_cls, epoch)
    assert train.main(["--result-dir", str(tmp_path / "b"), "--exp-name", "t", *QUICK_RUN, *args]) == 130
    restore()
    ckpt = glob.glob(str(tmp_path / "b" / "t" / "*" / "*" / "checkpoint" / "checkpoint.pth.tar"))[0]
    assert train.main(["--resume", ckpt]) == 0
    return full, ckpt
