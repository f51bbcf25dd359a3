"""Before/after figures of a refinement: IoU and Dice as `mixlab seg eval` computes them, and
a boundary F-score.

**Boundary F-score** at a tolerance of ``d`` pixels (the contour measure of the DAVIS and
BSDS benchmarks; Perazzi et al. 2016): the boundary of a mask is its foreground pixels with
a background pixel among their 8 neighbours (the image edge is not a boundary); a predicted
boundary pixel is correct when a true boundary pixel lies within Euclidean distance ``d``
of it, and a true one is found when a predicted one lies within ``d``. Precision = correct
/ predicted boundary pixels, recall = found / true boundary pixels, F = 2PR / (P + R), per
image. An image with neither boundary scores 1; one with only one of them scores 0. The
reported figure is the mean over images. The default tolerance is 2 px (at BUSI's 256 x 256,
0.55% of the image diagonal, near DAVIS' 0.8% rounded down).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..seg.metrics import SegMetrics
from ..errors import UsageError

__all__ = ["DEFAULT_TOLERANCE", "mask_boundary", "boundary_scores", "compare_refinement"]

DEFAULT_TOLERANCE = 2


def _as_bool(masks: torch.Tensor) -> torch.Tensor:
    if masks.ndim == 3:
        masks = masks[:, None]
    if masks.ndim != 4:
        raise UsageError(f"masks must be (N, 1, H, W) or (N, H, W), got shape {tuple(masks.shape)}")
    return masks if masks.dtype == torch.bool else masks > 0.5


def mask_boundary(masks: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) bool: foreground pixels with a background 8-neighbour (edges replicated)."""
    m = _as_bool(masks).float()
    eroded = -F.max_pool2d(F.pad(-m, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return (m > 0.5) & (eroded < 0.5)


def _within(boundary: torch.Tensor, tolerance: int) -> torch.Tensor:
    """Pixels within Euclidean distance ``tolerance`` of a pixel of ``boundary``."""
    if tolerance == 0:
        return boundary
    r = torch.arange(-tolerance, tolerance + 1, device=boundary.device, dtype=torch.float32)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= tolerance ** 2).float()[None, None]
    return F.conv2d(boundary.float(), disk, padding=tolerance) > 0.5


def boundary_scores(pred: torch.Tensor, truth: torch.Tensor,
                    tolerance: int = DEFAULT_TOLERANCE) -> dict[str, torch.Tensor]:
    """Per-image boundary precision, recall and F (each (N,) float64) at ``tolerance`` pixels."""
    if int(tolerance) < 0:
        raise UsageError(f"the boundary tolerance must be 0 or more pixels, got {tolerance}")
    p, t = _as_bool(pred), _as_bool(truth)
    if p.shape != t.shape:
        raise UsageError(f"prediction {tuple(p.shape)} and truth {tuple(t.shape)} differ in shape")
    bp, bt = mask_boundary(p), mask_boundary(t)
    n_p, n_t = bp.flatten(1).sum(1).double(), bt.flatten(1).sum(1).double()
    correct = (bp & _within(bt, int(tolerance))).flatten(1).sum(1).double()
    found = (bt & _within(bp, int(tolerance))).flatten(1).sum(1).double()
    precision = torch.where(n_p > 0, correct / n_p.clamp(min=1), (n_t == 0).double())
    recall = torch.where(n_t > 0, found / n_t.clamp(min=1), (n_p == 0).double())
    f = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                    torch.zeros_like(precision))
    return dict(precision=precision, recall=recall, f=f)


def _region(masks: torch.Tensor, truth: torch.Tensor, batch_size: int) -> tuple[dict, dict]:
    m = SegMetrics(official_batch_size=int(batch_size))
    m.update(_as_bool(masks), _as_bool(truth), from_logits=False)
    return m.compute(), {k: v.tolist() for k, v in m.per_image().items()}


def compare_refinement(before: torch.Tensor, after: torch.Tensor, truth: torch.Tensor, batch_size: int = 8,
                       tolerance: int = DEFAULT_TOLERANCE) -> dict:
    """Every figure before and after, on the same images in the same order.

    ``iou``/``dice``: the paper's figure `mixlab seg eval` reports (pixels pooled per
    consecutive batch of ``batch_size`` images, batches averaged); ``*_per_image`` and
    ``*_global`` beside it; ``boundary_f``: the mean per-image boundary F at ``tolerance``.
    Values are fractions (0..1); ``per_image`` holds each image's IoU and boundary F.
    """
    out: dict = dict(n_images=int(_as_bool(truth).shape[0]), boundary_tolerance_px=int(tolerance),
                     official_batch_size=int(batch_size))
    per_image: dict = {}
    for when, masks in (("before", before), ("after", after)):
        region, region_each = _region(masks, truth, batch_size)
        b = boundary_scores(masks, truth, tolerance)
        for key in ("iou", "dice", "iou_per_image", "dice_per_image", "iou_global", "dice_global",
                    "precision", "recall"):
            out[f"{key}_{when}"] = region[key]
        out[f"boundary_f_{when}"] = float(b["f"].mean())
        out[f"boundary_precision_{when}"] = float(b["precision"].mean())
        out[f"boundary_recall_{when}"] = float(b["recall"].mean())
        per_image[f"iou_{when}"] = region_each["iou"]
        per_image[f"boundary_f_{when}"] = b["f"].tolist()
    out["per_image"] = per_image
    return out
