"""The device data path (--decode gpu) run with device="cpu": the very code CUDA runs, against the CPU path.

Tolerance of the pixels: both paths decode with libjpeg, crop the same box and resample with the
same bilinear (triangle) filter, but PIL rounds to uint8 after each resize while the device path
stays in float32 until the end. So a pixel may differ by the rounding, at most 0.5/255 per rounding
step, plus float error; TOL allows 1.5/255 (in [0, 1] units, before normalization). A wrong crop,
scale or flip moves noise pixels by tens of levels, far outside it.
"""

from __future__ import annotations

import os

import pytest
import torch

from configs.errors import UserError
from data import build_dataset, build_loaders, device_ops, pil_ops
from data.bad_records import BadRecordError
from data.encoded import EncodedImages, collate_encoded
from data.gpu_decode import DeviceLoader, DeviceTransform, decode_on_device, encoded_splits
from tests.helpers.cli import run_error
from tests.helpers.data_files import image_bytes, write_bip_lmdb, write_image_folder, write_tiny_imagenet

TOL = 1.5 / 255
CPU = torch.device("cpu")


def _records(n: int) -> list[tuple[bytes, int]]:
    # Sizes differ per image (crop boxes depend on them); every fourth image is a PNG (decoded on the CPU).
    return [(image_bytes(i, size=(90 + 7 * i, 70 + 5 * i), fmt="PNG" if i % 4 == 3 else "JPEG"), i % 3)
            for i in range(n)]


@pytest.fixture
def lmdb_dir(tmp_path) -> str:
    write_bip_lmdb(str(tmp_path / "train.lmdb"), _records(12))
    write_bip_lmdb(str(tmp_path / "val.lmdb"), _records(7))
    return str(tmp_path)


@pytest.fixture
def folder_dir(tmp_path) -> str:  # write_image_folder makes every third image a PNG
    write_image_folder(str(tmp_path / "train"), {"a": 4, "b": 3}, size=(80, 60))
    write_image_folder(str(tmp_path / "val"), {"a": 2, "b": 3}, seed=50, size=(60, 80))
    return str(tmp_path)


def both_paths(dataset: str, data_dir: str, **kwargs):
    cpu = build_dataset(dataset, data_dir=data_dir, **kwargs)
    return cpu, encoded_splits(cpu, dataset=dataset, normalize=kwargs.get("normalize", False), device=CPU)


def device_batch(split: EncodedImages, keys: list) -> tuple[torch.Tensor, torch.Tensor]:
    return DeviceTransform(split)(collate_encoded([split[k] for k in keys]))


def cpu_batch(split, keys: list) -> tuple[torch.Tensor, torch.Tensor]:
    items = [split[k] for k in keys]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("source", ["lmdb", "folder"])
def test_evaluation_batches_match_the_cpu_path(lmdb_dir, folder_dir, source, normalize):
    cpu, dev = both_paths("ImageNet", lmdb_dir if source == "lmdb" else folder_dir, image_dim=48,
                          normalize=normalize)
    keys = list(range(len(cpu.test)))
    (x, y), (ref, ref_y) = device_batch(dev.test, keys), cpu_batch(cpu.test, keys)
    assert x.shape == ref.shape == (len(keys), 3, 48, 48) and x.dtype == torch.float32
    assert torch.equal(y, ref_y)
    scale = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) if normalize else 1.0  # undo the std
    assert ((x - ref) * scale).abs().max() <= TOL


def test_training_crop_boxes_and_flips_are_the_cpu_paths(lmdb_dir, monkeypatch):
    drawn: dict[str, list] = {"cpu": [], "device": []}
    original = pil_ops.random_resized_crop_box

    def spy(path):
        def box(width, height, **kwargs):
            result = original(width, height, **kwargs)
            drawn[path].append((width, height, result))
            return result
        return box

    monkeypatch.setattr(pil_ops, "random_resized_crop_box", spy("cpu"))
    monkeypatch.setattr(device_ops, "random_resized_crop_box", spy("device"))
    cpu, dev = both_paths("ImageNet", lmdb_dir, image_dim=40)
    keys = [(i, 7919 * i + 3) for i in range(len(cpu.train))]
    ref, _ = cpu_batch(cpu.train, keys)
    x, _ = device_batch(dev.train, keys)
    assert len(drawn["cpu"]) == len(keys) and drawn["device"] == drawn["cpu"]  # same sizes, same boxes
    flips = 0
    for i in range(len(keys)):  # noise images: the other flip decision would be far outside TOL
        assert (x[i] - ref[i]).abs().max() <= TOL
        flips += int((x[i].flip(-1) - ref[i]).abs().max() <= TOL)
    assert flips == 0 and x.shape == (len(keys), 3, 40, 40)


def test_tiny_imagenet_padded_crops_and_flips_match(tmp_path):
    write_tiny_imagenet(str(tmp_path))
    cpu, dev = both_paths("TinyImageNet", str(tmp_path), image_dim=32, normalize=True)
    keys = [(i, 31 * i + 1) for i in range(len(cpu.train))]
    std = torch.tensor([0.2302, 0.2265, 0.2262]).view(1, 3, 1, 1)
    for split, chosen in ((cpu.train, keys), (cpu.test, list(range(len(cpu.test))))):
        device_split = dev.train if split is cpu.train else dev.test
        (x, y), (ref, ref_y) = device_batch(device_split, chosen), cpu_batch(split, chosen)
        assert torch.equal(y, ref_y) and ((x - ref) * std).abs().max() <= TOL


