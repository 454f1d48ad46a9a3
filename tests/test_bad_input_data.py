"""Bad data and config files given to train.py: one ``error:`` line, exit status 2, no traceback.

Each case fabricates its files in tmp_path and runs ``train.py`` in a subprocess, as a user would.
Input refused before training leaves no run folder; a bad record met during training (possibly in
a DataLoader worker) still ends in one line.
"""

from __future__ import annotations

import os
import pickle
import subprocess

import lmdb
import numpy as np
import pytest
from torch.utils.data import DataLoader, Dataset

from configs.errors import UserError, one_line
from data.bad_records import BadRecordError
from data.safe_pickle import safe_loads
from tests.helpers.data_files import ShellPayload, image_bytes, write_bip_lmdb, write_cifar10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image-dim", "16", "--arch", "smallcnn", "--num-classes", "4", "--epochs", "1", "--batch-size", "4",
        "--test-batch-size", "4"]


def run_train(train_processes, tmp_path, *args: str) -> subprocess.CompletedProcess:
    """``python train.py ...`` in a process of its own (forked after the imports: tests/helpers/processes.py)."""
    return train_processes.run("--result-dir", str(tmp_path / "res"), "--no-progress", "--device", "cpu", *args)


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr
    shown = err[-3000:]  # a failure report stays readable even if the program printed megabytes
    assert proc.returncode == 2, shown
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith("\n"), shown
    assert "Traceback" not in err and len(err) < 1000, shown
    for needle in needles:
        assert needle in err, shown
    return err


# ---------------------------------------------------------------- fabricated files

def _records(n: int) -> list:
    return [(image_bytes(i, size=(8, 8)), i % 4) for i in range(n)]


def _imagenet(tmp_path, train: list, val: list | None = None, *, name: str = "ImageNet") -> list[str]:
    root = tmp_path / "data"
    os.makedirs(root, exist_ok=True)
    write_bip_lmdb(str(root / "train.lmdb"), train)
    write_bip_lmdb(str(root / "val.lmdb"), _records(4) if val is None else val)
    return ["--dataset", name, "--data-dir", str(root), *TINY]


def _claimed_length(tmp_path, length: int) -> list[str]:
    args = _imagenet(tmp_path, _records(3))
    env = lmdb.open(str(tmp_path / "data" / "train.lmdb"), subdir=False, map_size=1 << 26, lock=False)
    with env.begin(write=True) as txn:
        txn.delete(b"__keys__")  # the count then comes from __len__ alone
        txn.put(b"__len__", pickle.dumps(length))
    env.close()
    return args


def _cifar(tmp_path, batch: dict | None = None, *, per_batch: int = 2) -> list[str]:
    folder = write_cifar10(str(tmp_path / "data"), per_batch=per_batch, test=3)
    if batch is not None:
        with open(os.path.join(folder, "data_batch_3"), "wb") as handle:
            handle.write(pickle.dumps(batch, protocol=2))  # numpy arrays the way Python 3 pickles them
    return ["--dataset", "CIFAR10", "--data-dir", str(tmp_path / "data"), "--arch", "smallcnn"]


def _yaml(tmp_path, content: str | bytes) -> list[str]:
    path = tmp_path / "c.yml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return ["--configs", str(path)]


def _yaml_bomb() -> str:
    """Seven levels of ten aliases each: 10**7 numbers once expanded (printed), a few hundred bytes."""
    levels = ["&a0 [" + ", ".join(["1"] * 10) + "]"]
    levels += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 7)]
    return "lr: [" + ", ".join(levels) + "]\n"


def _shared_references(levels: int) -> list:
    """A list of 10**levels numbers in ~20 bytes per level of pickle: each level repeats one reference."""
    value = [1] * 10
    for _ in range(levels - 1):
        value = [value] * 10
    return value


ZEROS = np.zeros((2, 3072), dtype=np.uint8)

