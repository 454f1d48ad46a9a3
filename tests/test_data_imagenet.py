"""ImageNet and TinyImageNet read from image folders (the LMDB side is in test_data_lmdb.py)."""

from __future__ import annotations

import io
import os

import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from configs.errors import UserError
from data import build_dataset, build_loaders
from data.image_folder import scan_tiny_train
from tests.helpers.data_files import TINY_WNIDS, image_bytes, tree_digest, write_image_folder, write_tiny_imagenet

CLASSES = {"n02", "n10", "n01"}


@pytest.fixture
def imagenet(tmp_path) -> str:
    write_image_folder(str(tmp_path / "train"), {"n02": 3, "n10": 2, "n01": 4})
    write_image_folder(str(tmp_path / "val"), {"n02": 1, "n10": 2, "n01": 1}, seed=50)
    return str(tmp_path)


# ---------------------------------------------------------------- ImageNet folders

def test_imagenet_folder_labels_match_torchvision_imagefolder(imagenet):
    splits = build_dataset("ImageNet", data_dir=imagenet)
    assert (splits.num_classes, splits.in_channels, splits.image_size, splits.val) == (3, 3, 224, None)
    for ours, split in ((splits.train, "train"), (splits.test, "val")):
        reference = ImageFolder(os.path.join(imagenet, split))
        assert list(ours.classes) == reference.classes == ["n01", "n02", "n10"]
        assert ours.images.samples() == reference.samples
        assert [ours[i][1] for i in range(len(ours))] == reference.targets


def test_imagenet_transforms_and_image_dim(imagenet):
    splits = build_dataset("ImageNet", data_dir=imagenet)
    image, _ = splits.train[(0, 123)]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert torch.equal(splits.train[(0, 123)][0], image)  # the sample key fixes the random crop
    assert not torch.equal(splits.train[(0, 124)][0], image)
    assert splits.test[0][0].shape == (3, 224, 224)
    small = build_dataset("ImageNet", data_dir=imagenet, image_dim=32, normalize=True)
    assert small.image_size == 32 and small.train[(1, 5)][0].shape == small.test[1][0].shape == (3, 32, 32)
    assert float(small.test[0][0].min()) < 0  # normalized with the ImageNet mean/std


def test_imagenet_eval_is_resize_then_center_crop(tmp_path):
    write_image_folder(str(tmp_path / "train"), {"a": 1})
    os.makedirs(tmp_path / "val" / "a")
    # A 2:1 image: Resize(256) makes it 512x256, CenterCrop(224) keeps the middle.
    left_right = Image.new("RGB", (200, 100), (255, 0, 0))
    left_right.paste((0, 0, 255), (100, 0, 200, 100))
    left_right.save(tmp_path / "val" / "a" / "x.png")
    image, _ = build_dataset("ImageNet", data_dir=str(tmp_path)).test[0]
    assert image.shape == (3, 224, 224)
    assert image[0, 112, 10] > 0.9 and image[2, 112, 213] > 0.9  # red left half, blue right half


def test_val_labels_follow_the_train_class_order(tmp_path):
    write_image_folder(str(tmp_path / "train"), {"a": 1, "b": 1, "c": 1})
    write_image_folder(str(tmp_path / "val"), {"c": 2})  # a subset: ImageFolder(val) alone would say 0
    splits = build_dataset("ImageNet", data_dir=str(tmp_path))
    assert [splits.test[i][1] for i in range(2)] == [2, 2]
    write_image_folder(str(tmp_path / "val"), {"zzz": 1})
    with pytest.raises(UserError, match="zzz"):
        build_dataset("ImageNet", data_dir=str(tmp_path))


def test_imagenet_missing_data_names_what_to_put_where(tmp_path):
    with pytest.raises(UserError) as err:
        build_dataset("ImageNet", data_dir=str(tmp_path))
    message = str(err.value)
    assert os.path.join(str(tmp_path), "train") in message and "train.lmdb" in message and "\n" not in message
    write_image_folder(str(tmp_path / "train"), {"a": 1})
    with pytest.raises(UserError, match="val"):
        build_dataset("ImageNet", data_dir=str(tmp_path))


