"""The LMDB reader (BiP's files), the writer, and the pick between LMDB and folders."""

from __future__ import annotations

import io
import os
import pickle

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from configs.errors import UserError
from data import build_dataset, build_loaders
from data.image_folder import scan_image_folder
from data.lmdb_reader import LmdbImages, close_lmdb_readers
from data.lmdb_writer import list_split, main as writer_main, verify_lmdb, write_lmdb
from tests.helpers.data_files import (EvalPayload, ShellPayload, TINY_WNIDS, image_bytes, tree_digest, write_bip_lmdb,
                                 write_image_folder, write_tiny_imagenet)


def _identity(image, generator):
    return image


def _records(n: int, *, classes: int = 4) -> list[tuple[bytes, int]]:
    return [(image_bytes(i, fmt="PNG" if i % 2 else "JPEG"), i % classes) for i in range(n)]


def _bip_pair(directory, train: list, val: list) -> None:
    os.makedirs(directory, exist_ok=True)
    write_bip_lmdb(os.path.join(directory, "train.lmdb"), train)
    write_bip_lmdb(os.path.join(directory, "val.lmdb"), val)


# ---------------------------------------------------------------- reading BiP's files

def test_reads_bip_lmdb_records(tmp_path):
    records = _records(6)
    _bip_pair(tmp_path, records, records[:3])
    splits = build_dataset("ImageNet", data_dir=str(tmp_path), image_dim=32)
    assert (len(splits.train), len(splits.test), splits.num_classes) == (6, 3, 1000)
    for i, (data, label) in enumerate(records):
        assert splits.train.raw(i) == (data, label)
        image, got = splits.test[i % 3]
        assert got == records[i % 3][1] and image.shape == (3, 32, 32)
    # Decoding is PIL's: the evaluation tensor of an image equals a direct decode of its bytes.
    plain = LmdbImages(os.path.join(tmp_path, "train.lmdb"), transform=_identity, num_classes=4)
    assert np.array_equal(np.asarray(plain[1][0]), np.asarray(Image.open(io.BytesIO(records[1][0])).convert("RGB")))