# id -> (fabricate(tmp_path) -> arguments, substrings the error line must contain)
CASES = {
    # 1-2. config files
    "yaml-binary": (lambda t: _yaml(t, bytes(range(128, 256)) * 8), ["not a UTF-8 YAML text file"]),
    "yaml-deep-lists": (lambda t: _yaml(t, "a: " + "[" * 50000 + "]" * 50000), ["nested more than 32 levels"]),
    "yaml-deep-mappings": (lambda t: _yaml(t, "a: " + "{a: " * 50000 + "1" + "}" * 50000),
                           ["nested more than 32 levels"]),
    "yaml-deep-block": (lambda t: _yaml(t, "- " * 50000 + "x\n"), ["nested more than 32 levels"]),
    "yaml-too-large": (lambda t: _yaml(t, "# padding\n" * 120000), ["larger than 1024 KiB"]),
    "yaml-list-for-scalar": (lambda t: _yaml(t, "lr: [0.1, 0.2]\n"), ["lr must be a single float value, got a list"]),
    "yaml-mapping-for-scalar": (lambda t: _yaml(t, "arch: {name: smallcnn}\n"),
                                ["arch must be a single str value, got a mapping"]),
    "yaml-alias-bomb": (lambda t: _yaml(t, _yaml_bomb()), ["lr must be a single float value, got a list"]),
    # 3. CIFAR batches
    "cifar-string-labels": (lambda t: _cifar(t, {"labels": ["cat", "dog"], "data": ZEROS}),
                            ["data_batch_3 has label 'cat' at position 0", "re-extract"]),
    "cifar-float-labels": (lambda t: _cifar(t, {"labels": [1, 2.5], "data": ZEROS}),
                           ["data_batch_3 has label 2.5 at position 1"]),
    "cifar-label-out-of-range": (lambda t: _cifar(t, {"labels": [3, 10], "data": ZEROS}),
                                 ["data_batch_3 has label 10 at position 1", "0..9"]),
    "cifar-float-data": (lambda t: _cifar(t, {"labels": [1, 2], "data": np.zeros((2, 3072), dtype=np.float32)}),
                         ["data_batch_3 has no 3072-byte uint8 'data' rows"]),
    "cifar-wrong-shape": (lambda t: _cifar(t, {"labels": [1, 2], "data": np.zeros((2, 1024), dtype=np.uint8)}),
                          ["data_batch_3 has no 3072-byte uint8 'data' rows"]),
    # 4. empty splits, of LMDB files and of any other dataset
    "lmdb-empty-train": (lambda t: _imagenet(t, []), ["the train split of ImageNet is empty", "train.lmdb"]),
    "lmdb-empty-val": (lambda t: _imagenet(t, _records(4), []), ["the test split of ImageNet is empty", "val.lmdb"]),
    "lmdb-empty-tiny": (lambda t: _imagenet(t, [], name="TinyImageNet"),
                        ["the train split of TinyImageNet is empty", "train.lmdb"]),
    "cifar-empty-train": (lambda t: _cifar(t, per_batch=0), ["the train split of CIFAR10 is empty"]),
    # 5. an index claiming more records than the file has
    "lmdb-huge-len": (lambda t: _claimed_length(t, 10**11),
                      ["claims 100000000000 records but the file holds only 3", "re-create"]),
    # 6. a batch larger than the training stream
    "batch-over-train": (lambda t: _imagenet(t, _records(12)) + ["--batch-size", "13"],
                         ["--batch-size 13 is larger than the 12 training images: use --batch-size at most 12"]),
    "batch-over-data-fraction": (lambda t: _imagenet(t, _records(12)) + ["--batch-size", "7", "--data-fraction", "0.5"],
                                 ["larger than the 6 training images in the --data-fraction 0.5 subset",
                                  "at most 6"]),
    "batch-over-upper-stream": (lambda t: _imagenet(t, _records(12)) + ["--val-fraction", "0.25"],
                                ["larger than the 3 images that --val-fraction 0.25 holds out for the upper level",
                                 "at most 3 or a larger --val-fraction"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_in_process_is_one_error_line_and_no_run_folder(tmp_path, capsys, case):
    """Every case through ``train.main`` in this process: the same exit status, line and needles as the
    subprocess test below, without an interpreter and torch start-up per case (~4 s each)."""
    import train

    fabricate, needles = CASES[case]
    code = train.main(["--result-dir", str(tmp_path / "res"), "--no-progress", "--device", "cpu",
                       *fabricate(tmp_path)])
    assert_one_error_line(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), *needles)
    assert not (tmp_path / "res").exists()


# A user's process, start to end, for one case of each kind (config file, CIFAR batch, LMDB file); the
# other cases' subprocess runs only repeat the in-process test above with another ~4 s interpreter and
# torch start-up each, so they run with the slow tests (pytest -m slow). The loaders' batch check
# (batch-over-*) is among them: the in-process test makes its checks, and the subprocess bad-record
# cases below build the same LMDB loaders in a user's process, pass that check and end in one line.
SUBPROCESS_DEFAULT = {"yaml-binary", "cifar-string-labels", "lmdb-empty-train"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c in SUBPROCESS_DEFAULT else pytest.mark.slow)
                                  for c in CASES])
def test_bad_input_is_one_error_line_and_no_run_folder(tmp_path, train_processes, case):
    fabricate, needles = CASES[case]
    proc = run_train(train_processes, tmp_path, *fabricate(tmp_path))
    assert_one_error_line(proc, *needles)
    assert not (tmp_path / "res").exists()


# ---------------------------------------------------------------- 7. a bad record met while training

