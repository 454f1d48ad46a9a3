"""Data registry, Digits, CIFAR10/100, the restricted unpickler and the loaders."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from configs.errors import UserError
from data import DatasetSplits, build_dataset, build_loaders, dataset_names
from data.cifar import CIFAR10, read_batch
from data.digits import SPLIT_SEED, TEST_FRACTION, VAL_FRACTION, load_digit_arrays, stratified_split
from data.safe_pickle import NUMPY_GLOBALS, safe_loads
from data.tensor_dataset import InMemoryImages
from data.tensor_ops import Compose, RandomCropPadded, RandomHorizontalFlip, ToFloat
from tests.helpers.data_files import (EvalPayload, ShellPayload, fake_cifar_images, py2_pickle, write_cifar10,
                                 write_cifar100)


# ---------------------------------------------------------------- registry

def test_registry_names_and_closest_suggestion():
    assert {"Digits", "CIFAR10", "CIFAR100"} <= set(dataset_names())
    with pytest.raises(UserError, match="did you mean 'CIFAR100'"):
        build_dataset("CIFAR-100", data_dir=".")
    with pytest.raises(UserError) as err:
        build_dataset("digit", data_dir=".")
    assert "'Digits'" in str(err.value) and "\n" not in str(err.value)


def test_name_is_case_insensitive():
    assert build_dataset("digits", data_dir="/nonexistent").num_classes == 10


# ---------------------------------------------------------------- Digits

@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    return build_dataset("Digits", data_dir="/nonexistent")


def test_digits_split_is_fixed_stratified_and_disjoint(digits):
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1259, 179, 359)
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, 8)
    _, labels = load_digit_arrays()
    train, val, test = stratified_split(labels, seed=SPLIT_SEED, val_fraction=VAL_FRACTION,
                                        test_fraction=TEST_FRACTION)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert len(set(train) | set(val) | set(test)) == len(labels) == 1797
    # Pinned: the split must be the same on every machine and in every version of this code.
    assert (int(train.sum()), int(val.sum()), int(test.sum())) == (1142717, 159162, 311827)
    for split in (digits.train, digits.val, digits.test):
        assert set(split.labels.tolist()) == set(range(10))


def test_digits_items_and_determinism(digits):
    image, label = digits.train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32 and isinstance(label, int)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    again = build_dataset("Digits", data_dir="/nonexistent")
    for i in (0, 5, 100):
        assert torch.equal(again.test[i][0], digits.test[i][0]) and again.test[i][1] == digits.test[i][1]


def test_digits_normalize_uses_train_statistics():
    splits = build_dataset("Digits", data_dir=".", normalize=True)
    stacked = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    assert abs(float(stacked.mean())) < 1e-4 and abs(float(stacked.std()) - 1.0) < 1e-3


def test_digits_image_dim_resizes():
    splits = build_dataset("Digits", data_dir=".", image_dim=16)
    assert splits.image_size == 16 and splits.train[0][0].shape == (1, 16, 16)


# ---------------------------------------------------------------- CIFAR

def test_cifar10_reads_real_layout(tmp_path):
    write_cifar10(str(tmp_path))
    splits = build_dataset("CIFAR10", data_dir=str(tmp_path))
    assert (len(splits.train), len(splits.test), splits.val) == (10, 3, None)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 3, 32)
    # Evaluation items are ToTensor of the stored rows (C-major 3 x 32 x 32, /255).
    raw = fake_cifar_images(3, seed=5)  # the test batch is the sixth file written
    image, label = splits.test[1]
    assert torch.allclose(image, torch.from_numpy(raw[1].reshape(3, 32, 32)).float() / 255)
    assert label == (5 * 7 + 1) % 10
    labels = [splits.train[i][1] for i in range(len(splits.train))]
    assert labels[:2] == [0, 1] and labels[2:4] == [7, 8]  # data_batch_1 then data_batch_2
    # data_dir may also point at the extracted folder itself.
    same = build_dataset("CIFAR10", data_dir=str(tmp_path / "cifar-10-batches-py"))
    assert torch.equal(same.test[1][0], image)


def test_cifar10_accepts_python3_pickles(tmp_path):
    write_cifar10(str(tmp_path), writer=lambda entry: pickle.dumps(entry, protocol=2))
    assert len(build_dataset("CIFAR10", data_dir=str(tmp_path)).train) == 10
    write_cifar10(str(tmp_path), writer=lambda entry: pickle.dumps(entry, protocol=4))
    assert len(build_dataset("CIFAR10", data_dir=str(tmp_path)).train) == 10


def test_cifar100_loads_cifar100_for_every_split(tmp_path):
    write_cifar100(str(tmp_path))
    write_cifar10(str(tmp_path))  # both present: CIFAR100 must not pick up CIFAR10 files (HYDRA's bug)
    splits = build_dataset("CIFAR100", data_dir=str(tmp_path))
    assert (len(splits.train), len(splits.test), splits.num_classes) == (4, 3, 100)
    assert [splits.test[i][1] for i in range(3)] == [99, 86, 73]
    assert max(splits.train[i][1] for i in range(4)) == 99


def test_cifar_train_augmentation_crops_and_flips(tmp_path):
    write_cifar10(str(tmp_path))
    splits = build_dataset("CIFAR10", data_dir=str(tmp_path))
    outputs = [splits.train[(0, seed)][0] for seed in range(40)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.float32 for o in outputs)
    assert torch.equal(splits.train[(0, 7)][0], splits.train[(0, 7)][0])  # same key, same sample
    # Some crops shift zero padding in; some samples are flipped; not all samples are equal.
    assert any(bool((o[:, 0, :] == 0).all() or (o[:, :, 0] == 0).all()) for o in outputs)
    assert len({o.sum().item() for o in outputs}) > 5
    plain = torch.from_numpy(fake_cifar_images(2, seed=0)[0].reshape(3, 32, 32)).float() / 255
    assert any(torch.equal(o, plain.flip(-1)) for o in outputs) or any(torch.equal(o, plain) for o in outputs)


def test_cifar_normalize(tmp_path):
    write_cifar10(str(tmp_path))
    plain = build_dataset("CIFAR10", data_dir=str(tmp_path)).test[0][0]
    normed = build_dataset("CIFAR10", data_dir=str(tmp_path), normalize=True).test[0][0]
    mean = torch.tensor(CIFAR10.mean).view(3, 1, 1)
    std = torch.tensor(CIFAR10.std).view(3, 1, 1)
    assert torch.allclose(normed, (plain - mean) / std, atol=1e-6)


def test_cifar_missing_names_the_path(tmp_path):
    with pytest.raises(UserError) as err:
        build_dataset("CIFAR10", data_dir=str(tmp_path))
    message = str(err.value)
    assert os.path.join(str(tmp_path), "cifar-10-batches-py", "data_batch_1") in message
    assert "cifar-10-python.tar.gz" in message and "\n" not in message
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"")
    with pytest.raises(UserError, match="tar xzf"):
        build_dataset("CIFAR100", data_dir=str(tmp_path))


def test_cifar_num_classes_too_small(tmp_path):
    write_cifar100(str(tmp_path))
    with pytest.raises(UserError, match="--num-classes 100"):
        build_dataset("CIFAR100", data_dir=str(tmp_path), num_classes=10)
    assert build_dataset("CIFAR100", data_dir=str(tmp_path), num_classes=128).num_classes == 128


@pytest.mark.parametrize("payload", [ShellPayload, EvalPayload])
def test_malicious_cifar_pickle_is_refused_and_nothing_runs(tmp_path, payload):
    folder = write_cifar10(str(tmp_path / "data"))
    marker = tmp_path / "pwned"
    entry = {"data": payload(str(marker)), "labels": [0]}
    with open(os.path.join(folder, "data_batch_1"), "wb") as handle:
        pickle.dump(entry, handle, protocol=2)
    with pytest.raises(UserError) as err:
        build_dataset("CIFAR10", data_dir=str(tmp_path / "data"))
    assert os.path.join(folder, "data_batch_1") in str(err.value) and "refusing" in str(err.value)
    assert not marker.exists()
    pickle.loads(pickle.dumps(payload(str(tmp_path / "live"))))  # the payload is live: plain pickle runs it
    assert (tmp_path / "live").exists()


def test_truncated_and_wrong_cifar_files(tmp_path):
    folder = write_cifar10(str(tmp_path))
    path = os.path.join(folder, "test_batch")
    content = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(content[: len(content) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        read_batch(path, layout=CIFAR10)
    with open(path, "wb") as handle:
        handle.write(py2_pickle({"data": fake_cifar_images(2, seed=0), "fine_labels": [1, 2]}))
    with pytest.raises(UserError, match="'labels'"):
        read_batch(path, layout=CIFAR10)


def test_safe_loads_rejects_object_dtype_and_plain_globals():
    ok = safe_loads(pickle.dumps((b"abc", 3, ["x"], {"k": 1.5})), source="mem")
    assert ok == (b"abc", 3, ["x"], {"k": 1.5})
    with pytest.raises(UserError, match="collections.OrderedDict"):
        safe_loads(pickle.dumps(__import__("collections").OrderedDict()), source="mem")
    object_array = np.array([1, "a"], dtype=object)
    with pytest.raises(UserError):
        safe_loads(pickle.dumps(object_array, protocol=2), source="mem", allowed=NUMPY_GLOBALS)
    real = np.arange(12, dtype=np.int32).reshape(3, 4)
    assert np.array_equal(safe_loads(pickle.dumps(real), source="mem", allowed=NUMPY_GLOBALS), real)


# ---------------------------------------------------------------- loaders

def _toy_splits(n: int = 40) -> DatasetSplits:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 6, 6).contiguous()
    augment = Compose([RandomCropPadded(size=6, padding=2), RandomHorizontalFlip(), ToFloat(scale=1.0)])
    train = InMemoryImages(images, torch.arange(n), transform=augment)
    test = InMemoryImages(images, torch.arange(n), transform=ToFloat(scale=1.0))
    return DatasetSplits(train=train, val=None, test=test, num_classes=n, in_channels=1, image_size=6)


def _epoch(loader) -> tuple[list[int], torch.Tensor]:
    labels, images = [], []
    for x, y in loader:
        labels += y.tolist()
        images.append(x)
    return labels, torch.cat(images)


def test_set_epoch_fixes_order_and_augmentation():
    loaders = build_loaders(_toy_splits(), batch_size=8, test_batch_size=16, seed=3)
    loaders.set_epoch(2)
    first = _epoch(loaders.train)
    loaders.set_epoch(2)
    again = _epoch(loaders.train)
    assert first[0] == again[0] and torch.equal(first[1], again[1])
    loaders.set_epoch(3)
    assert _epoch(loaders.train)[0] != first[0]
    assert sorted(first[0]) == list(range(40))
    # A fresh Loaders with the same seed (a resumed run) replays epoch 2 exactly.
    resumed = build_loaders(_toy_splits(), batch_size=8, test_batch_size=16, seed=3)
    resumed.set_epoch(2)
    replay = _epoch(resumed.train)
    assert replay[0] == first[0] and torch.equal(replay[1], first[1])
    # Another seed, another order.
    other = build_loaders(_toy_splits(), batch_size=8, test_batch_size=16, seed=4)
    other.set_epoch(2)
    assert _epoch(other.train)[0] != first[0]


def test_epochs_advance_without_set_epoch():
    loaders = build_loaders(_toy_splits(), batch_size=8, test_batch_size=16)
    assert _epoch(loaders.train)[0] != _epoch(loaders.train)[0]


def test_upper_stream_is_an_independent_shuffle_of_train():
    loaders = build_loaders(_toy_splits(), batch_size=8, test_batch_size=16, seed=0)
    loaders.set_epoch(0)
    train, upper = _epoch(loaders.train)[0], _epoch(loaders.upper)[0]
    assert sorted(train) == sorted(upper) == list(range(40)) and train != upper
    test_labels, _ = _epoch(loaders.test)
    assert test_labels == list(range(40)) and loaders.val is None


def test_val_fraction_holds_out_disjoint_indices():
    loaders = build_loaders(_toy_splits(), batch_size=8, test_batch_size=16, seed=1, val_fraction=0.25)
    loaders.set_epoch(0)
    train, upper = set(_epoch(loaders.train)[0]), set(_epoch(loaders.upper)[0])
    assert len(upper) == 10 and len(train) == 30 and not train & upper and train | upper == set(range(40))
    again = build_loaders(_toy_splits(), batch_size=8, test_batch_size=16, seed=1, val_fraction=0.25)
    again.set_epoch(5)
    assert set(_epoch(again.upper)[0]) == upper  # the held-out set does not move between epochs
    with pytest.raises(UserError, match="--val-fraction"):
        build_loaders(_toy_splits(), batch_size=8, test_batch_size=16, val_fraction=1.5)
    with pytest.raises(UserError, match="empty split"):
        build_loaders(_toy_splits(), batch_size=8, test_batch_size=16, val_fraction=0.001)


def test_data_fraction_range_and_empty_splits():
    loaders = build_loaders(_toy_splits(), batch_size=8, test_batch_size=16, seed=1, data_fraction=0.5)
    assert len(_epoch(loaders.train)[0]) == 20
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(UserError, match="--data-fraction"):
            build_loaders(_toy_splits(), batch_size=8, test_batch_size=16, data_fraction=bad)
    with pytest.raises(UserError, match="empty"):
        build_loaders(_toy_splits(), batch_size=8, test_batch_size=16, data_fraction=0.01, val_fraction=0.5)


def test_workers_give_the_same_batches_as_the_main_process():
    single = build_loaders(_toy_splits(), batch_size=8, test_batch_size=16, seed=2)
    multi = build_loaders(_toy_splits(), batch_size=8, test_batch_size=16, seed=2, num_workers=2)
    assert multi.train.persistent_workers and not single.train.persistent_workers
    for epoch in (0, 1):
        single.set_epoch(epoch)
        multi.set_epoch(epoch)
        a, b = _epoch(single.train), _epoch(multi.train)
        assert a[0] == b[0] and torch.equal(a[1], b[1])
