"""Segmentation readers, splits and joint augmentation, on tiny generated PNG folders."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mixlab.seg.data import (JointAugment, SegDataset, load_segmentation_data, normalize_images,
                             read_image_mask_dirs, read_split_file, read_unext_folder, split_dataset, split_names)


def _shape_mask(h: int, w: int, seed: int) -> np.ndarray:
    """An asymmetric shape (a rectangle with a triangle on it) at a seeded place, 0/1 uint8."""
    rng = np.random.default_rng(seed)
    y0, x0 = rng.integers(2, h // 3), rng.integers(2, w // 3)
    yy, xx = np.mgrid[:h, :w]
    rect = (yy >= y0) & (yy < y0 + h // 3) & (xx >= x0) & (xx < x0 + w // 4)
    tri = (yy >= y0) & (xx >= x0) & (xx - x0 < (yy - y0)) & (yy < y0 + h // 2)
    return (rect | tri).astype(np.uint8)


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _make_unext(root: Path, n: int = 4, size=(32, 40), classes: int = 1) -> dict[str, list[np.ndarray]]:
    h, w = size
    truth = {}
    for i in range(n):
        name = f"case {i}"
        img = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        _write(root / "images" / f"{name}.png", img)
        truth[name] = []
        for k in range(classes):
            m = _shape_mask(h, w, seed=10 * i + k)
            _write(root / "masks" / str(k) / f"{name}.png", m * 255)
            truth[name].append(m)
    return truth


# -- readers ----------------------------------------------------------------------------------

def test_unext_layout_reads_images_and_binary_masks(tmp_path):
    truth = _make_unext(tmp_path, n=3, size=(32, 40))
    ds = read_unext_folder(tmp_path)
    assert ds.names == ["case 0", "case 1", "case 2"]
    assert ds.images.shape == (3, 3, 32, 40) and ds.images.dtype == torch.uint8
    assert ds.masks.shape == (3, 1, 32, 40) and ds.masks.dtype == torch.uint8
    assert set(ds.masks.unique().tolist()) == {0, 1}
    for i, name in enumerate(ds.names):
        assert np.array_equal(ds.masks[i, 0].numpy(), truth[name][0])
        expected = np.asarray(Image.open(tmp_path / "images" / f"{name}.png")).transpose(2, 0, 1)
        assert np.array_equal(ds.images[i].numpy(), expected)
    assert load_segmentation_data(tmp_path).names == ds.names


def test_unext_layout_multi_class(tmp_path):
    truth = _make_unext(tmp_path, n=2, classes=3)
    ds = read_unext_folder(tmp_path)
    assert ds.num_classes == 3 and ds.masks.shape == (2, 3, 32, 40)
    for k in range(3):
        assert np.array_equal(ds.masks[1, k].numpy(), truth["case 1"][k])


def test_image_and_mask_folders_with_suffix_and_other_extension(tmp_path):
    m = _shape_mask(32, 32, 0)
    Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(tmp_path / "a.jpg")
    _write(tmp_path / "a_mask.png", m)  # stored as 0/1, not 0/255
    ds = read_image_mask_dirs(tmp_path, tmp_path, mask_suffix="_mask")
    assert ds.names == ["a"] and np.array_equal(ds.masks[0, 0].numpy(), m)
    (tmp_path / "data" / "masks").mkdir(parents=True)
    (tmp_path / "data" / "images").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "data" / "images" / "b.png")
    _write(tmp_path / "data" / "masks" / "b.png", m * 255)
    assert load_segmentation_data(tmp_path / "data").masks.sum() == m.sum()


def test_missing_mask_names_the_file(tmp_path):
    _make_unext(tmp_path, n=3)
    (tmp_path / "masks" / "0" / "case 1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)1 mask file\(s\) missing.*expected mask .*masks/0/case 1\.png"):
        read_unext_folder(tmp_path)


def test_size_mismatch_names_the_mask(tmp_path):
    _make_unext(tmp_path, n=2)
    _write(tmp_path / "masks" / "0" / "case 0.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError, match=r"mask .*case 0\.png is 16x16 \(WxH\) but its image .*case 0\.png is 40x32"):
        read_unext_folder(tmp_path)


def test_unreadable_file_is_named(tmp_path):
    _make_unext(tmp_path, n=2)
    (tmp_path / "images" / "case 1.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"cannot read image file .*images/case 1\.png"):
        read_unext_folder(tmp_path)


def test_images_of_different_sizes_need_a_size(tmp_path):
    _make_unext(tmp_path, n=1, size=(32, 40))
    img = np.zeros((48, 48, 3), np.uint8)
    _write(tmp_path / "images" / "z.png", img)
    _write(tmp_path / "masks" / "0" / "z.png", np.zeros((48, 48), np.uint8))
    with pytest.raises(ValueError, match=r"z\.png is 48x48 \(WxH\) but .* is 40x32.*size="):
        read_unext_folder(tmp_path)
    ds = read_unext_folder(tmp_path, size=(32, 32))
    assert ds.images.shape == (2, 3, 32, 32) and set(ds.masks.unique().tolist()) <= {0, 1}


def test_layout_errors(tmp_path):
    _make_unext(tmp_path, n=1)
    (tmp_path / "masks" / "0").rename(tmp_path / "masks" / "1")
    with pytest.raises(ValueError, match=r"0\.\.K-1 without gaps, found \[1\]"):
        read_unext_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a segmentation data folder"):
        load_segmentation_data(tmp_path / "images")


def test_cache_is_reused_and_invalidated(tmp_path):
    _make_unext(tmp_path / "d", n=2)
    first = read_unext_folder(tmp_path / "d", cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("seg-unext-*.pt"))) == 1
    again = read_unext_folder(tmp_path / "d", cache_dir=tmp_path / "cache")
    assert torch.equal(first.images, again.images) and torch.equal(first.masks, again.masks)
    _write(tmp_path / "d" / "masks" / "0" / "case 0.png", np.full((32, 40), 255, np.uint8))
    changed = read_unext_folder(tmp_path / "d", cache_dir=tmp_path / "cache")
    assert changed.masks[0].all() and not first.masks[0].all()


@pytest.mark.parametrize("values", [(0, 100), (0, 1, 2), (0, 37, 255)])
def test_masks_that_are_not_0_255_or_0_1_are_refused_not_guessed(tmp_path, values):
    _make_unext(tmp_path, n=2, size=(16, 16))
    m = np.zeros((16, 16), np.uint8)
    for i, v in enumerate(values):
        m[:, 4 * i:4 * i + 4] = v
    _write(tmp_path / "masks" / "0" / "case 1.png", m)
    shown = ", ".join(map(str, values))
    with pytest.raises(ValueError, match=rf"mask .*case 1.png holds the values {shown}, not only 0 and 255 or "
                                         r"0 and 1.*data.mask_threshold=N.*data.mask_values"):
        read_unext_folder(tmp_path)


def test_a_mask_threshold_or_mask_values_say_which_pixels_are_foreground(tmp_path):
    _make_unext(tmp_path, n=1, size=(16, 16))
    m = np.zeros((16, 16), np.uint8)
    m[:, 4:8], m[:, 8:12] = 1, 2  # a 0/1/2 label map
    _write(tmp_path / "masks" / "0" / "case 0.png", m)
    above0 = read_unext_folder(tmp_path, mask_threshold=0).masks[0, 0].numpy()
    assert np.array_equal(above0, (m > 0).astype(np.uint8))
    only2 = read_unext_folder(tmp_path, mask_values=[2]).masks[0, 0].numpy()
    assert np.array_equal(only2, (m == 2).astype(np.uint8))
    with pytest.raises(ValueError, match="not both"):
        read_unext_folder(tmp_path, mask_threshold=0, mask_values=[2])


def test_0_1_and_16_bit_masks_are_read_as_they_are(tmp_path):
    truth = _make_unext(tmp_path, n=2, size=(16, 16))
    _write(tmp_path / "masks" / "0" / "case 0.png", truth["case 0"][0])  # 0/1
    _write(tmp_path / "masks" / "0" / "case 1.png", truth["case 1"][0].astype(np.uint16) * 65535)  # 16-bit 0/65535
    ds = read_unext_folder(tmp_path)
    for i, name in enumerate(ds.names):
        assert np.array_equal(ds.masks[i, 0].numpy(), truth[name][0])


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    _make_unext(tmp_path, n=1, size=(16, 16))
    wide = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 250)  # 0 .. 63750
    _write(tmp_path / "images" / "case 0.png", wide)
    ds = read_unext_folder(tmp_path)
    expected = torch.from_numpy(np.rint(wide / 65535 * 255).astype(np.uint8))
    assert all(torch.equal(ds.images[0, c], expected) for c in range(3))


def test_the_cache_is_keyed_by_the_mask_rule_and_a_damaged_one_is_rebuilt(tmp_path, caplog):
    _make_unext(tmp_path / "d", n=1, size=(16, 16))
    m = np.zeros((16, 16), np.uint8)
    m[:, :8] = 100
    _write(tmp_path / "d" / "masks" / "0" / "case 0.png", m)
    low = read_unext_folder(tmp_path / "d", cache_dir=tmp_path / "cache", mask_threshold=50)
    high = read_unext_folder(tmp_path / "d", cache_dir=tmp_path / "cache", mask_threshold=150)
    assert low.masks.sum() == 16 * 8 and high.masks.sum() == 0  # not the first rule's cached masks
    with pytest.raises(ValueError, match="holds the values 0, 100"):
        read_unext_folder(tmp_path / "d", cache_dir=tmp_path / "cache")
    for cached in (tmp_path / "cache").glob("seg-unext-*.pt"):
        cached.write_bytes(b"cut short")
    again = read_unext_folder(tmp_path / "d", cache_dir=tmp_path / "cache", mask_threshold=50)
    assert torch.equal(again.masks, low.masks)
    assert "is damaged" in caplog.text and "decoding the data again" in caplog.text


# -- splits -----------------------------------------------------------------------------------

def test_seeded_split_80_20():
    names = [f"n{i}" for i in range(525)]
    train, val = split_names(names, 0.2, seed=41)
    assert (len(train), len(val)) == (420, 105)
    assert not set(train) & set(val) and set(train) | set(val) == set(names)
    assert split_names(list(reversed(names)), 0.2, seed=41) == (train, val)  # listing order does not matter
    assert split_names(names, 0.2, seed=1)[1] != val
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_names(names, 1.0)


def _tiny(n=5) -> SegDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    masks = (torch.arange(n) % 2).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return SegDataset(images, masks, [f"c{i}" for i in range(n)])


def test_split_files(tmp_path):
    ds = _tiny()
    (tmp_path / "val.txt").write_text("# held out\nc3.png\n\nc1\n")
    train, val = split_dataset(ds, val_file=tmp_path / "val.txt")
    assert val.names == ["c3", "c1"] and train.names == ["c0", "c2", "c4"]
    assert val.images[:, 0, 0, 0].tolist() == [3, 1] and val.masks[:, 0, 0, 0].tolist() == [1, 1]
    (tmp_path / "train.txt").write_text("c0\nc1\n")
    with pytest.raises(ValueError, match=r"in both the train and the val split: 'c1'"):
        split_dataset(ds, train_file=tmp_path / "train.txt", val_file=tmp_path / "val.txt")
    (tmp_path / "bad.txt").write_text("c0\nnope\n")
    with pytest.raises(KeyError, match="'nope'"):
        split_dataset(ds, val_file=tmp_path / "bad.txt")
    assert read_split_file(tmp_path / "val.txt") == ["c3.png", "c1"]


# -- augmentation -----------------------------------------------------------------------------

def _shape_batch(n=16, h=48, w=48):
    """Images whose content is the mask's shape (white on black, all channels) and the masks."""
    masks = torch.stack([torch.from_numpy(_shape_mask(h, w, seed=s)) for s in range(n)])[:, None]
    images = (masks * 255).expand(n, 3, h, w).contiguous()
    return images, masks