def _unsafe_record(marker: str) -> bytes:
    return pickle.dumps((ShellPayload(marker), 1))


BAD_RECORDS = [
    ("unsafe-pickle", ["refusing to unpickle", "train.lmdb key b'5'", "nothing was executed"]),
    ("label-out-of-range", ["train.lmdb key b'5' has label 7, out of range for --num-classes 4",
                            "pass --num-classes 8"]),
]


def _bad_record_args(tmp_path, bad: str, workers: str) -> list[str]:
    # Record 0 is checked when the file is opened; record 5 is first read by a training batch,
    # so with --num-workers 2 in a DataLoader worker process.
    records = _records(12)
    records[5] = _unsafe_record(str(tmp_path / "pwned")) if bad == "unsafe-pickle" else (image_bytes(5, size=(8, 8)), 7)
    return [*_imagenet(tmp_path, records), "--num-workers", workers]


@pytest.mark.parametrize("bad,needles", BAD_RECORDS)
def test_bad_record_met_during_training_in_process_is_one_error_line(tmp_path, capsys, bad, needles):
    """The 0-worker cases through ``train.main`` in this process, as the in-process test above; the
    subprocess test below runs the workers=2 cases by default (a user's process, its DataLoader worker
    processes writing to the same stderr) and the workers=0 ones with the slow tests. (Not workers=2
    here: the failed loader's worker processes, forked from pytest, hold up whichever later test
    collects it for 5 s.)"""
    import train

    code = train.main(["--result-dir", str(tmp_path / "res"), "--no-progress", "--device", "cpu",
                       *_bad_record_args(tmp_path, bad, "0")])
    out, err = capsys.readouterr()
    proc = subprocess.CompletedProcess([], code, out, err)
    assert_one_error_line(proc, *needles)
    assert "DataLoader worker" not in proc.stderr
    assert "run folder:" in proc.stdout  # it did get as far as training
    assert not (tmp_path / "pwned").exists()


# slow with 0 workers: the in-process test above makes the same checks, and the workers=2 case of the
# same record the same checks in a user's process
@pytest.mark.parametrize("workers", [pytest.param("0", marks=pytest.mark.slow), "2"])
@pytest.mark.parametrize("bad,needles", BAD_RECORDS)
def test_bad_record_met_during_training_is_one_error_line(tmp_path, train_processes, workers, bad, needles):
    proc = run_train(train_processes, tmp_path, *_bad_record_args(tmp_path, bad, workers))
    assert_one_error_line(proc, *needles)
    assert "DataLoader worker" not in proc.stderr
    assert "run folder:" in proc.stdout  # it did get as far as training
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- data.safe_pickle

def test_shared_references_in_a_pickle_are_not_expanded():
    # What pickle shares through its memo stays shared: checked on a small list first, so that a
    # regression fails here instead of expanding the large one below.
    small = safe_loads(pickle.dumps(_shared_references(2)), source="small")
    assert small[0] is small[9] and small[0] == [1] * 10
    data = pickle.dumps({"labels": _shared_references(12)}, protocol=2)
    assert len(data) < 400  # 10**12 numbers once expanded
    labels = safe_loads(data, source="bomb")["labels"]
    assert labels[0] is labels[9]


# ---------------------------------------------------------------- configs.errors.one_line

class _BadAtTwo(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        if index == 2:
            raise BadRecordError("x.lmdb key b'2' is broken: re-create it")
        return index


def test_one_line_recovers_the_message_of_a_worker_error(monkeypatch):
    # The failed loader (kept by the exception's traceback) stops its worker when it is collected, and
    # its worker does not end by itself: torch waits MP_STATUS_CHECK_INTERVAL (5 s) before terminating
    # it, in whichever later test collects it. 0.1 s here, and collected here.
    import gc
    from torch.utils.data import _utils
    monkeypatch.setattr(_utils, "MP_STATUS_CHECK_INTERVAL", 0.1)
    with pytest.raises(BadRecordError) as caught:
        list(DataLoader(_BadAtTwo(), num_workers=1))
    assert "DataLoader worker process 0" in str(caught.value) and "\n" in str(caught.value)  # what torch gives
    assert one_line(caught.value) == "x.lmdb key b'2' is broken: re-create it"
    with pytest.raises(BadRecordError) as caught:
        list(DataLoader(_BadAtTwo(), num_workers=0))
    assert one_line(caught.value) == "x.lmdb key b'2' is broken: re-create it"
    del caught
    gc.collect()


def test_one_line_joins_line_breaks_and_keeps_other_messages():
    assert one_line(UserError("plain message: fix it")) == "plain message: fix it"
    assert one_line(UserError("folder /a\nb has no images\n")) == "folder /a b has no images"
    assert one_line(UserError("Caught a cold; no traceback here")) == "Caught a cold; no traceback here"
