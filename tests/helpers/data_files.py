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


# ---------------------------------------------------------------- images, folders, LMDB

def image_bytes(seed: int, *, size: tuple[int, int] = (40, 30), fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A small noise image encoded as ``fmt``; distinct bytes per seed."""
    import io

    from PIL import Image

    channels = 3 if mode == "RGB" else 1
    pixels = np.random.RandomState(seed).randint(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels if channels == 3 else pixels[..., 0], mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_image_folder(root: str, counts: dict[str, int], *, seed: int = 0, size: tuple[int, int] = (40, 30)) -> None:
    """``root/<class>/img_<i>.JPEG`` (every third image a PNG, to cover more than one format)."""
    for c, (name, count) in enumerate(sorted(counts.items())):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(count):
            fmt, ext = ("PNG", "png") if i % 3 == 2 else ("JPEG", "JPEG")
            with open(os.path.join(root, name, f"img_{i}.{ext}"), "wb") as handle:
                handle.write(image_bytes(seed + 100 * c + i, size=size, fmt=fmt))


TINY_WNIDS = ("n02085620", "n01443537", "n04067472")  # deliberately not in sorted order


def write_tiny_imagenet(root: str, *, train_per_class: int = 3, val_per_class: int = 2) -> str:
    """``root/tiny-imagenet-200`` as it unzips: wnids.txt, words.txt, train/<wnid>/{images/,*_boxes.txt},
    val/images + val/val_annotations.txt (val images interleaved across classes), test/images."""
    base = os.path.join(root, "tiny-imagenet-200")
    os.makedirs(os.path.join(base, "val", "images"))
    os.makedirs(os.path.join(base, "test", "images"))
    with open(os.path.join(base, "wnids.txt"), "w") as handle:
        handle.write("\n".join(TINY_WNIDS) + "\n")
    with open(os.path.join(base, "words.txt"), "w") as handle:
        handle.writelines(f"{w}\tthing {i}\n" for i, w in enumerate(TINY_WNIDS))
    for c, wnid in enumerate(TINY_WNIDS):
        images = os.path.join(base, "train", wnid, "images")
        os.makedirs(images)
        with open(os.path.join(base, "train", wnid, f"{wnid}_boxes.txt"), "w") as boxes:
            for i in range(train_per_class):
                name = f"{wnid}_{i}.JPEG"
                with open(os.path.join(images, name), "wb") as handle:
                    handle.write(image_bytes(1000 + 10 * c + i, size=(64, 64)))
                boxes.write(f"{name}\t0\t0\t63\t63\n")
    lines = []
    for i in range(val_per_class * len(TINY_WNIDS)):
        wnid = TINY_WNIDS[i % len(TINY_WNIDS)]
        with open(os.path.join(base, "val", "images", f"val_{i}.JPEG"), "wb") as handle:
            handle.write(image_bytes(2000 + i, size=(64, 64)))
        lines.append(f"val_{i}.JPEG\t{wnid}\t1\t2\t50\t60\n")
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as handle:
        handle.writelines(lines)
    with open(os.path.join(base, "test", "images", "test_0.JPEG"), "wb") as handle:
        handle.write(image_bytes(3000, size=(64, 64)))
    return base


def write_bip_lmdb(path: str, records: list, *, with_keys: bool = True, with_len: bool = True) -> None:
    """An LMDB file the way BiP's folder2lmdb script writes it: a single file (subdir=False), key
    b"<i>" -> pickle.dumps((image bytes, label)), then b"__keys__" and b"__len__"."""
    import lmdb

    env = lmdb.open(path, subdir=False, map_size=1 << 26, readonly=False, meminit=False, map_async=True)
    txn = env.begin(write=True)
    for i, record in enumerate(records):
        txn.put(f"{i}".encode("ascii"), record if isinstance(record, bytes) else pickle.dumps(record))
    keys = [f"{k}".encode("ascii") for k in range(len(records))]
    if with_keys:
        txn.put(b"__keys__", pickle.dumps(keys))
    if with_len:
        txn.put(b"__len__", pickle.dumps(len(keys)))
    txn.commit()
    env.sync()
    env.close()


def tree_digest(root: str) -> dict[str, tuple[int, int, str]]:
    """{relative path: (size, mtime_ns, sha256)} of every file and folder under ``root``."""
    import hashlib

    digest = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            stat = os.stat(path)
            content = ""
            if os.path.isfile(path):
                with open(path, "rb") as handle:
                    content = hashlib.sha256(handle.read()).hexdigest()
            digest[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns, content)
    return digest
