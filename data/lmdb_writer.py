"""Convert an image tree into ``train.lmdb`` / ``val.lmdb`` in BiP's layout, or check an LMDB file.

    python -m data.lmdb_writer SRC OUT [--splits train val] [--verify] [--overwrite]
    python -m data.lmdb_writer --check FILE.lmdb [--decode]

SRC is either an ImageNet-style tree (``SRC/train/<class>/*``, ``SRC/val/<class>/*``) or the
``tiny-imagenet-200`` folder as it unpacks (val labels from ``val/val_annotations.txt``). Val labels
always use the train split's class order. Records are the files' bytes, unchanged (no re-encoding),
stored as ``pickle.dumps((bytes, label))`` under keys ``b"0"``, ``b"1"``, ... with ``__keys__`` and
``__len__``: exactly what BiP's own loader reads, so the files work with both programs (the issue
asks for the same record layout; we write plain data only, and read with a restricted unpickler).

Atomic: each split is written to a hidden ``.NAME.partial-PID`` file next to the target and renamed
only once it is complete (and verified, with ``--verify``). A killed conversion leaves only the
hidden partial file, never a ``train.lmdb`` that looks complete; rerun to start over.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from configs.errors import UserError
from data.bad_records import BadRecordError
from data.decode import check_image_header, decode_rgb
from data.image_folder import TINY_VAL_ANNOTATIONS, ImageList, scan_image_folder, scan_tiny_train, scan_tiny_val
from data.lmdb_reader import KEYS_KEY, LEN_KEY, LmdbImages, close_lmdb_readers, lmdb_module, open_readonly, read_index
from data.safe_pickle import safe_loads

PICKLE_PROTOCOL = 4  # readable by every Python 3 BiP runs on
_PAGE = 4096


def list_split(src: str, split: str, *, skip_bad_records: bool = False) -> ImageList:
    """The images of ``split`` ("train" or "val") under ``src``, labelled by the train split's classes."""
    tiny = os.path.isfile(os.path.join(src, TINY_VAL_ANNOTATIONS))
    if tiny:
        train = scan_tiny_train(src, skip_bad_records=skip_bad_records)
    else:
        train = scan_image_folder(os.path.join(src, "train"), skip_bad_records=skip_bad_records,
                                  fix=f"SRC must hold train/<class>/ folders (or be tiny-imagenet-200): {src}")
    if split == "train":
        return train
    class_to_idx = {name: i for i, name in enumerate(train.classes)}
    if tiny:
        return scan_tiny_val(src, class_to_idx=class_to_idx, skip_bad_records=skip_bad_records)
    return scan_image_folder(os.path.join(src, "val"), class_to_idx=class_to_idx, skip_bad_records=skip_bad_records,
                             fix="sort the flat ImageNet val folder first with sh/prepare_imagenet_val.sh")


@dataclass(frozen=True)
class WriteReport:
    path: str
    records: int
    skipped: int
    bytes: int