def test_lmdb_preferred_over_folders_and_lmdb_as_a_folder(tmp_path):
    write_image_folder(str(tmp_path / "train"), {"a": 1})
    write_image_folder(str(tmp_path / "val"), {"a": 1})
    _bip_pair(tmp_path, _records(5), _records(2))
    assert len(build_dataset("ImageNet", data_dir=str(tmp_path)).train) == 5
    # An environment stored as a folder holding data.mdb (subdir=True) works too.
    os.makedirs(tmp_path / "dir")
    env = lmdb.open(str(tmp_path / "dir" / "train.lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps(_records(1)[0]))
        txn.put(b"__len__", pickle.dumps(1))
    env.close()
    write_bip_lmdb(str(tmp_path / "dir" / "val.lmdb"), _records(1))
    assert len(build_dataset("ImageNet", data_dir=str(tmp_path / "dir")).train) == 1


def test_only_one_lmdb_file_is_an_error(tmp_path):
    write_bip_lmdb(str(tmp_path / "train.lmdb"), _records(2))
    with pytest.raises(UserError, match="val.lmdb"):
        build_dataset("ImageNet", data_dir=str(tmp_path))


def test_keys_only_len_only_and_non_canonical_keys(tmp_path):
    path = str(tmp_path / "a.lmdb")
    write_bip_lmdb(path, _records(3), with_len=False)
    assert len(LmdbImages(path, transform=_identity, num_classes=4)) == 3
    path = str(tmp_path / "b.lmdb")
    write_bip_lmdb(path, _records(3), with_keys=False)
    assert len(LmdbImages(path, transform=_identity, num_classes=4)) == 3
    path = str(tmp_path / "c.lmdb")
    env = lmdb.open(path, subdir=False, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for name, record in zip((b"img-b", b"img-a"), _records(2)):
            txn.put(name, pickle.dumps(record))
        txn.put(b"__keys__", pickle.dumps([b"img-b", b"img-a"]))
    env.close()
    dataset = LmdbImages(path, transform=_identity, num_classes=4)
    assert [dataset.raw(i)[1] for i in range(2)] == [0, 1] and dataset.key(1) == b"img-a"


def test_no_index_is_an_error(tmp_path):
    path = str(tmp_path / "x.lmdb")
    write_bip_lmdb(path, _records(2), with_keys=False, with_len=False)
    with pytest.raises(UserError, match="__len__"):
        LmdbImages(path, transform=_identity, num_classes=4)


# ---------------------------------------------------------------- hostile and broken files

@pytest.mark.parametrize("payload", [ShellPayload, EvalPayload])
def test_record_carrying_a_callable_is_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    records = _records(3)
    records[2] = pickle.dumps((payload(str(marker)), 1))
    path = str(tmp_path / "train.lmdb")
    write_bip_lmdb(path, records)
    dataset = LmdbImages(path, transform=_identity, num_classes=4, skip_bad_records=True)
    with pytest.raises(UserError) as err:
        dataset[2]  # never skipped, even with skip_bad_records: the file carries code
    assert path in str(err.value) and "b'2'" in str(err.value) and "refusing" in str(err.value)
    assert not marker.exists()


def test_index_carrying_a_callable_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "train.lmdb")
    env = lmdb.open(path, subdir=False, map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps(_records(1)[0]))
        txn.put(b"__len__", pickle.dumps(ShellPayload(str(marker))))
    env.close()
    with pytest.raises(UserError, match="__len__"):
        LmdbImages(path, transform=_identity, num_classes=4)
    assert not marker.exists()


def test_value_with_other_types_is_rejected(tmp_path):
    path = str(tmp_path / "train.lmdb")
    write_bip_lmdb(path, [pickle.dumps((np.zeros(3, dtype=np.uint8), 1))])
    with pytest.raises(UserError, match="numpy"):
        LmdbImages(path, transform=_identity, num_classes=4)
    path = str(tmp_path / "t.lmdb")
    write_bip_lmdb(path, [pickle.dumps(("text", 1.5))])
    with pytest.raises(UserError, match="expected \\(bytes, int\\)"):
        LmdbImages(path, transform=_identity, num_classes=4)


def test_truncated_lmdb_is_a_clear_error(tmp_path):
    path = str(tmp_path / "train.lmdb")
    write_bip_lmdb(path, _records(40))
    content = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(content[: len(content) // 2])
    with pytest.raises(UserError, match="truncated"):
        LmdbImages(path, transform=_identity, num_classes=4)
    with open(path, "wb") as handle:
        handle.write(content[:100])
    with pytest.raises(UserError, match="not a readable LMDB"):
        LmdbImages(path, transform=_identity, num_classes=4)
    with open(path, "wb") as handle:
        handle.write(os.urandom(20000))
    with pytest.raises(UserError, match="not a readable LMDB"):
        LmdbImages(path, transform=_identity, num_classes=4)


def test_missing_key_and_undecodable_image_error_or_skip(tmp_path):
    records = _records(4)
    records[1] = (b"\xff\xd8 this is not a JPEG", 1)
    path = str(tmp_path / "train.lmdb")
    write_bip_lmdb(path, records)
    env = lmdb.open(path, subdir=False, map_size=1 << 26, lock=False)
    with env.begin(write=True) as txn:
        txn.delete(b"2")  # listed in __keys__, gone from the file
    env.close()
    strict = LmdbImages(path, transform=_identity, num_classes=4)
    with pytest.raises(UserError, match="cannot decode.*b'1'"):
        strict[1]
    with pytest.raises(UserError, match="b'2' is listed in __keys__ but has no record"):
        strict[2]
    lenient = LmdbImages(path, transform=_identity, num_classes=4, skip_bad_records=True)
    assert lenient[1][1] == 3 and lenient.skipped_records == 2  # 1 and 2 skipped, 3 returned


def test_label_out_of_range_for_num_classes(tmp_path):
    _bip_pair(tmp_path, [(image_bytes(0), 7)], [(image_bytes(1), 0)])
    with pytest.raises(UserError, match="label 7, out of range for --num-classes 5: pass --num-classes 8"):
        build_dataset("ImageNet", data_dir=str(tmp_path), num_classes=5)
    assert build_dataset("ImageNet", data_dir=str(tmp_path), num_classes=8).num_classes == 8


def test_lmdb_loaders_with_workers_match_the_main_process(tmp_path):
    _bip_pair(tmp_path, _records(12), _records(4))
    single = build_loaders(build_dataset("ImageNet", data_dir=str(tmp_path), image_dim=16), batch_size=4,
                           test_batch_size=4, seed=1)
    # A second dataset on the same files in the same process shares the read handle.
    multi = build_loaders(build_dataset("ImageNet", data_dir=str(tmp_path), image_dim=16), batch_size=4,
                          test_batch_size=4, seed=1, num_workers=2)
    single.set_epoch(3)
    multi.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(single.train, multi.train):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


# ---------------------------------------------------------------- the writer

def test_writer_round_trips_every_image_byte_for_byte(tmp_path):
    src = tmp_path / "src"
    write_image_folder(str(src / "train"), {"b": 3, "a": 2, "c": 2})
    write_image_folder(str(src / "val"), {"c": 1, "a": 2}, seed=9)
    before = tree_digest(str(src))
    assert writer_main([str(src), str(tmp_path / "out"), "--verify", "--quiet"]) == 0
    assert tree_digest(str(src)) == before
    assert sorted(os.listdir(tmp_path / "out")) == ["train.lmdb", "val.lmdb"]  # no partial files left
    splits = build_dataset("ImageNet", data_dir=str(tmp_path / "out"), num_classes=3)
    for ours, split in ((splits.train, "train"), (splits.test, "val")):
        listing = scan_image_folder(str(src / split), fix="", class_to_idx={"a": 0, "b": 1, "c": 2})
        assert len(ours) == len(listing)
        for i, (path, label) in enumerate(listing.samples()):
            assert ours.raw(i) == (open(path, "rb").read(), label)
    # BiP's own loader (plain pickle.loads on __keys__ and records) reads our files too.
    close_lmdb_readers()  # py-lmdb allows one handle per file and process
    env = lmdb.open(str(tmp_path / "out" / "val.lmdb"), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        keys = pickle.loads(txn.get(b"__keys__"))
        assert keys == [b"0", b"1", b"2"] and pickle.loads(txn.get(b"__len__")) == 3
        assert [pickle.loads(txn.get(k))[1] for k in keys] == [0, 0, 2]
    env.close()


def test_writer_reads_tiny_imagenet_in_place(tmp_path):
    base = write_tiny_imagenet(str(tmp_path))
    before = tree_digest(base)
    assert writer_main([base, base, "--quiet"]) == 0  # OUT may be the dataset folder itself
    assert tree_digest(base) != before  # two new files were added...
    for name in ("train.lmdb", "val.lmdb"):
        os.remove(os.path.join(base, name))
    assert tree_digest(base) == before  # ...and nothing else changed
    writer_main([base, str(tmp_path / "lmdb"), "--quiet"])
    from_folder = build_dataset("TinyImageNet", data_dir=str(tmp_path))
    from_lmdb = build_dataset("TinyImageNet", data_dir=str(tmp_path / "lmdb"))
    assert from_lmdb.num_classes == 200 and len(from_lmdb.test) == len(from_folder.test) == 6
    for i in range(6):
        assert from_lmdb.test.raw(i) == from_folder.test.raw(i)
        assert torch.equal(from_lmdb.test[i][0], from_folder.test[i][0])
    assert [from_lmdb.train.raw(i)[1] for i in range(9)] == [i // 3 for i in range(9)]
    assert sorted(TINY_WNIDS)[from_lmdb.test.raw(0)[1]] == TINY_WNIDS[0]  # val_0's annotation


def test_writer_is_atomic(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_image_folder(str(src / "train"), {"a": 3})
    listing = list_split(str(src), "train")
    import data.lmdb_writer as writer

    calls = {"n": 0}
    real_put_all = writer._put_all

    def interrupted(env, items):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_put_all(env, items)

    monkeypatch.setattr(writer, "_put_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_lmdb(listing, str(tmp_path / "out" / "train.lmdb"), commit_every=1, progress=False)
    assert os.listdir(tmp_path / "out") == []  # neither train.lmdb nor a partial file
    monkeypatch.undo()
    # A conversion killed outright leaves only a hidden partial file, which nothing mistakes for data.
    os.makedirs(tmp_path / "killed")
    write_bip_lmdb(str(tmp_path / "killed" / ".train.lmdb.partial-123"), _records(2))
    write_bip_lmdb(str(tmp_path / "killed" / ".val.lmdb.partial-123"), _records(2))
    with pytest.raises(UserError, match="ImageNet not found"):
        build_dataset("ImageNet", data_dir=str(tmp_path / "killed"))


def test_writer_refuses_bad_images_and_existing_output(tmp_path, capsys):
    src = tmp_path / "src"
    write_image_folder(str(src / "train"), {"a": 2})
    write_image_folder(str(src / "val"), {"a": 1})
    (src / "train" / "a" / "img_9.JPEG").write_bytes(b"garbage")
    assert writer_main([str(src), str(tmp_path / "out"), "--quiet"]) == 2
    assert "img_9.JPEG" in capsys.readouterr().err and not os.path.exists(tmp_path / "out" / "train.lmdb")
    assert writer_main([str(src), str(tmp_path / "out"), "--quiet", "--skip-bad-records"]) == 0
    assert "1 skipped" in capsys.readouterr().out
    assert len(LmdbImages(str(tmp_path / "out" / "train.lmdb"), transform=_identity, num_classes=1)) == 2
    assert writer_main([str(src), str(tmp_path / "out"), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_verify_and_check_detect_damage(tmp_path, capsys):
    src = tmp_path / "src"
    write_image_folder(str(src / "train"), {"a": 2, "b": 1})
    out = str(tmp_path / "train.lmdb")
    write_lmdb(list_split(str(src), "train"), out, progress=False)
    assert writer_main(["--check", out, "--decode", "--quiet"]) == 0
    with pytest.raises(UserError, match="verification .* failed at record 0"):
        verify_lmdb(out, crcs=[0, 0, 0], labels=[0, 0, 1], progress=False)
    close_lmdb_readers()
    env = lmdb.open(out, subdir=False, map_size=1 << 26, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"1", pickle.dumps((b"garbage", 0)))
    env.close()
    assert writer_main(["--check", out, "--decode", "--quiet"]) == 2
    assert "1 of 3 records are unreadable" in capsys.readouterr().err


def test_shell_wrapper_runs_the_writer(tmp_path):
    import subprocess
    import sys

    base = write_tiny_imagenet(str(tmp_path))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(["bash", os.path.join(repo, "sh", "prepare_lmdb.sh"), base, str(tmp_path / "out"),
                             "--quiet"], env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                            text=True, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["train.lmdb", "val.lmdb"]


def _png_bomb(side: int = 100_000) -> bytes:
    """A valid PNG header that declares side x side pixels (10^10): PIL refuses it from the header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_a_decompression_bomb_in_record_0_is_refused_when_the_file_is_opened(tmp_path):
    """Before the run folder exists (the dataset is built first), as any other defect of record 0."""
    records = _records(3)
    records[0] = (_png_bomb(), 0)
    path = str(tmp_path / "train.lmdb")
    write_bip_lmdb(path, records)
    with pytest.raises(UserError, match=r"key b'0' is not a readable image \(DecompressionBombError\)"):
        LmdbImages(path, transform=_identity, num_classes=4)
    lenient = LmdbImages(path, transform=_identity, num_classes=4, skip_bad_records=True)
    assert lenient[0][1] == 1 and lenient.skipped_records == 1
