"""Pictures of refinement: what ``grid_sample`` does to a patch (:func:`sampling_figure`),
a mask's outlines before and after (:func:`outline_overlay`), and the best, median and worst
changes of an evaluation (:func:`change_cases_figure`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..io import atomic_path

__all__ = ["sampling_figure", "outline_overlay", "change_cases_figure"]

TRUTH, COARSE, REFINED = (0, 200, 0), (40, 110, 255), (230, 40, 40)


def _outline(mask: torch.Tensor) -> np.ndarray:
    from .metrics import mask_boundary

    return mask_boundary(mask.bool()[None, None])[0, 0].numpy()


def _draw(image: torch.Tensor, masks: list[tuple[torch.Tensor, tuple]]) -> np.ndarray:
    """The image (3, H, W) uint8 with each mask's outline in its colour."""
    img = image.detach().cpu()
    out = img.expand(3, -1, -1).permute(1, 2, 0).numpy().copy() if img.shape[0] == 1 else \
        img.permute(1, 2, 0).numpy().copy()
    for mask, color in masks:
        out[_outline(mask.detach().cpu())] = color
    return out


def _save_pil(img: Image.Image, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def outline_overlay(image: torch.Tensor, coarse: torch.Tensor, refined: torch.Tensor, path, title: str = "",
                    truth: torch.Tensor | None = None) -> Path:
    """One PNG: the image with the coarse (blue), refined (red) and true (green) outlines."""
    from PIL import ImageDraw

    layers = ([(truth, TRUTH)] if truth is not None else []) + [(coarse, COARSE), (refined, REFINED)]
    arr = _draw(image, layers)
    h, w = arr.shape[:2]
    canvas = Image.new("RGB", (w, h + 16), (255, 255, 255))
    ImageDraw.Draw(canvas).text((2, 2), title or "blue: coarse, red: refined", fill=(0, 0, 0))
    canvas.paste(Image.fromarray(arr), (0, 16))
    return _save_pil(canvas, path)


def _savefig(fig, path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def sampling_figure(path) -> Path:
    """Top: a 4x4 input sampled onto a 20x20 grid by ``F.grid_sample`` (bilinear and nearest,
    ``align_corners=False``). Bottom: a boundary patch of a synthetic mask cut out with the
    same sampling (64 px -> 128), and the patch pasted back (identity refiner: unchanged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt

    from .patches import boundary_boxes, crop_patches, paste_patches, reassemble

    small = torch.tensor([[0, 8, 15, 4], [12, 3, 9, 15], [5, 15, 0, 10], [15, 6, 11, 2]], dtype=torch.float32)
    theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    grid = F.affine_grid(theta, [1, 1, 20, 20], align_corners=False)
    bilinear = F.grid_sample(small[None, None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    nearest = F.grid_sample(small[None, None], grid, mode="nearest", padding_mode="border", align_corners=False)

    size = 160
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = torch.sqrt((xx - 80.0) ** 2 + (yy - 84.0) ** 2)
    angle = torch.atan2(yy - 84.0, xx - 80.0)
    mask = (r < 48 + 8 * torch.sin(5 * angle)).float()[None, None]
    gen = torch.Generator().manual_seed(0)
    image = (60 + 110 * mask[0] + 12 * torch.randn(1, size, size, generator=gen)).clamp(0, 255)
    image = image.expand(3, -1, -1).round().to(torch.uint8)
    boxes, idx = boundary_boxes(mask, 64, 0.55)
    all_masks = crop_patches(mask, boxes, idx, 128)
    shown = int((all_masks.mean(dim=(1, 2, 3)) - 0.5).abs().argmin())  # the box most evenly split
    one = slice(shown, shown + 1)
    img_patch = crop_patches(image[None], boxes[one], idx[one], 128)[0]
    mask_patch = crop_patches(mask, boxes[one], idx[one], 128)
    total, count = paste_patches(all_masks, boxes, idx, (1, size, size))
    pasted = reassemble(mask, total, count)
    changed = int((pasted != (mask > 0.5)).sum())

    fig, ax = plt.subplots(2, 3, figsize=(14, 9.5))
    ax[0, 0].imshow(small.numpy(), cmap="viridis", vmin=0, vmax=15)
    ax[0, 0].set_title("input 4x4")
    ax[0, 1].imshow(bilinear[0, 0].numpy(), cmap="viridis", vmin=0, vmax=15)
    ax[0, 1].set_title("grid_sample to 20x20, bilinear\n(align_corners=False, padding border)")
    ax[0, 2].imshow(nearest[0, 0].numpy(), cmap="viridis", vmin=0, vmax=15)
    ax[0, 2].set_title("grid_sample to 20x20, nearest")
    ax[1, 0].imshow(image.permute(1, 2, 0).numpy())
    ax[1, 0].contour(mask[0, 0].numpy(), levels=[0.5], colors=["#2870ff"], linewidths=1)
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        ax[1, 0].add_patch(mpatches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                              edgecolor="#e62828" if k == shown else "#ffb000",
                                              linewidth=2 if k == shown else 0.7))
    ax[1, 0].set_title(f"a coarse mask (blue) and its {len(boxes)} boundary boxes\n"
                       "of 64 px (NMS IoU 0.55; red: the patch shown)")
    ax[1, 1].imshow(img_patch.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())
    ax[1, 1].contour(mask_patch[0, 0].numpy(), levels=[0.5], colors=["#2870ff"], linewidths=1)
    ax[1, 1].set_title("the red box cut out, resampled to 128x128\n(roi_align: grid_sample's bilinear sampling)")
    ax[1, 2].imshow(pasted[0, 0].numpy(), cmap="gray")
    ax[1, 2].set_title(f"every patch pasted back unchanged (inverse\n"
                       f"sampling, averaged, > 0.5): {changed} pixels differ")
    for a in ax.ravel():
        a.title.set_fontsize(10)
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle("torch.nn.functional.grid_sample: an output pixel reads the input at any (x, y), bilinearly")
    return _savefig(fig, path)


def change_cases_figure(arrays: dict, result: dict, path, title: str = "") -> Path:
    """Three rows, the images whose IoU refinement raised most, the median change and the one it
    lowered most (or raised least): coarse (blue) and refined (red) outlines with the truth
    (green)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = np.asarray(result["per_image"]["iou_before"], dtype=float)
    after = np.asarray(result["per_image"]["iou_after"], dtype=float)
    bf_b = np.asarray(result["per_image"]["boundary_f_before"], dtype=float)
    bf_a = np.asarray(result["per_image"]["boundary_f_after"], dtype=float)
    change = after - before
    order = np.argsort(change, kind="stable")
    worst = int(order[0])
    cases = [("largest gain", int(order[-1])), ("median change", int(order[len(order) // 2])),
             ("largest loss" if change[worst] < 0 else "smallest gain", worst)]
    fig, ax = plt.subplots(len(cases), 2, figsize=(8, 4 * len(cases)), squeeze=False)
    for row, (label, i) in enumerate(cases):
        truth = arrays["truth"][i, 0]
        for col, (mask, color, name, iou, bf) in enumerate((
                (arrays["coarse"][i, 0], COARSE, "coarse", before[i], bf_b[i]),
                (arrays["refined"][i, 0], REFINED, "refined", after[i], bf_a[i]))):
            ax[row, col].imshow(_draw(arrays["images"][i], [(truth, TRUTH), (mask, color)]))
            ax[row, col].set_title(f"{label}: {arrays['names'][i]}\n{name}: IoU {100 * iou:.1f}, "
                                   f"boundary F {100 * bf:.1f}", fontsize=9)
            ax[row, col].set_xticks([])
            ax[row, col].set_yticks([])
    fig.suptitle(title or "green: truth, blue: coarse, red: refined")
    return _savefig(fig, path)
