"""Reading image LMDB files in BiP's layout.

Layout (the public BiP / "folder2lmdb" scripts, and ``data.lmdb_writer``): one LMDB environment per
split, a single file ``train.lmdb`` (or a folder holding ``data.mdb``); record key ``b"<i>"`` holds
``pickle.dumps((encoded image bytes, int label))``; ``b"__len__"`` the pickled count and
``b"__keys__"`` the pickled list of record keys.

Safety: values go through ``data.safe_pickle`` with no globals allowed, so a record can only be
plain data. The environment is opened read-only without a lock file (read-only media work, and no
reader ever waits on a lock), lazily in each process: an LMDB handle must not cross a fork (the
dataset object holds no handle, only the file's identity; see ``reader_transaction``).
LMDB maps the file into memory; reading a page past the end of a truncated file would kill the
process with SIGBUS instead of raising, so the file length is checked against the last page the
header claims before any record is touched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from configs.errors import UserError
from data.bad_records import BadRecordError, BadRecordPolicy
from data.decode import check_image_header, decode_rgb
from data.safe_pickle import UnsafePickleError, safe_loads
from data.sampling import SampleKey, split_key

LEN_KEY = b"__len__"
KEYS_KEY = b"__keys__"
RECREATE = "re-create it with sh/prepare_lmdb.sh (python -m data.lmdb_writer)"


def lmdb_module() -> ModuleType:
    try:
        import lmdb
    except ImportError:
        raise UserError("reading LMDB files needs the lmdb package: pip install lmdb") from None
    return lmdb


def data_file(path: str) -> str:
    """The file holding the pages: ``path`` itself, or ``path/data.mdb`` for a folder environment."""
    return os.path.join(path, "data.mdb") if os.path.isdir(path) else path


def lmdb_exists(path: str) -> bool:
    return os.path.isfile(data_file(path))


def open_readonly(path: str) -> Any:  # lmdb.Environment
    """Open an LMDB environment read-only, refusing truncated files (see the module docstring)."""
    lmdb = lmdb_module()
    if not lmdb_exists(path):
        raise UserError(f"{path} not found (expected an LMDB file or a folder with data.mdb): {RECREATE}")
    try:
        env = lmdb.open(path, subdir=os.path.isdir(path), readonly=True, lock=False, readahead=False,
                        meminit=False, max_readers=1)
    except lmdb.Error as exc:
        raise UserError(f"{path} is not a readable LMDB file ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                        f"the file is corrupt or truncated: {RECREATE}") from None
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.path.getsize(data_file(path))
    if size < needed:
        env.close()
        raise UserError(f"{path} is truncated ({size} bytes, its header says {needed}): the copy or conversion "
                        f"did not finish; copy it again or {RECREATE}")
    return env


def _load_plain(value: bytes, *, source: str) -> Any:
    """Unpickle a value that may only hold tuples, lists, bytes, str and ints."""
    return safe_loads(value, source=source, allowed={}, encoding="bytes")


def read_index(txn: Any, path: str, *, entries: int) -> tuple[int, list[bytes] | None]:
    """(number of records, keys or None when they are the canonical b"0", b"1", ...).

    ``entries`` is the environment's own count of keys (``env.stat()["entries"]``). A bare __len__
    is a number that nothing in the file backs: beyond that count it is refused before anything is
    sized by it (a sampler over a claimed 10**11 records would exhaust memory). A __keys__ list is
    as long as the file makes it; a key it lists without a record is a bad record when read.
    """
    lmdb = lmdb_module()
    try:
        raw_len, raw_keys = txn.get(LEN_KEY), txn.get(KEYS_KEY)
    except lmdb.Error as exc:
        raise UserError(f"{path}: LMDB error reading its index ({exc}); the file is corrupt: {RECREATE}") from None
    if raw_len is None and raw_keys is None:
        raise UserError(f"{path} has neither a __len__ nor a __keys__ record: it was not written in BiP's "
                        f"layout or its conversion never finished; {RECREATE}")
    length: int | None = None
    if raw_len is not None:
        length = _load_plain(raw_len, source=f"{path} key {LEN_KEY!r}")
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise UserError(f"{path} key {LEN_KEY!r} is not a record count: {RECREATE}")
    if raw_keys is None:
        assert length is not None  # raw_len was there: the index has at least one of the two
        if length > entries - 1:  # every key but __len__ itself
            raise UserError(f"{path} key {LEN_KEY!r} claims {length} records but the file holds only {entries - 1}: "
                            f"its index is corrupt or records are missing; {RECREATE}")
        return length, None
    keys = _load_plain(raw_keys, source=f"{path} key {KEYS_KEY!r}")
    if not isinstance(keys, (list, tuple)):
        raise UserError(f"{path} key {KEYS_KEY!r} is not a list of keys: {RECREATE}")
    keys = [k.encode() if isinstance(k, str) else k for k in keys]
    if not all(isinstance(k, bytes) for k in keys):
        raise UserError(f"{path} key {KEYS_KEY!r} holds something other than byte-string keys: {RECREATE}")
    if length is not None and length != len(keys):
        raise UserError(f"{path} says it has {length} records (__len__) but lists {len(keys)} keys: {RECREATE}")
    if all(k == str(i).encode() for i, k in enumerate(keys)):
        return len(keys), None
    return len(keys), keys


# One read-only environment and read transaction per LMDB file and process, shared by every
# dataset on that file. py-lmdb refuses to open one file twice in a process, and a handle inherited
# through fork() must not be used (LMDB's rule), so a forked worker closes it and opens its own.
# Keyed by the file's (device, inode), as py-lmdb does, so a file replaced at the same path is new.
_READERS: dict[tuple[int, int], tuple[int, Any, Any]] = {}


def file_identity(path: str) -> tuple[int, int]:
    if not lmdb_exists(path):
        raise UserError(f"{path} not found (expected an LMDB file or a folder with data.mdb): {RECREATE}")
    stat = os.stat(data_file(path))
    return stat.st_dev, stat.st_ino


def reader(path: str, identity: tuple[int, int]) -> tuple[Any, Any]:
    """(environment, read transaction) of this process for the file."""
    entry = _READERS.get(identity)
    if entry is not None and entry[0] == os.getpid():
        return entry[1], entry[2]
    if entry is not None:
        entry[1].close()  # inherited from the parent process: release it, never read through it
    env = open_readonly(path)
    # One long read transaction: the file does not change while we train.
    txn = env.begin(buffers=False)
    _READERS[identity] = (os.getpid(), env, txn)
    return env, txn


def reader_transaction(path: str, identity: tuple[int, int]) -> Any:
    return reader(path, identity)[1]


def close_lmdb_readers() -> None:
    """Close this process's cached LMDB handles (before rewriting or re-opening those files here).
    Datasets reopen them on their next read."""
    for pid, env, _ in _READERS.values():
        if pid == os.getpid():
            env.close()
    _READERS.clear()


class LmdbImages(Dataset):
    """Items ``(transform(decoded image), label)`` from one BiP-layout LMDB file."""

    def __init__(self, path: str, *, transform: Callable[[Any, torch.Generator | None], torch.Tensor],
                 num_classes: int, skip_bad_records: bool = False) -> None:
        self.path = path
        self.transform = transform
        self.num_classes = num_classes
        self._identity = file_identity(path)
        env, txn = reader(path, self._identity)
        self._length, keys = read_index(txn, path, entries=env.stat()["entries"])
        # A numpy byte-string array, not 1.3M Python objects (see ImageList for why).
        self._keys = None if keys is None else np.array(keys, dtype=np.bytes_)
        self.bad = BadRecordPolicy(skip=skip_bad_records, source=path)
        if self._length:
            try:
                # Fail now, in the main process, before the run folder exists, on a file in another layout
                # or a record 0 that is no image (a decompression bomb among them: PIL checks the size
                # in the header).
                check_image_header(self.raw(0)[0], source=self.record_name(0))
            except BadRecordError:
                if not skip_bad_records:
                    raise

    def __len__(self) -> int:
        return self._length

    @property
    def source(self) -> str:
        return self.path

    @property
    def skipped_records(self) -> int:
        return self.bad.skipped

    def key(self, index: int) -> bytes:
        return str(index).encode() if self._keys is None else bytes(self._keys[index])

    def raw(self, index: int) -> tuple[bytes, int]:
        """The record's encoded image bytes and label, checked but not decoded."""
        if not 0 <= index < self._length:
            raise IndexError(index)
        key = self.key(index)
        source = f"{self.path} key {key!r}"
        try:
            value = reader_transaction(self.path, self._identity).get(key)
        except lmdb_module().Error as exc:
            raise BadRecordError(f"{source}: LMDB error ({exc}); the file is corrupt: {RECREATE}") from None
        if value is None:
            raise BadRecordError(f"{source} is listed in __keys__ but has no record: the file is incomplete; "
                                 f"{RECREATE}, or pass --skip-bad-records")
        try:
            record = _load_plain(value, source=source)
        except UnsafePickleError:
            raise  # a record that carries code is never skipped: the whole file is suspect
        except UserError as exc:
            raise BadRecordError(str(exc)) from None
        if not (isinstance(record, (tuple, list)) and len(record) == 2):
            raise BadRecordError(f"{source} is not an (image bytes, label) pair: {RECREATE}, "
                                 "or pass --skip-bad-records")
        image, label = record
        if isinstance(image, str):  # a Python 2 str read as bytes is already bytes; be lenient anyway
            image = image.encode("latin1")
        if not isinstance(image, bytes) or not isinstance(label, int) or isinstance(label, bool):
            raise BadRecordError(f"{source} holds ({type(image).__name__}, {type(label).__name__}), expected "
                                 f"(bytes, int): {RECREATE}, or pass --skip-bad-records")
        if not 0 <= label < self.num_classes:
            raise UserError(f"{source} has label {label}, out of range for --num-classes {self.num_classes}: "
                            f"pass --num-classes {label + 1} or more if the file is right, else re-create it")
        return image, label

    def record_name(self, index: int) -> str:
        """How messages name record ``index``."""
        return f"{self.path} key {self.key(index)!r}"

    def _load(self, index: int) -> tuple[Any, int]:
        data, label = self.raw(index)
        return decode_rgb(data, source=self.record_name(index)), label

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int]:
        index, generator = split_key(key)
        image, label = self.bad.fetch(index, len(self), self._load)
        return self.transform(image, generator), label


def find_lmdb_pair(directory: str) -> tuple[str, str] | None:
    """(train.lmdb, val.lmdb) under ``directory`` when both exist; None when neither does."""
    train, val = os.path.join(directory, "train.lmdb"), os.path.join(directory, "val.lmdb")
    has_train, has_val = lmdb_exists(train), lmdb_exists(val)
    if has_train and has_val:
        return train, val
    if has_train or has_val:
        present, missing = (train, val) if has_train else (val, train)
        raise UserError(f"found {present} but not {missing}: LMDB data needs both files ({RECREATE})")
    return None
