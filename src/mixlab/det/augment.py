"""Augmentation of a detection batch: geometry moves boxes and masks with the image.

The random draws of a whole batch are made at once from one generator (one coin per image
for each flip, one number of quarter turns, one brightness and contrast factor), then each
image of the list is transformed with its instances: images of one batch may differ in size.
Boxes are mapped exactly (flips and quarter turns take pixel edges to pixel edges), so a box
that was its mask's tight box stays its tight box.
"""
from __future__ import annotations

import torch
from ..errors import UsageError

__all__ = ["DetAugment", "flip_boxes", "rot90_boxes"]


def flip_boxes(boxes: torch.Tensor, size: int, horizontal: bool) -> torch.Tensor:
    """Boxes (x1, y1, x2, y2) mirrored across an image ``size`` pixels wide (horizontal) or high."""
    b = boxes.clone()
    i, j = (0, 2) if horizontal else (1, 3)
    b[:, i], b[:, j] = size - boxes[:, j], size - boxes[:, i]
    return b


def rot90_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Boxes after one ``torch.rot90(image, 1, dims=(-2, -1))`` of an image ``width`` wide:
    the pixel at (row r, column c) moves to (row width - 1 - c, column r)."""
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack([y1, width - x2, y2, width - x1], 1)


class DetAugment:
    """Flips (horizontal ``hflip``, vertical ``vflip``: probabilities), quarter turns (``rot90``:
    0-3 turns, uniform), brightness and contrast factors (uniform in 1 +- value; the image only).

    Call with images (float 0-1, (3, H, W) each) and target dicts (``boxes``, ``masks``, ...);
    returns new lists (the inputs are not changed).
    """

    def __init__(self, hflip: float = 0.5, vflip: float = 0.0, rot90: bool = False, brightness: float = 0.0,
                 contrast: float = 0.0):
        for name, p in (("hflip", hflip), ("vflip", vflip)):
            if not 0.0 <= float(p) <= 1.0:
                raise UsageError(f"augment.{name} is a probability between 0 and 1, got {p!r}")
        if brightness < 0 or contrast < 0:
            raise UsageError("augment.brightness and augment.contrast must be >= 0")
        self.hflip, self.vflip, self.rot90 = float(hflip), float(vflip), bool(rot90)
        self.brightness, self.contrast = float(brightness), float(contrast)

    def __repr__(self) -> str:
        return (f"DetAugment(hflip={self.hflip}, vflip={self.vflip}, rot90={self.rot90}, "
                f"brightness={self.brightness}, contrast={self.contrast})")

    def __call__(self, images: list[torch.Tensor], targets: list[dict], generator: torch.Generator | None = None):
        b = len(images)
        hflip = (torch.rand(b, generator=generator) < self.hflip).tolist()
        vflip = (torch.rand(b, generator=generator) < self.vflip).tolist()
        turns = torch.randint(0, 4, (b,), generator=generator).tolist() if self.rot90 else [0] * b
        bright = torch.empty(b).uniform_(1 - self.brightness, 1 + self.brightness, generator=generator).tolist()
        contrast = torch.empty(b).uniform_(1 - self.contrast, 1 + self.contrast, generator=generator).tolist()
        out_images, out_targets = [], []
        for i in range(b):
            x, t = images[i], dict(targets[i])
            boxes, masks = t["boxes"], t["masks"]
            if hflip[i]:
                x, masks, boxes = x.flip(-1), masks.flip(-1), flip_boxes(boxes, x.shape[-1], True)
            if vflip[i]:
                x, masks, boxes = x.flip(-2), masks.flip(-2), flip_boxes(boxes, x.shape[-2], False)
            for _ in range(turns[i]):
                boxes = rot90_boxes(boxes, x.shape[-1])
                x, masks = torch.rot90(x, 1, dims=(-2, -1)), torch.rot90(masks, 1, dims=(-2, -1))
            if self.brightness > 0:
                x = x * bright[i]
            if self.contrast > 0:
                grey = x.mean()
                x = (x - grey) * contrast[i] + grey
            if self.brightness > 0 or self.contrast > 0:
                x = x.clamp(0.0, 1.0)
            t["boxes"], t["masks"] = boxes, masks.contiguous()
            out_images.append(x.contiguous())
            out_targets.append(t)
        return out_images, out_targets
