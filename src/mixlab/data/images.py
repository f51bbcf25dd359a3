"""Reading image files into 8-bit RGB, for both tasks.

Pillow's ``convert("RGB")`` / ``convert("L")`` clips a 16-bit greyscale image (mode ``I;16``,
as Pillow opens a 16-bit PNG or TIFF, or ``I``) at 255 instead of scaling it: a typical 16-bit
scan becomes almost all white. :func:`rgb_image` scales such images to 0-255 (value x 255 /
65535, rounded) first. 16-bit RGB files need nothing: Pillow reads them as 8-bit RGB.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# modes whose values span 0..65535 (``I`` is 32-bit, but Pillow gives it to 16-bit files too;
# values above 65535 are clipped)
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
WIDE_MAX = 65535


def rgb_image(im: Image.Image) -> Image.Image:
    """``im`` as an 8-bit RGB image, 16-bit greyscale scaled rather than clipped."""
    if im.mode in WIDE_MODES:
        wide = np.asarray(im).astype(np.float64)
        grey = np.clip(np.rint(wide * (255.0 / WIDE_MAX)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return im.convert("RGB")


def mask_array(im: Image.Image) -> tuple[np.ndarray, int]:
    """(the mask's pixel values, the largest value its mode can hold): raw values for
    greyscale, bilevel, palette (the palette index) and 16-bit masks, the grey level for
    colour masks."""
    if im.mode == "1":
        return np.asarray(im).astype(np.uint8), 1
    if im.mode in WIDE_MODES:
        return np.asarray(im).astype(np.int64), WIDE_MAX
    if im.mode in ("L", "P"):
        return np.asarray(im), 255
    if im.mode in ("LA", "PA"):
        return np.asarray(im.getchannel(0)), 255
    return np.asarray(im.convert("L")), 255