def _read_image_file(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise BadRecordError(f"cannot read {path} ({exc.strerror}); restore it, or pass --skip-bad-records") from None
    check_image_header(data, source=path)
    return data


def _map_size(images: ImageList) -> int:
    """Room for every file rounded up to whole overflow pages, plus the index and B-tree pages."""
    total = 0
    for i in range(len(images)):
        try:
            size = os.path.getsize(images.path(i))
        except OSError:
            size = 0  # unreadable: reported (or skipped) when the file is read
        total += (size + 64 + _PAGE - 1) // _PAGE * _PAGE
    return total + 64 * len(images) * 2 + (64 << 20)


def write_lmdb(images: ImageList, out_path: str, *, verify: bool = False, overwrite: bool = False,
               skip_bad_records: bool = False, commit_every: int = 1000, progress: bool = True) -> WriteReport:
    """Write ``images`` to ``out_path`` (a single-file LMDB environment), atomically."""
    lmdb = lmdb_module()
    if os.path.exists(out_path) and not overwrite:
        raise UserError(f"{out_path} already exists: pass --overwrite to replace it, or choose another OUT")
    close_lmdb_readers()  # a cached read handle on the file being replaced would go stale
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    temp = os.path.join(os.path.dirname(os.path.abspath(out_path)),
                        f".{os.path.basename(out_path)}.partial-{os.getpid()}")
    # crc32 and label of each record, for --verify; compact arrays, not 1.3M Python tuples
    crcs, labels = array("L"), array("q")
    skipped = total_bytes = 0
    env = None
    try:
        env = lmdb.open(temp, subdir=False, map_size=_map_size(images), lock=False, sync=False, meminit=False)
        bar = tqdm(total=len(images), desc=os.path.basename(out_path), unit="img", disable=not progress,
                   file=sys.stderr)
        pending: list[tuple[bytes, bytes]] = []
        for index in range(len(images)):
            try:
                data = _read_image_file(images.path(index))
            except BadRecordError as error:
                if not skip_bad_records:
                    raise
                skipped += 1
                print(f"warning: skipping {error}", file=sys.stderr)
                bar.update(1)
                continue
            label = int(images.labels[index])
            key = str(len(labels)).encode("ascii")
            pending.append((key, pickle.dumps((data, label), protocol=PICKLE_PROTOCOL)))
            crcs.append(zlib.crc32(data))
            labels.append(label)
            total_bytes += len(data)
            if len(pending) >= commit_every:
                _put_all(env, pending)
                pending = []
            bar.update(1)
        bar.close()
        keys = [str(i).encode("ascii") for i in range(len(labels))]
        # The index goes in last: a file cut short before this commit has no __len__ and is refused.
        pending += [(KEYS_KEY, pickle.dumps(keys, protocol=PICKLE_PROTOCOL)),
                    (LEN_KEY, pickle.dumps(len(keys), protocol=PICKLE_PROTOCOL))]
        _put_all(env, pending)
        env.sync(True)
        env.close()
        env = None
        if not labels:
            raise UserError(f"no readable images for {out_path}: nothing to write")
        if verify:
            verify_lmdb(temp, crcs=crcs, labels=labels, progress=progress, name=out_path)
        os.replace(temp, out_path)
    except BaseException:
        if env is not None:
            env.close()
        for leftover in (temp, temp + "-lock"):
            if os.path.exists(leftover):
                os.remove(leftover)  # our own partial output, never a user file
        raise
    return WriteReport(path=out_path, records=len(labels), skipped=skipped, bytes=total_bytes)


def _put_all(env: Any, items: list[tuple[bytes, bytes]]) -> None:
    """Put ``items`` in one transaction, growing the map when the size estimate was short."""
    lmdb = lmdb_module()
    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in items:
                    txn.put(key, value)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


def verify_lmdb(path: str, *, crcs: Sequence[int], labels: Sequence[int], progress: bool = True,
                name: str = "") -> None:
    """Re-read every record of a freshly written file and compare checksum and label."""
    close_lmdb_readers()  # py-lmdb opens a file once per process; our cached handle may hold it
    env = open_readonly(path)
    try:
        with env.begin(buffers=False) as txn:
            length, keys = read_index(txn, path, entries=env.stat()["entries"])
        if length != len(labels) or keys is not None:
            raise UserError(f"verification of {name or path} failed: index lists {length} records, "
                            f"{len(labels)} were written; the disk may be full or faulty, rerun the conversion")
        with env.begin(buffers=False) as txn:
            for i in tqdm(range(length), desc=f"verify {os.path.basename(name or path)}", unit="img",
                          disable=not progress, file=sys.stderr):
                value = txn.get(str(i).encode("ascii"))
                record = None if value is None else safe_loads(value, source=f"{path} key {i}", encoding="bytes")
                if (not isinstance(record, tuple) or len(record) != 2 or not isinstance(record[0], bytes)
                        or zlib.crc32(record[0]) != crcs[i] or record[1] != labels[i]):
                    raise UserError(f"verification of {name or path} failed at record {i}: it does not read back "
                                    "as written; the disk may be full or faulty, rerun the conversion")
    finally:
        env.close()


def check_lmdb(path: str, *, decode: bool = False, progress: bool = True) -> tuple[int, list[str]]:
    """Read every record of an existing LMDB (e.g. one downloaded from BiP): (records, problems)."""
    dataset = LmdbImages(path, transform=lambda image, generator: image, num_classes=1 << 62, skip_bad_records=True)
    problems: list[str] = []
    for i in tqdm(range(len(dataset)), desc=f"check {os.path.basename(path)}", unit="img", disable=not progress,
                  file=sys.stderr):
        try:
            data, _ = dataset.raw(i)
            if decode:
                decode_rgb(data, source=f"{path} key {dataset.key(i)!r}")
        except BadRecordError as error:
            problems.append(str(error))
    return len(dataset), problems


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data.lmdb_writer", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", nargs="?", help="ImageNet-style tree (train/, val/) or tiny-imagenet-200 folder")
    parser.add_argument("out", nargs="?", help="folder to write train.lmdb / val.lmdb into")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    parser.add_argument("--verify", action="store_true", help="re-read every record before publishing the file")
    parser.add_argument("--overwrite", action="store_true", help="replace existing OUT/<split>.lmdb files")
    parser.add_argument("--skip-bad-records", action="store_true", help="leave out unreadable images (counted)")
    parser.add_argument("--commit-every", type=int, default=1000, help="records per write transaction")
    parser.add_argument("--check", metavar="FILE.lmdb", help="read every record of an existing LMDB and report")
    parser.add_argument("--decode", action="store_true", help="with --check: also decode every image")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.check is None and (args.src is None or args.out is None):
        parser.error("give SRC and OUT, or --check FILE.lmdb")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        if args.check is not None:
            count, problems = check_lmdb(args.check, decode=args.decode, progress=not args.quiet)
            for problem in problems[:20]:
                print(f"bad record: {problem}", file=sys.stderr)
            if problems:
                raise UserError(f"{args.check}: {len(problems)} of {count} records are unreadable: re-create it "
                                "(sh/prepare_lmdb.sh) or train with --skip-bad-records")
            print(f"{args.check}: all {count} records readable")
            return 0
        src = os.path.expanduser(args.src)
        if not os.path.isdir(src):
            raise UserError(f"source folder {src} does not exist: give the folder holding train/ and val/")
        for split in args.splits:
            images = list_split(src, split, skip_bad_records=args.skip_bad_records)
            report = write_lmdb(images, os.path.join(os.path.expanduser(args.out), f"{split}.lmdb"),
                                verify=args.verify, overwrite=args.overwrite, skip_bad_records=args.skip_bad_records,
                                commit_every=args.commit_every, progress=not args.quiet)
            print(f"{report.path}: {report.records} images, {len(images.classes)} classes, "
                  f"{report.bytes / 1e6:.1f} MB" + (f", {report.skipped} skipped" if report.skipped else "")
                  + (", verified" if args.verify else ""))
        return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
