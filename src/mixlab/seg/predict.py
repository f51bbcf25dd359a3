"""Predicting masks for images and writing them for people to look at.

:func:`predict_images` runs a segmentation model on images of any size (each is resized to
the model's input size, and its probabilities back to the image's own size);
:func:`write_predictions` writes, per image, the predicted mask as a 0/255 PNG in the UNeXt
layout (``OUT/masks/<class>/<name>.png``, so a prediction folder reads back as a data set)
and a side-by-side picture ``OUT/overlays/<name>.png``: the image | the ground truth (when
known) | the prediction, masks tinted over the image with their outline drawn.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..data.constants import IMAGENET_MEAN, IMAGENET_STD
from ..analysis.probe import eval_mode
from ..io import atomic_path
from .data import IMAGE_EXTS, _decode, _mask_rule, normalize_images
from .metrics import confusion_counts, scores_from_counts
from ..errors import MissingFileError, UsageError

__all__ = ["read_predict_inputs", "predict_images", "save_mask_png", "overlay_panel", "write_predictions",
           "truth_scores"]

TRUTH_COLOR = (0, 200, 0)
PRED_COLOR = (230, 40, 40)


def read_predict_inputs(path: str | os.PathLike, mask_threshold: int | None = None,
                        mask_values: Sequence[int] | None = None,
                        ) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor | None]]:
    """(names, images (3, H, W) uint8, ground truths (K, H, W) uint8 or None) from a path.

    ``path`` is one image file, a folder of images, or a data folder (``images/`` with
    ``masks/0/`` or ``masks/``), whose masks are then used as ground truth where present.
    Images may have different sizes. ``mask_threshold`` / ``mask_values``: how to read masks
    that are not 0/255 or 0/1 (:class:`~mixlab.seg.data.MaskRule`).
    """
    rule = _mask_rule(mask_threshold, mask_values)
    path = Path(path)
    if path.is_file():
        _, img = _decode(path, "RGB", None)
        return [path.stem], [torch.from_numpy(img).permute(2, 0, 1).contiguous()], [None]
    if not path.is_dir():
        raise MissingFileError(f"no such image or folder: {path}")
    image_dir = path / "images" if (path / "images").is_dir() else path
    mask_dirs: list[Path] = []
    if image_dir != path and (path / "masks").is_dir():
        numbered = sorted((p for p in (path / "masks").iterdir() if p.is_dir() and p.name.isdigit()),
                          key=lambda p: int(p.name))
        mask_dirs = numbered or [path / "masks"]
    files = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise UsageError(f"no image files ({', '.join(IMAGE_EXTS)}) in {image_dir}")
    names, images, truths = [], [], []
    for f in files:
        native, img = _decode(f, "RGB", None)
        names.append(f.stem)
        images.append(torch.from_numpy(img).permute(2, 0, 1).contiguous())
        masks = []
        for d in mask_dirs:
            candidates = [d / f"{f.stem}{e}" for e in (f.suffix, *IMAGE_EXTS) if (d / f"{f.stem}{e}").is_file()]
            if not candidates:
                break
            m_native, m = _decode(candidates[0], "mask", None, rule)
            if m_native != native:
                raise UsageError(f"mask {candidates[0]} is {m_native[0]}x{m_native[1]} (WxH) but its image {f} is "
                                 f"{native[0]}x{native[1]}")
            masks.append(torch.from_numpy(m))
        truths.append(torch.stack(masks) if masks and len(masks) == len(mask_dirs) else None)
    return names, images, truths


def predict_images(model: torch.nn.Module, images: Sequence[torch.Tensor] | torch.Tensor,
                   size: tuple[int, int] = (256, 256), batch_size: int = 8,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Foreground probabilities ``(K, H, W)`` float32 of each image, at the image's own size.

    Images are uint8 ``(3, H, W)`` (a list, sizes may differ) or a ``(N, 3, H, W)`` tensor; each
    is resized to ``size`` (bilinear) for the model, normalised with ``mean``/``std``, and its
    sigmoid probabilities are resized back (bilinear) before any threshold.
    """
    out: list[torch.Tensor] = []
    with eval_mode(model):
        items = list(images)
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            sizes = [tuple(t.shape[-2:]) for t in chunk]
            batch = torch.stack([_resize_image(t, size) for t in chunk]).to(device)
            probs = torch.sigmoid(model(normalize_images(batch, mean, std)).float()).cpu()
            for p, hw in zip(probs, sizes):
                if hw != tuple(p.shape[-2:]):
                    p = F.interpolate(p[None], size=hw, mode="bilinear", align_corners=False)[0]
                out.append(p)
    return out


def _resize_image(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if img.ndim != 3:
        raise ValueError(f"expected an image (C, H, W), got shape {tuple(img.shape)}")
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    x = img.float()[None]
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return x.round().clamp(0, 255).to(torch.uint8) if img.dtype == torch.uint8 else x


def save_mask_png(mask: torch.Tensor | np.ndarray, path: str | os.PathLike) -> Path:
    """Write a (H, W) mask (bool, 0/1 or 0/255) as an 8-bit PNG of 0 and 255; returns the path."""
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask PNG holds one (H, W) mask, got shape {m.shape}")
    arr = np.where(m > (127 if m.dtype == np.uint8 and m.max() > 1 else 0), 255, 0).astype(np.uint8)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(arr, mode="L").save(tmp, format="PNG")
    return path


def _outline(mask: torch.Tensor) -> torch.Tensor:
    """Pixels of ``mask`` (H, W bool) with a background 4-neighbour (or on the image border)."""
    m = mask.float()[None, None]
    eroded = -F.max_pool2d(-F.pad(m, (1, 1, 1, 1), value=0.0), 3, stride=1)
    return mask & ~(eroded[0, 0] > 0.5)


def _tint(image: np.ndarray, mask: torch.Tensor, color, alpha: float = 0.4) -> np.ndarray:
    out = image.astype(np.float32).copy()
    m = mask.numpy()
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, np.float32)
    out[_outline(mask).numpy()] = color
    return out.round().clip(0, 255).astype(np.uint8)