def test_flips_rotations_and_colour_keep_masks_aligned_exactly():
    images, masks = _shape_batch()
    aug = JointAugment(hflip=0.5, vflip=0.5, rot90=True, brightness=0.2, contrast=0.2)
    x, m = aug(images, masks, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and m.dtype == torch.uint8 and x.shape == images.shape
    assert set(m.unique().tolist()) <= {0, 1}
    assert torch.equal((x > 0.5).to(torch.uint8), m.expand_as(x))
    moved = [i for i in range(len(m)) if not torch.equal(m[i], masks[i])]
    assert len(moved) >= 8  # the shapes are asymmetric: most samples really moved
    assert not torch.equal(x, images.float() / 255)  # colour jitter changed values
    assert torch.equal(images, (masks * 255).expand_as(images))  # inputs untouched


def _near_edge(mask: torch.Tensor, radius: int) -> torch.Tensor:
    m = mask.float()
    dil = F.max_pool2d(m, 2 * radius + 1, 1, radius)
    ero = -F.max_pool2d(-m, 2 * radius + 1, 1, radius)
    return dil != ero


def test_random_resized_crop_keeps_masks_binary_and_aligned():
    images, masks = _shape_batch(n=24)
    aug = JointAugment(hflip=0.5, vflip=0.5, rot90=True, crop_scale=(0.3, 1.0))
    x, m = aug(images, masks, generator=torch.Generator().manual_seed(1))
    assert set(m.unique().tolist()) <= {0, 1}
    thresholded = (x[:, :1] > 0.5).to(torch.uint8)
    differ = thresholded != m
    # bilinear (image) and nearest (mask) sampling of the same point can only disagree next to an edge
    assert not (differ & ~_near_edge(m, radius=3)).any()
    assert differ.float().mean() < 0.01
    resized = [i for i in range(len(m)) if m[i].sum() != masks[i].sum()]
    assert len(resized) >= 12


def test_crop_of_the_whole_image_is_the_identity_and_rotation_of_non_square():
    images, masks = _shape_batch(n=4, h=32, w=48)
    x, m = JointAugment(hflip=0, vflip=0, rot90=True, crop_scale=(1.0, 1.0), crop_ratio=(1.5, 1.5))(
        images, masks, generator=torch.Generator().manual_seed(2))
    assert x.shape == (4, 3, 32, 48)  # only 0 or 180 degrees on a non-square batch
    for i in range(4):
        assert torch.equal(m[i], masks[i]) or torch.equal(m[i], masks[i].flip(-1).flip(-2))
        assert torch.equal((x[i, :1] > 0.5).to(torch.uint8), m[i])


def test_augmentation_is_reproducible_and_checks_shapes():
    images, masks = _shape_batch(n=6)
    aug = JointAugment(crop_scale=(0.5, 1.0), brightness=0.1)
    a = aug(images, masks, generator=torch.Generator().manual_seed(3))
    b = aug(images, masks, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="must agree"):
        aug(images, masks[:3])
    with pytest.raises(ValueError, match="crop_scale"):
        JointAugment(crop_scale=(0.0, 1.0))


def test_normalize_images():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize_images(x, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    assert out[0, :, 0, 0].tolist() == [2.0, 1.0, 0.5]
    assert math.isclose(float(normalize_images(x.float() / 255)[0, 0, 0, 0]), (1 - 0.485) / 0.229, rel_tol=1e-6)


def test_seg_train_refuses_unclear_masks_and_takes_the_rule_from_its_settings(tmp_path, capsys):
    from mixlab.cli import main
    from mixlab.train import rundir as rd

    _make_unext(tmp_path / "d", n=4, size=(32, 32))
    for i in range(4):  # the masks stored as 0/100
        path = tmp_path / "d" / "masks" / "0" / f"case {i}.png"
        _write(path, (np.asarray(Image.open(path)) > 0).astype(np.uint8) * 100)
    args = ["seg", "train", "--model", "unext_s", "--data", str(tmp_path / "d"), "--epochs", "1", "--batch-size", "2",
            "--precision", "fp32", "--set", "img_size=32", "--set", "progress=false", "--set", "autotune=false",
            "--set", "data.val_split=0.5"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "holds the values 0, 100" in capsys.readouterr().err
    assert main([*args, "--set", "data.mask_threshold=50", "--out", str(tmp_path / "b")]) == 0
    assert rd.read_config(tmp_path / "b")["data"]["mask_threshold"] == 50
    assert rd.read_metrics(tmp_path / "b")[0]["val_iou"] > 1  # masks read with their foreground (empty masks: IoU 0.00)
