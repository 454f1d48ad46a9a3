"""The ImageNet val sorter and the data benchmark."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from configs.errors import UserError
from data import build_dataset
from data.imagenet_val import main as val_main, sort_val_folder
from tests.helpers.data_files import image_bytes, tree_digest, write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WNIDS = ["n01751748", "n09193705", "n01751748", "n02105855", "n09193705"]


@pytest.fixture
def flat_val(tmp_path) -> str:
    folder = tmp_path / "ILSVRC2012_img_val"
    folder.mkdir()
    for i in range(len(WNIDS)):
        (folder / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(image_bytes(i))
    return str(folder)


def _names(i: int) -> str:
    return f"ILSVRC2012_val_{i + 1:08d}"


def test_sorts_from_a_file_wnid_list_without_touching_the_source(tmp_path, flat_val):
    mapping = tmp_path / "map.txt"
    mapping.write_text("".join(f"{_names(i)}.JPEG {w}\n" for i, w in enumerate(WNIDS)))
    before = tree_digest(flat_val)
    out = tmp_path / "imagenet" / "val"
    assert sort_val_folder(flat_val, str(mapping), str(out), progress=False) == 5
    assert tree_digest(flat_val) == before
    assert sorted(os.listdir(out)) == sorted(set(WNIDS))
    for i, wnid in enumerate(WNIDS):
        placed = out / wnid / f"{_names(i)}.JPEG"
        assert os.path.samefile(placed, os.path.join(flat_val, f"{_names(i)}.JPEG"))  # a hard link
    # Rerunning is harmless; the result reads as ImageNet's val split.
    assert sort_val_folder(flat_val, str(mapping), str(out), progress=False) == 0
    write_image_folder(str(tmp_path / "imagenet" / "train"), {w: 1 for w in set(WNIDS)})
    splits = build_dataset("ImageNet", data_dir=str(tmp_path / "imagenet"))
    assert sorted(splits.test[i][1] for i in range(5)) == [0, 0, 1, 2, 2]


def test_sorts_from_kaggle_csv_by_copy(tmp_path, flat_val):
    mapping = tmp_path / "LOC_val_solution.csv"
    mapping.write_text("ImageId,PredictionString\n"
                       + "".join(f"{_names(i)},{w} 1 2 30 40 {w} 5 6 7 8\n" for i, w in enumerate(WNIDS)))
    out = tmp_path / "val"
    assert val_main(["--src", flat_val, "--mapping", str(mapping), "--out", str(out), "--mode", "copy",
                     "--quiet"]) == 0
    placed = out / WNIDS[1] / f"{_names(1)}.JPEG"
    assert placed.read_bytes() == image_bytes(1)
    assert not os.path.samefile(placed, os.path.join(flat_val, f"{_names(1)}.JPEG"))


def test_bad_mappings_are_one_line_errors(tmp_path, flat_val):
    out = str(tmp_path / "val")
    partial = tmp_path / "partial.txt"
    partial.write_text(f"{_names(0)}.JPEG n01751748\n")
    with pytest.raises(UserError, match="4 images of the val folder are not in"):
        sort_val_folder(flat_val, str(partial), out, progress=False)
    ids = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    ids.write_text("490\n361\n171\n822\n297\n")
    with pytest.raises(UserError, match="meta.mat"):
        sort_val_folder(flat_val, str(ids), out, progress=False)
    evil = tmp_path / "evil.txt"
    evil.write_text("".join(f"{_names(i)}.JPEG ..\n" for i in range(5)))
    with pytest.raises(UserError, match="cannot be a class folder name"):
        sort_val_folder(flat_val, str(evil), out, progress=False)
    with pytest.raises(UserError, match="inside --src"):
        sort_val_folder(flat_val, str(partial), os.path.join(flat_val, "sorted"), progress=False)
    assert not os.path.exists(out) or os.listdir(out) == []


def test_shell_wrapper_sorts_val(tmp_path, flat_val):
    mapping = tmp_path / "map.txt"
    mapping.write_text("".join(f"{_names(i)}.JPEG {w}\n" for i, w in enumerate(WNIDS)))
    result = subprocess.run(["bash", os.path.join(REPO, "sh", "prepare_imagenet_val.sh"), "--src", flat_val,
                             "--mapping", str(mapping), "--out", str(tmp_path / "val"), "--quiet"],
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(tmp_path / "val")) == 3


def test_bench_reports_both_backends():
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        import bench_data
    finally:
        sys.path.pop(0)
    rows = bench_data.run(images=12, size=(64, 48), workers=0, repeats=1)
    backends = {(backend, stage) for backend, stage, _, rate in rows if backend != "sizes" and rate > 0}
    assert {("folder", "read bytes (shuffled)"), ("lmdb", "read bytes (shuffled)"),
            ("folder", "decode+resize+crop"), ("lmdb", "decode+resize+crop")} <= backends