def overlay_panel(image: torch.Tensor, pred: torch.Tensor, truth: torch.Tensor | None = None,
                  title: str | None = None) -> Image.Image:
    """One picture: image | ground truth (if given) | prediction, each mask tinted and outlined.

    ``image`` (3, H, W) uint8; ``pred`` and ``truth`` (H, W) masks (bool or 0/1). The
    prediction panel's caption gives its IoU and Dice against the truth.
    """
    img = image.detach().cpu()
    if img.dtype != torch.uint8:
        img = (img.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    base = img.permute(1, 2, 0).numpy()
    pred_b = pred.detach().cpu() > 0.5 if pred.dtype != torch.bool else pred.detach().cpu()
    panels = [(base, "image")]
    pred_caption = "prediction"
    if truth is not None:
        truth_b = truth.detach().cpu() > 0.5 if truth.dtype != torch.bool else truth.detach().cpu()
        if truth_b.shape != pred_b.shape:
            raise ValueError(f"truth {tuple(truth_b.shape)} and prediction {tuple(pred_b.shape)} differ in size")
        panels.append((_tint(base, truth_b, TRUTH_COLOR), "ground truth"))
        s = scores_from_counts(confusion_counts(pred_b[None, None], truth_b[None, None])[0])
        pred_caption += f"  IoU {float(s['iou']):.3f}  Dice {float(s['dice']):.3f}"
    panels.append((_tint(base, pred_b, PRED_COLOR), pred_caption))
    h, w = base.shape[:2]
    header, gap = 16, 4
    canvas = Image.new("RGB", (len(panels) * w + (len(panels) - 1) * gap, h + header + (header if title else 0)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    top = header if title else 0
    if title:
        draw.text((2, 2), title, fill=(0, 0, 0))
    for i, (arr, caption) in enumerate(panels):
        x = i * (w + gap)
        draw.text((x + 2, top + 2), caption, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(arr), (x, top + header))
    return canvas


def write_predictions(out_dir: str | os.PathLike, names: Sequence[str], images: Sequence[torch.Tensor],
                      probs: Sequence[torch.Tensor], truths: Sequence[torch.Tensor | None] | None = None,
                      threshold: float = 0.5, overlays: bool = True) -> dict[str, list[str]]:
    """Write ``OUT/masks/<k>/<name>.png`` for every class k and ``OUT/overlays/<name>.png``.

    ``probs`` are (K, H, W) probabilities (from :func:`predict_images`); a pixel is
    foreground when its probability is > ``threshold``. Returns the written paths.
    """
    if not len(names) == len(images) == len(probs):
        raise ValueError(f"{len(names)} names, {len(images)} images and {len(probs)} predictions")
    truths = list(truths) if truths is not None else [None] * len(names)
    out = Path(out_dir)
    written: dict[str, list[str]] = {"masks": [], "overlays": []}
    for name, img, p, t in zip(names, images, probs, truths):
        pred = p > threshold
        for k in range(pred.shape[0]):
            written["masks"].append(str(save_mask_png(pred[k], out / "masks" / str(k) / f"{name}.png")))
        if overlays:
            rows = [overlay_panel(img, pred[k], None if t is None else t[k],
                                  title=f"{name} class {k}" if pred.shape[0] > 1 else name)
                    for k in range(pred.shape[0])]
            sheet = rows[0] if len(rows) == 1 else _stack_rows(rows)
            path = out / "overlays" / f"{name}.png"
            with atomic_path(path) as tmp:
                sheet.save(tmp, format="PNG")
            written["overlays"].append(str(path))
    return written


def truth_scores(probs: Sequence[torch.Tensor], truths: Sequence[torch.Tensor | None], threshold: float = 0.5) -> dict:
    """IoU and Dice (percent) of the predictions whose ground truth is known, at the images' own
    size: ``with_truth`` (how many), ``iou_global`` / ``dice_global`` (all their pixels pooled) and
    ``iou_per_image`` / ``dice_per_image`` (mean over images); empty when no truth is known."""
    known = [(p, t) for p, t in zip(probs, truths) if t is not None]
    if not known:
        return {}
    counts = torch.cat([confusion_counts(p[None] > threshold, t[None]) for p, t in known])
    pooled = scores_from_counts(counts.sum(0))
    per_image = scores_from_counts(counts)
    return dict(with_truth=len(known), iou_global=100 * float(pooled["iou"]), dice_global=100 * float(pooled["dice"]),
                iou_per_image=100 * float(per_image["iou"].mean()), dice_per_image=100 * float(per_image["dice"].mean()))


def _stack_rows(rows: list[Image.Image]) -> Image.Image:
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (255, 255, 255))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    return sheet