def test_flat_val_folder_points_to_the_sorting_script(tmp_path):
    write_image_folder(str(tmp_path / "train"), {"a": 1})
    os.makedirs(tmp_path / "val")
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(image_bytes(1))
    with pytest.raises(UserError, match="prepare_imagenet_val.sh"):
        build_dataset("ImageNet", data_dir=str(tmp_path))


def test_empty_class_folder_is_an_error(imagenet):
    os.makedirs(os.path.join(imagenet, "train", "n05"))
    with pytest.raises(UserError) as err:
        build_dataset("ImageNet", data_dir=imagenet)
    assert os.path.join(imagenet, "train", "n05") in str(err.value) and "no images" in str(err.value)


def test_non_image_file_is_an_error_unless_skipped(imagenet, capsys):
    stray = os.path.join(imagenet, "train", "n02", "notes.txt")
    with open(stray, "w") as handle:
        handle.write("hello")
    (open(os.path.join(imagenet, "train", "n02", ".DS_Store"), "w")).close()  # hidden: always ignored
    with pytest.raises(UserError) as err:
        build_dataset("ImageNet", data_dir=imagenet)
    assert stray in str(err.value) and "--skip-bad-records" in str(err.value)
    splits = build_dataset("ImageNet", data_dir=imagenet, skip_bad_records=True)
    assert len(splits.train) == 9 and "notes.txt" in capsys.readouterr().err


def test_undecodable_image_is_an_error_or_skipped_and_counted(imagenet):
    broken = os.path.join(imagenet, "train", "n01", "img_0.JPEG")
    with open(broken, "wb") as handle:
        handle.write(image_bytes(7)[:100])  # a truncated JPEG
    splits = build_dataset("ImageNet", data_dir=imagenet)
    with pytest.raises(UserError) as err:
        splits.train[0]
    assert broken in str(err.value)
    skipping = build_dataset("ImageNet", data_dir=imagenet, skip_bad_records=True)
    image, label = skipping.train[(0, 5)]  # replaced by the next readable record
    assert torch.equal(image, skipping.train[(1, 5)][0]) and label == 0
    assert skipping.train.skipped_records == 1


def test_skipped_records_are_counted_across_workers(imagenet):
    for name in ("img_0.JPEG", "img_1.JPEG"):
        with open(os.path.join(imagenet, "train", "n02", name), "wb") as handle:
            handle.write(b"not a jpeg at all")
    splits = build_dataset("ImageNet", data_dir=imagenet, skip_bad_records=True, image_dim=16)
    loaders = build_loaders(splits, batch_size=4, test_batch_size=4, num_workers=2)
    loaders.set_epoch(0)
    assert sum(len(y) for _, y in loaders.train) == 9
    assert splits.train.skipped_records >= 2  # each bad file at least once, in whichever worker


def test_num_classes_too_small_for_the_folders(imagenet):
    with pytest.raises(UserError, match="--num-classes 3"):
        build_dataset("ImageNet", data_dir=imagenet, num_classes=2)


# ---------------------------------------------------------------- TinyImageNet folder

