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
