"""Reading instance data (mask folders, COCO folders), splits, batched augmentation, the list loader."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from synthetic_instances import CASES, SIZE, SPECK, rect, semantic, tight_box
from mixlab.det.augment import DetAugment
from mixlab.det.data import ListLoader, boxes_from_masks, instances_from_mask, load_det_folder, read_coco_folder


def _by_box(target) -> dict:
    return {tuple(b.tolist()): m.numpy().astype(bool) for b, m in zip(target["boxes"], target["masks"])}


def test_mask_folder_instances_are_connected_components(mask_folder):
    ds = load_det_folder(mask_folder, min_area=5)
    assert ds.names == list(CASES) and ds.image_ids == list(range(1, len(CASES) + 1))
    assert ds.num_classes == 1 and ds.categories == [dict(id=1, name="object")]
    for name, expected in CASES.items():
        t = ds.targets[ds.names.index(name)]
        got = _by_box(t)
        want = {tuple(tight_box(m)): m for m in expected}
        assert got.keys() == want.keys(), name
        for box, m in want.items():
            assert np.array_equal(got[box], m), name
        assert t["labels"].tolist() == [1] * len(expected)
        areas = t["masks"].flatten(1).sum(1).tolist()
        assert areas == sorted(areas, reverse=True)  # largest first
        # the semantic mask the union is scored against keeps everything, the speck too
        assert np.array_equal(ds.semantic[ds.names.index(name)][0].numpy().astype(bool), semantic(name))
    assert ds.empty_images == 1 and ds.num_instances == sum(len(v) for v in CASES.values())
    assert ds.notes["dropped_components"] == 1  # case05's 4-pixel speck
    # the COCO ground truth holds the same instances, as RLE with the mask's area
    from pycocotools import mask as mask_utils

    anns = ds.annotations[ds.names.index("case00")]
    assert sorted(a["area"] for a in anns) == sorted(float(m.sum()) for m in CASES["case00"])
    for a in anns:
        m = mask_utils.decode(dict(size=a["segmentation"]["size"], counts=a["segmentation"]["counts"].encode()))
        x, y, w, h = a["bbox"]
        assert tight_box(m.astype(bool)) == [x, y, x + w, y + h]


def test_min_area_and_connectivity():
    m = SPECK | rect(10, 20, 10, 20) | rect(20, 30, 20, 30)  # a speck; two squares touching at a corner
    found, dropped = instances_from_mask(m, min_area=0)
    assert [int(f.sum()) for f in found] == [200, 4] and dropped == 0
    found, dropped = instances_from_mask(m, min_area=5, connectivity=4)
    assert [int(f.sum()) for f in found] == [100, 100] and dropped == 1
    found, _ = instances_from_mask(m, min_area=5, connectivity=8)
    assert len(found) == 1  # touching lesions become one instance
    with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
        instances_from_mask(m, connectivity=6)


def test_boxes_from_masks_are_pixel_edges():
    masks = torch.zeros(2, 5, 6, dtype=torch.uint8)
    masks[0, 1:3, 2:5] = 1
    masks[1, 4, 0] = 1
    assert boxes_from_masks(masks).tolist() == [[2, 1, 5, 3], [0, 4, 1, 5]]


def test_coco_folder_rle_and_polygons(coco_folder):
    from pycocotools.coco import COCO

    ds = read_coco_folder(coco_folder)
    assert ds.names == list(CASES) and ds.image_ids == [100 + i for i in range(len(CASES))]
    assert [c["id"] for c in ds.categories] == [1, 2]  # labels follow ascending category ids
    t = ds.targets[0]  # case00: rectangle (box, label 1) and ellipse (label 2)
    assert t["labels"].tolist() == [1, 2]
    for b, m, want in zip(t["boxes"], t["masks"], CASES["case00"]):
        assert b.tolist() == tight_box(want) and np.array_equal(m.numpy().astype(bool), want)
    assert len(ds.targets[ds.names.index("case03")]["labels"]) == 2  # touching, but two annotations
    assert ds.empty_images == 1
    # the polygon is rasterised as pycocotools' own COCO API does
    coco = COCO(str(coco_folder / "annotations.json"))
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[101]))[0]
    poly = ds.targets[1]["masks"][0].numpy()
    assert np.array_equal(poly, coco.annToMask(ann))
    assert ds.targets[1]["boxes"][0].tolist() == tight_box(CASES["case01"][0])


def _edit(folder, fn):
    spec = json.loads((folder / "annotations.json").read_text())
    fn(spec)
    (folder / "annotations.json").write_text(json.dumps(spec))


def test_coco_bad_input_errors(coco_folder):
    (coco_folder / "images" / "case03.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"names 1 image\(s\) not found under .*: case03.png"):
        read_coco_folder(coco_folder)
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(coco_folder / "images" / "case03.png")

    def rle_of_another_size(spec):
        a = next(a for a in spec["annotations"] if isinstance(a["segmentation"], dict))
        from synthetic_instances import rle

        a["segmentation"] = rle(np.ones((32, 40), bool))
    _edit(coco_folder, rle_of_another_size)
    with pytest.raises(ValueError, match=r"its mask is 32x40 \(HxW\) but the image is 64x64"):
        read_coco_folder(coco_folder)


def test_coco_image_size_and_ids_are_checked(coco_folder):
    _edit(coco_folder, lambda s: s["images"][0].update(width=80))
    with pytest.raises(ValueError, match=r"case00.png is 64x64 \(WxH\) but .* gives 80x64"):
        read_coco_folder(coco_folder)
    _edit(coco_folder, lambda s: (s["images"][0].update(width=64), s["annotations"][0].update(category_id=9)))
    with pytest.raises(ValueError, match="names category_id 9, which is not in its categories"):
        read_coco_folder(coco_folder)


def test_mask_folder_mask_of_another_size(mask_folder):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(mask_folder / "masks" / "0" / "case01.png")
    with pytest.raises(ValueError, match=r"mask .*case01.png is 32x32 \(WxH\) but its image .* is 64x64"):
        load_det_folder(mask_folder)


def test_split_is_the_one_mixlab_seg_draws(mask_folder):
    from mixlab.tasks.detection import load_det_data
    from mixlab.tasks.segmentation import load_seg_data
    from mixlab.train.config import resolve_config

    det = resolve_config("resnet18_imagenet", task="detection", data=str(mask_folder),
                         overrides=["data.val_split=0.25"])
    seg = resolve_config("unext_s", task="segmentation", data=str(mask_folder), overrides=["data.val_split=0.25"])
    assert det["data"]["split_seed"] == seg["data"]["split_seed"] == 41
    d_train, d_val = load_det_data(det)
    s_train, s_val = load_seg_data(seg)
    assert d_val.names == s_val.names and d_train.names == s_train.names and len(d_val) == 2


def test_augment_moves_boxes_and_masks_with_the_image(mask_folder):
    ds = load_det_folder(mask_folder)
    # the image's red channel is 255 exactly on the instances, so where the augmented image
    # is red must be where the augmented masks are
    images = [(t["masks"].any(0).float())[None].expand(3, -1, -1).clone() for t in ds.targets]
    images = [torch.cat([im[:1], torch.zeros_like(im[1:])]) for im in images]
    images[1] = images[1][:, :, :48]  # one image of another size (and so its masks)
    targets = [dict(t) for t in ds.targets]
    targets[1] = dict(targets[1], masks=targets[1]["masks"][:, :, :48])
    targets[1]["boxes"] = boxes_from_masks(targets[1]["masks"])
    aug = DetAugment(hflip=0.5, vflip=0.5, rot90=True)
    seen_turns = set()
    for seed in range(6):
        out_images, out_targets = aug(images, targets, generator=torch.Generator().manual_seed(seed))
        for x, t, x0 in zip(out_images, out_targets, images):
            assert torch.equal(t["boxes"], boxes_from_masks(t["masks"]))
            assert torch.equal(x[0] > 0.5, t["masks"].bool().any(0))
            seen_turns.add(tuple(x.shape) != tuple(x0.shape))
    assert seen_turns == {True, False}  # the 64x48 image was turned by a quarter in some draws
    assert torch.equal(ds.targets[0]["boxes"], boxes_from_masks(ds.targets[0]["masks"]))  # inputs unchanged
    with pytest.raises(ValueError, match="augment.hflip is a probability"):
        DetAugment(hflip=2)


def test_list_loader_follows_device_loader_order():
    from mixlab.data.loader import DeviceLoader

    items = [f"item{i}" for i in range(10)]
    kw = dict(batch_size=3, shuffle=True, seed=5)
    lists = ListLoader(items, list(range(10)), **kw)
    tensors = DeviceLoader(torch.arange(10), **kw)
    for epoch in (0, 1):
        lists.set_epoch(epoch)
        tensors.set_epoch(epoch)
        got = [b[1] for b in lists]
        assert got == [b[0].tolist() for b in tensors] and len(got) == len(lists) == 4
        assert [b[0] for b in lists] == [[items[i] for i in idx] for idx in got]
    rank1 = ListLoader(items, batch_size=2, rank=1, world_size=2)
    assert [b[0] for b in rank1] == [["item1", "item3"], ["item5", "item7"], ["item9"]]