def test_tiny_imagenet_read_in_place(tmp_path):
    base = write_tiny_imagenet(str(tmp_path))
    before = tree_digest(base)
    splits = build_dataset("TinyImageNet", data_dir=str(tmp_path))
    assert (splits.num_classes, splits.image_size, splits.val, len(splits.train), len(splits.test)) == (3, 64, None, 9, 6)
    # Labels in sorted wnid order, as torchvision's ImageFolder on train/ (which skips *_boxes.txt).
    reference = ImageFolder(os.path.join(base, "train"))
    assert list(splits.train.classes) == reference.classes == sorted(TINY_WNIDS)
    assert splits.train.images.samples() == reference.samples
    # Val labels come from val_annotations.txt (val_i belongs to TINY_WNIDS[i % 3]), sorted by name.
    val_names = [os.path.basename(p) for p, _ in splits.test.images.samples()]
    assert val_names == sorted(f"val_{i}.JPEG" for i in range(6))
    expected = [sorted(TINY_WNIDS).index(TINY_WNIDS[int(n[4:-5]) % 3]) for n in val_names]
    assert [splits.test[i][1] for i in range(6)] == expected
    for i in range(6):
        assert splits.test[i][0].shape == (3, 64, 64)
    loaders = build_loaders(splits, batch_size=4, test_batch_size=4)
    loaders.set_epoch(0)
    batch, _ = next(iter(loaders.train))
    assert batch.shape == (4, 3, 64, 64)
    assert tree_digest(base) == before  # nothing moved, rewritten or added
    # data_dir may also be the tiny-imagenet-200 folder itself.
    assert len(build_dataset("TinyImageNet", data_dir=base).train) == 9


def test_tiny_imagenet_val_sorted_into_class_folders_is_accepted(tmp_path):
    base = write_tiny_imagenet(str(tmp_path))
    os.remove(os.path.join(base, "val", "val_annotations.txt"))
    for i in range(6):
        wnid = TINY_WNIDS[i % 3]
        os.makedirs(os.path.join(base, "val", wnid), exist_ok=True)
        os.rename(os.path.join(base, "val", "images", f"val_{i}.JPEG"), os.path.join(base, "val", wnid, f"val_{i}.JPEG"))
    os.rmdir(os.path.join(base, "val", "images"))
    splits = build_dataset("TinyImageNet", data_dir=str(tmp_path))
    assert sorted(splits.test[i][1] for i in range(6)) == [0, 0, 1, 1, 2, 2]


def test_tiny_imagenet_missing_or_broken(tmp_path):
    with pytest.raises(UserError, match="tiny-imagenet-200.zip"):
        build_dataset("TinyImageNet", data_dir=str(tmp_path))
    base = write_tiny_imagenet(str(tmp_path))
    with open(os.path.join(base, "val", "val_annotations.txt"), "a") as handle:
        handle.write("val_99.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(UserError, match="line 7"):
        build_dataset("TinyImageNet", data_dir=str(tmp_path))


def test_tiny_train_odd_sized_image_still_batches(tmp_path):
    base = write_tiny_imagenet(str(tmp_path))
    path = os.path.join(base, "train", TINY_WNIDS[0], "images", f"{TINY_WNIDS[0]}_0.JPEG")
    with open(path, "wb") as handle:
        handle.write(image_bytes(5, size=(80, 50)))
    splits = build_dataset("TinyImageNet", data_dir=str(tmp_path))
    index = [p for p, _ in scan_tiny_train(base).samples()].index(path)
    assert splits.train[(index, 1)][0].shape == (3, 64, 64)
    buffer = io.BytesIO(open(path, "rb").read())
    assert Image.open(buffer).size == (80, 50)  # the user's file itself is untouched


def test_pil_transforms_match_torchvision_pixel_for_pixel():
    from torchvision import transforms as T
    from torchvision.transforms import functional as TF

    from data.imagenet import imagenet_transforms
    from data.pil_ops import random_resized_crop_box

    image = Image.open(io.BytesIO(image_bytes(3, size=(300, 180)))).convert("RGB")
    train_tf, eval_tf = imagenet_transforms(size=224, normalize=False)
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    assert torch.equal(eval_tf(image, None), reference(image))
    for seed in range(30):  # same crop boxes as torchvision for the same random stream
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(image, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])
        box = random_resized_crop_box(300, 180, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                      generator=torch.Generator().manual_seed(seed))
        assert box == expected
    generator = torch.Generator().manual_seed(11)
    box = random_resized_crop_box(300, 180, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=generator)
    ours = train_tf(image, torch.Generator().manual_seed(11))
    crop = T.ToTensor()(TF.resized_crop(image, *box, [224, 224]))
    assert torch.equal(ours, crop) or torch.equal(ours, crop.flip(-1))
