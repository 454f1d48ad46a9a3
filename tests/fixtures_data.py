"""Tiny data files in the real on-disk formats, generated in a temp folder by the data tests."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np


# ---------------------------------------------------------------- Python-2 style pickles (CIFAR)
# The real CIFAR "python version" batches were written by Python 2's cPickle at protocol 2: strings
# are BINSTRING opcodes and arrays go through numpy.core.multiarray._reconstruct. A Python 3
# pickle.dumps would not produce those opcodes, so this tiny encoder writes them the way the real
# files have them.

def _py2_str(data: bytes) -> bytes:
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<I", len(data)) + data


def _py2_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    return b"J" + struct.pack("<i", value)


def _py2_array(array: np.ndarray) -> bytes:
    assert array.dtype == np.uint8
    shape = b"(" + b"".join(_py2_int(d) for d in array.shape) + b"t"
    dtype = (b"cnumpy\ndtype\n" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R"
             + b"(" + _py2_int(3) + _py2_str(b"|") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + _py2_int(0) + b"tb")
    return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _py2_int(0) + b"\x85"
            + _py2_str(b"b") + b"\x87R" + b"(" + _py2_int(1) + shape + dtype + b"\x89"
            + _py2_str(np.ascontiguousarray(array).tobytes()) + b"tb")


def _py2_obj(obj) -> bytes:
    if isinstance(obj, np.ndarray):
        return _py2_array(obj)
    if isinstance(obj, str):
        return _py2_str(obj.encode("latin1"))
    if isinstance(obj, int):
        return _py2_int(obj)
    if isinstance(obj, list):
        return b"](" + b"".join(_py2_obj(v) for v in obj) + b"e"
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2_obj(k) + _py2_obj(v) for k, v in obj.items()) + b"u"
    raise TypeError(type(obj))


def py2_pickle(obj) -> bytes:
    return b"\x80\x02" + _py2_obj(obj) + b"."


def fake_cifar_images(n: int, *, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(root: str, *, per_batch: int = 2, test: int = 3, writer=py2_pickle) -> str:
    """``root/cifar-10-batches-py/{data_batch_1..5,test_batch}``; labels cycle through 0..9."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    files = [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]
    for seed, (name, n) in enumerate(files):
        entry = {"batch_label": f"{name} of 5", "labels": [(seed * 7 + j) % 10 for j in range(n)],
                 "data": fake_cifar_images(n, seed=seed), "filenames": [f"img_{seed}_{j}.png" for j in range(n)]}
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(writer(entry))
    return folder


def write_cifar100(root: str, *, train: int = 4, test: int = 3) -> str:
    """``root/cifar-100-python/{train,test}``; fine labels include 99."""
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    for seed, (name, n) in enumerate([("train", train), ("test", test)]):
        fine = [99 - j * 13 for j in range(n)]
        entry = {"filenames": [f"x{j}.png" for j in range(n)], "batch_label": f"{name} batch 1 of 1",
                 "fine_labels": fine, "coarse_labels": [f // 5 for f in fine],
                 "data": fake_cifar_images(n, seed=10 + seed)}
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(py2_pickle(entry))
    return folder


# ---------------------------------------------------------------- malicious pickles

class ShellPayload:
    """Unpickling this would run ``touch MARKER`` through os.system."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvalPayload:
    """Unpickling this would create MARKER through builtins.eval."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').close()",))
