"""Writing a detector's predictions: COCO results JSON, instance mask PNGs, overlays.

    OUT/predictions.json      COCO results: every detection (image_id, category_id, bbox
                              [x, y, w, h], score, segmentation RLE), as COCOeval loads them
    OUT/images.json           the COCO ``images`` entries the image ids refer to
    OUT/ground_truth.json     the COCO ground truth, when the input had one (a data folder)
    OUT/masks/<name>_<k>.png  instance k of the image (0/255), for detections scoring at least
                              the score threshold, best first
    OUT/overlays/<name>.png   the image with those instances tinted, their boxes, class and score
                              (ground-truth boxes in green when known)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..io import atomic_path, atomic_write_json
from ..errors import MissingFileError, UsageError

__all__ = ["read_images", "write_detections", "overlay"]

_COLORS = [(230, 40, 40), (40, 120, 230), (240, 170, 20), (170, 60, 220), (20, 190, 190), (240, 100, 180)]
TRUTH_COLOR = (0, 200, 0)


def read_images(path: str | os.PathLike) -> tuple[list[str], list[torch.Tensor]]:
    """(names, uint8 (3, H, W) images) of one image file or a folder of images (sorted by name)."""
    from ..seg.data import IMAGE_EXTS
    from .data import _decode_rgb

    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        folder = path / "images" if (path / "images").is_dir() else path
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise UsageError(f"no image files ({', '.join(IMAGE_EXTS)}) in {folder}")
    else:
        raise MissingFileError(f"no such image or folder: {path}")
    images = [torch.from_numpy(_decode_rgb(f)).permute(2, 0, 1).contiguous() for f in files]
    return [f.stem for f in files], images


def overlay(image: torch.Tensor, output: dict, categories: list[dict], score_threshold: float,
            truth_boxes: torch.Tensor | None = None, mask_threshold: float = 0.5) -> Image.Image:
    """The image with the instances scoring at least ``score_threshold`` tinted and outlined by
    their boxes, labelled "class score"; ground-truth boxes in green."""
    base = image.permute(1, 2, 0).numpy().astype(np.float32)
    keep = (output["scores"] >= score_threshold).nonzero().flatten().tolist()
    for j, i in enumerate(keep):
        m = output["masks"][i, 0].float().numpy() > mask_threshold
        color = np.asarray(_COLORS[j % len(_COLORS)], np.float32)
        base[m] = 0.55 * base[m] + 0.45 * color
    canvas = Image.fromarray(base.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    if truth_boxes is not None:
        for b in truth_boxes.tolist():
            draw.rectangle(b, outline=TRUTH_COLOR, width=1)
    for j, i in enumerate(keep):
        x1, y1, x2, y2 = output["boxes"][i].tolist()
        color = _COLORS[j % len(_COLORS)]
        draw.rectangle([x1, y1, x2, y2], outline=color, width=2)
        name = categories[int(output["labels"][i]) - 1]["name"]
        draw.text((x1 + 2, max(y1 - 11, 0)), f"{name} {float(output['scores'][i]):.2f}", fill=color)
    return canvas


def write_detections(out_dir: str | os.PathLike, names: list[str], images: list[torch.Tensor], image_ids: list[int],
                     outputs: list[dict], categories: list[dict], results: list[dict], score_threshold: float,
                     ground_truth: dict | None = None, truth_boxes: list[torch.Tensor] | None = None,
                     overlays: bool = True, mask_threshold: float = 0.5) -> dict:
    """Write the files listed in the module docstring; returns their counts and paths."""
    from ..seg.predict import save_mask_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "predictions.json", results)
    atomic_write_json(out / "images.json", [dict(id=i, file_name=n, height=int(im.shape[-2]), width=int(im.shape[-1]))
                                            for i, n, im in zip(image_ids, names, images)])
    if ground_truth is not None:
        atomic_write_json(out / "ground_truth.json", ground_truth)
    masks_written, overlays_written = 0, 0
    for k, (name, image, o) in enumerate(zip(names, images, outputs)):
        keep = (o["scores"] >= score_threshold).nonzero().flatten().tolist()
        for j, i in enumerate(keep):
            save_mask_png(o["masks"][i, 0].float() > mask_threshold, out / "masks" / f"{name}_{j}.png")
            masks_written += 1
        if overlays:
            picture = overlay(image, o, categories, score_threshold, truth_boxes[k] if truth_boxes else None,
                              mask_threshold)
            path = out / "overlays" / f"{name}.png"
            with atomic_path(path) as tmp:
                picture.save(tmp, format="PNG")
            overlays_written += 1
    return dict(predictions=str(out / "predictions.json"), detections=len(results), masks=masks_written,
                overlays=overlays_written)
