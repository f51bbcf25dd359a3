"""A tiny data set for refinement tests: bright ellipses on noise, coarse masks too large."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def ellipse(size: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0).astype(np.uint8)


def dilate(mask: np.ndarray, px: int) -> np.ndarray:
    m = torch.from_numpy(mask).float()[None, None]
    return (F.max_pool2d(m, 2 * px + 1, stride=1, padding=px)[0, 0] > 0.5).numpy().astype(np.uint8)


def make_refine_data(root: Path, n: int = 12, size: int = 64, grow: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """(data folder in the UNeXt layout, folder of coarse masks = the truth dilated by ``grow`` px)."""
    rng = np.random.default_rng(seed)
    data, coarse = root / "data", root / "coarse"
    for d in (data / "images", data / "masks" / "0", coarse / "masks" / "0"):
        d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        truth = ellipse(size, *rng.uniform(size * 0.35, size * 0.65, 2), *rng.uniform(size * 0.15, size * 0.3, 2))
        img = rng.integers(0, 70, (size, size, 3)).astype(np.uint8)
        img[truth == 1] += 140
        name = f"case{i:02d}.png"
        Image.fromarray(img).save(data / "images" / name)
        Image.fromarray(truth * 255).save(data / "masks" / "0" / name)
        Image.fromarray(dilate(truth, grow) * 255).save(coarse / "masks" / "0" / name)
    return data, coarse
