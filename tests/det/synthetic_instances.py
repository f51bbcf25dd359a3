"""A synthetic instance set written by the tests: rectangles and ellipses with known masks,
as a mask folder (mixlab seg's layout) and as a COCO folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64
YY, XX = np.mgrid[:SIZE, :SIZE]


def rect(y1, y2, x1, x2) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), bool)
    m[y1:y2, x1:x2] = True
    return m


def ellipse(cy, cx, ry, rx) -> np.ndarray:
    return ((YY - cy) / ry) ** 2 + ((XX - cx) / rx) ** 2 <= 1


# name -> the instances of its mask (each a boolean mask), as the reader should find them
# with 8-connectivity and min_area 5
CASES = {
    "case00": [rect(5, 20, 8, 30), ellipse(45, 40, 10, 14)],
    "case01": [rect(30, 50, 10, 22)],
    "case02": [],  # no instance: an empty mask
    "case03": [rect(10, 20, 10, 20) | rect(20, 30, 12, 24)],  # two rectangles sharing an edge: one instance
    "case04": [rect(40, 60, 40, 60), rect(8, 18, 40, 50)],
    "case05": [ellipse(32, 32, 12, 8)],  # plus a 2x2 speck under min_area (see SPECK)
    "case06": [rect(4, 14, 4, 14) | rect(14, 24, 14, 24)],  # corner-touching: one instance 8-connected, two 4-connected
    "case07": [ellipse(20, 44, 9, 12), rect(44, 58, 6, 26)],
}
SPECK = rect(2, 4, 60, 62)


def semantic(name: str) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), bool)
    for inst in CASES[name]:
        m |= inst
    if name == "case05":
        m |= SPECK
    return m


def _image(name: str, rng) -> np.ndarray:
    img = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
    img[semantic(name)] += 150
    return img


def write_mask_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks" / "0").mkdir(parents=True)
    for name in CASES:
        Image.fromarray(_image(name, rng)).save(root / "images" / f"{name}.png")
        Image.fromarray(semantic(name).astype(np.uint8) * 255).save(root / "masks" / "0" / f"{name}.png")
    return root


def rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(size=r["size"], counts=r["counts"].decode())


def tight_box(mask: np.ndarray) -> list[float]:
    """[x1, y1, x2, y2], pixel edges, from numpy (independent of mixlab's boxes_from_masks)."""
    ys, xs = np.where(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def write_coco_folder(root: Path, polygon_for: str | None = "case01") -> Path:
    """The same images; case00's ellipse is category 2 ("ellipse"), every other instance
    category 1 ("box"); masks as RLE, ``polygon_for``'s rectangle as a polygon; case03's
    and case06's rectangles as two annotations each (COCO keeps touching instances apart);
    case02 has none."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i, name in enumerate(CASES):
        Image.fromarray(_image(name, rng)).save(root / "images" / f"{name}.png")
        images.append(dict(id=100 + i, file_name=f"{name}.png", width=SIZE, height=SIZE))
        parts = {"case03": [rect(10, 20, 10, 20), rect(20, 30, 12, 24)],
                 "case06": [rect(4, 14, 4, 14), rect(14, 24, 14, 24)]}.get(name, CASES[name])
        for j, m in enumerate(parts):
            x1, y1, x2, y2 = tight_box(m)
            cat = 2 if (name == "case00" and j == 1) else 1
            seg = rle(m)
            if name == polygon_for:
                seg = [[x1, y1, x2, y1, x2, y2, x1, y2]]
            anns.append(dict(id=len(anns) + 1, image_id=100 + i, category_id=cat, segmentation=seg,
                             bbox=[x1, y1, x2 - x1, y2 - y1], area=float(m.sum()), iscrowd=0))
    spec = dict(images=images, annotations=anns,
                categories=[dict(id=2, name="ellipse"), dict(id=1, name="box")])
    (root / "annotations.json").write_text(json.dumps(spec))
    return root
