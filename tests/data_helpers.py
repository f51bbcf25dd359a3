"""Helpers for tests that build their own tiny data sets (imported by conftest.py too)."""
from __future__ import annotations

import numpy as np


def _class_image(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """An image whose class is learnable: a coloured square at a class-dependent place."""
    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    q = size // 2
    r, c = divmod(label % 4, 2)
    img[r * q:(r + 1) * q, c * q:(c + 1) * q, label % 3] = 200 + label % 50
    return img


def make_mask_folder(root, n: int = 12, size: int = 32):
    """A UNeXt-layout folder (images/, masks/0/) of ``n`` images whose mask is a bright rectangle
    on noise (learnable, so IoU can rise above chance)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks" / "0").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        y, x = rng.integers(2, size // 2, 2)
        h, w = rng.integers(6, size // 2, 2)
        mask = np.zeros((size, size), np.uint8)
        mask[y:y + h, x:x + w] = 1
        img[mask == 1] += 150
        Image.fromarray(img).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray(mask * 255).save(root / "masks" / "0" / f"case{i:02d}.png")
    return root