def test_non_jpeg_records_are_decoded_by_the_worker(lmdb_dir):
    _, dev = both_paths("ImageNet", lmdb_dir)
    png, jpeg = dev.train[(3, 0)][0], dev.train[(0, 0)][0]
    assert png.dtype == jpeg.dtype == torch.uint8
    assert png.shape == (3, 70 + 15, 90 + 21) and jpeg.dim() == 1  # PNG pixels, JPEG bytes


def _corrupt(lmdb_dir: str) -> None:
    records = _records(12)
    records[5] = (records[5][0][:200], records[5][1])  # a truncated JPEG
    os.remove(os.path.join(lmdb_dir, "train.lmdb"))
    write_bip_lmdb(os.path.join(lmdb_dir, "train.lmdb"), records)


def test_corrupt_record_names_itself_or_is_skipped_as_on_the_cpu(lmdb_dir):
    _corrupt(lmdb_dir)
    _, dev = both_paths("ImageNet", lmdb_dir, image_dim=32)
    keys = [(i, 100 + i) for i in range(4, 8)]
    with pytest.raises(BadRecordError) as err:
        device_batch(dev.train, keys)
    message = str(err.value)
    assert f"{os.path.join(lmdb_dir, 'train.lmdb')} key b'5'" in message and "--skip-bad-records" in message
    assert "\n" not in message

    cpu, dev = both_paths("ImageNet", lmdb_dir, image_dim=32, skip_bad_records=True)
    x, y = device_batch(dev.train, keys)
    ref, ref_y = cpu_batch(cpu.train, keys)  # record 5 -> record 6 with key 5's augmentation
    assert torch.equal(y, ref_y) and (x - ref).abs().max() <= TOL
    assert dev.train.skipped_records == 2  # once on each path: the policy is the base dataset's


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_wrapper_yields_the_cpu_loaders_batches_on_the_device(lmdb_dir, num_workers):
    cpu, dev = both_paths("ImageNet", lmdb_dir, image_dim=32)
    settings = dict(batch_size=5, test_batch_size=4, seed=3, num_workers=num_workers)
    cpu_loaders, dev_loaders = build_loaders(cpu, **settings), build_loaders(dev, **settings)
    assert isinstance(dev_loaders.train, DeviceLoader) and dev_loaders.train.dataset is dev.train
    for epoch in (0, 1):
        cpu_loaders.set_epoch(epoch)
        dev_loaders.set_epoch(epoch)  # reaches the sampler through the wrapper
        for name in ("train", "upper", "test"):
            ours, theirs = list(getattr(dev_loaders, name)), list(getattr(cpu_loaders, name))
            assert len(ours) == len(theirs) == len(getattr(dev_loaders, name))
            for (x, y), (ref, ref_y) in zip(ours, theirs):
                assert x.device == y.device == CPU and torch.equal(y, ref_y) and (x - ref).abs().max() <= TOL
    stream = dev_loaders.stream(9, epoch=0, batch_size=3)  # the OBS gradients' stream decodes too
    (x, y), (ref, ref_y) = next(stream), next(cpu_loaders.stream(9, epoch=0, batch_size=3))
    assert x.shape == (3, 3, 32, 32) and torch.equal(y, ref_y) and (x - ref).abs().max() <= TOL


def test_decode_mode_resolution():
    cuda = torch.device("cuda")  # a device object needs no GPU
    assert decode_on_device("auto", dataset="ImageNet", device=cuda)
    assert decode_on_device("auto", dataset="TinyImageNet", device=cuda)
    assert not decode_on_device("auto", dataset="ImageNet", device=CPU)
    assert not decode_on_device("auto", dataset="CIFAR10", device=cuda)
    assert not decode_on_device("cpu", dataset="ImageNet", device=cuda)
    assert decode_on_device("gpu", dataset="ImageNet", device=cuda)
    with pytest.raises(UserError, match="--decode gpu needs a CUDA device .*: pass --decode cpu"):
        decode_on_device("gpu", dataset="ImageNet", device=CPU)
    with pytest.raises(UserError, match="JPEG datasets only .* not Digits: pass --decode cpu"):
        decode_on_device("gpu", dataset="Digits", device=cuda)


def test_cli_decode_gpu_without_cuda_or_on_another_dataset_exits_2(tmp_path, capsys, lmdb_dir):
    err = run_error(tmp_path, capsys, "--no-progress", "--dataset", "ImageNet", "--data-dir", lmdb_dir, "--device", "cpu",
                    "--decode", "gpu", "--arch", "resnet18")
    assert "--decode gpu needs a CUDA device" in err and "pass --decode cpu" in err
    err = run_error(tmp_path, capsys, "--no-progress", "--dataset", "Digits", "--decode", "gpu", "--device", "cpu")
    assert "not Digits: pass --decode cpu" in err
