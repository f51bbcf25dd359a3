"""Segmentation metrics at a 0.5 threshold: IoU (Jaccard), Dice (F1), precision, recall.

How the paper's code computes IoU and Dice (UNeXt-pytorch ``metrics.iou_score``, called by
``train.py``'s ``validate`` and by ``val.py``):

* ``pred = sigmoid(logits) > 0.5`` and ``truth = target > 0.5`` (targets are masks / 255);
* per *batch*, all pixels of all images and classes pooled:
  ``iou = (|pred & truth| + 1e-5) / (|pred | truth| + 1e-5)`` and ``dice = 2 * iou / (iou + 1)``
  (Dice is derived from that IoU, which equals ``2|P&T| / (|P| + |T|)`` up to the smoothing);
* the reported figure is the mean of the batch values weighted by batch size
  (``AverageMeter.update(iou, input.size(0))``) over the validation loader
  (``shuffle=False``, ``drop_last=False``; batch size = the training batch size).

So the paper's IoU/Dice depend on how images fall into batches: a batch pools its images'
pixels. :class:`SegMetrics` reports that figure (``iou``/``dice``, for a stated batch size,
computed from per-image counts in evaluation order, so it does not depend on the batches the
evaluation loop actually used) and two batch-free ones beside it:

* ``*_per_image``: the mean over images of each image's own value, same smoothing (an image
  whose truth and prediction are both empty scores 1; an empty prediction of a non-empty
  truth scores ~0); with batch size 1 the paper's formula gives exactly this;
* ``*_global``: all pixels of the data set pooled into one count.

Precision ``(tp + 1e-5) / (tp + fp + 1e-5)`` and recall ``(tp + 1e-5) / (tp + fn + 1e-5)``
use the same smoothing (so an empty prediction has precision 1: it made no false positive).
"""
from __future__ import annotations

import math

import torch

from ..errors import UsageError

__all__ = ["SMOOTH", "binarize", "confusion_counts", "scores_from_counts", "official_iou_score",
           "official_iou_dice", "SegMetrics"]

SMOOTH = 1e-5


def binarize(output: torch.Tensor, threshold: float = 0.5, from_logits: bool = True) -> torch.Tensor:
    """Boolean masks ``sigmoid(output) > threshold`` (or ``output > threshold`` for probabilities/masks)."""
    if output.dtype == torch.bool:
        return output
    probs = torch.sigmoid(output.float()) if from_logits else output.float()
    return probs > threshold


def confusion_counts(output: torch.Tensor, target: torch.Tensor, threshold: float = 0.5,
                     from_logits: bool = True) -> torch.Tensor:
    """Per-image pixel counts ``(N, 4)`` = tp, fp, fn, tn over all classes and pixels (int64).

    ``output``: logits (or probabilities with ``from_logits=False``, or boolean masks)
    ``(N, K, H, W)``; ``target``: masks ``(N, K, H, W)``, foreground where > 0.5.
    """
    if output.shape != target.shape:
        raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)} must have the same shape")
    pred = binarize(output, threshold, from_logits).flatten(1)
    truth = (target > 0.5 if target.dtype != torch.bool else target).flatten(1)
    tp = (pred & truth).sum(1)
    fp = (pred & ~truth).sum(1)
    fn = (~pred & truth).sum(1)
    tn = pred.shape[1] - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], dim=1).long().cpu()


def scores_from_counts(counts: torch.Tensor, smooth: float = SMOOTH) -> dict[str, torch.Tensor]:
    """IoU, Dice, precision, recall of each row of ``counts`` (tp, fp, fn, tn), float64."""
    c = counts.double()
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
    iou = (tp + smooth) / (tp + fp + fn + smooth)
    return dict(
        iou=iou,
        dice=2 * iou / (iou + 1),
        precision=(tp + smooth) / (tp + fp + smooth),
        recall=(tp + smooth) / (tp + fn + smooth),
    )


def official_iou_score(output: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """The official ``iou_score(output, target)`` of one batch of logits: (iou, dice), pixels pooled."""
    s = scores_from_counts(confusion_counts(output, target).sum(0))
    return float(s["iou"]), float(s["dice"])


def official_iou_dice(counts: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """The paper's validation IoU and Dice from per-image counts in evaluation order.

    Images are grouped into consecutive batches of ``batch_size`` (the last may be smaller),
    each batch's pooled IoU and Dice computed as ``iou_score`` does, and the batch values
    averaged weighted by batch size.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    n = counts.shape[0]
    if n == 0:
        raise UsageError("no images to score")
    iou_sum = dice_sum = 0.0
    for start in range(0, n, batch_size):
        chunk = counts[start:start + batch_size]
        s = scores_from_counts(chunk.sum(0))
        iou_sum += float(s["iou"]) * chunk.shape[0]
        dice_sum += float(s["dice"]) * chunk.shape[0]
    return iou_sum / n, dice_sum / n


class SegMetrics:
    """Accumulates per-image counts over an evaluation; :meth:`compute` gives every figure.

    Args:
        official_batch_size: batch size used for the paper's figure (``iou``, ``dice``);
            None = the batch sizes :meth:`update` was called with.
        threshold: probability threshold (0.5 in the paper's code).
    """

    def __init__(self, official_batch_size: int | None = None, threshold: float = 0.5):
        self.official_batch_size = official_batch_size
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self._counts: list[torch.Tensor] = []
        self._batches: list[int] = []

    def update(self, output: torch.Tensor, target: torch.Tensor, from_logits: bool = True) -> torch.Tensor:
        """Add a batch; returns its per-image counts ``(N, 4)``."""
        counts = confusion_counts(output.detach(), target.detach(), self.threshold, from_logits)
        self._counts.append(counts)
        self._batches.append(counts.shape[0])
        return counts

    @property
    def counts(self) -> torch.Tensor:
        return torch.cat(self._counts) if self._counts else torch.zeros(0, 4, dtype=torch.long)

    def per_image(self) -> dict[str, torch.Tensor]:
        """IoU, Dice, precision, recall of every image seen, in order."""
        return scores_from_counts(self.counts)

    def compute(self) -> dict[str, float]:
        counts = self.counts
        n = counts.shape[0]
        if n == 0:
            raise ValueError("SegMetrics.compute() before any update()")
        if self.official_batch_size is not None:
            iou, dice = official_iou_dice(counts, self.official_batch_size)
            batch = self.official_batch_size
        else:  # the batches as they came
            iou = dice = 0.0
            start = 0
            for size in self._batches:
                s = scores_from_counts(counts[start:start + size].sum(0))
                iou += float(s["iou"]) * size
                dice += float(s["dice"]) * size
                start += size
            iou, dice = iou / n, dice / n
            batch = self._batches[0] if len(set(self._batches[:-1])) <= 1 else None
        per_image = {k: float(v.mean()) for k, v in scores_from_counts(counts).items()}
        pooled = {k: float(v) for k, v in scores_from_counts(counts.sum(0)).items()}
        out = dict(iou=iou, dice=dice, official_batch_size=batch)
        out.update({f"{k}_per_image": v for k, v in per_image.items()})
        out.update({f"{k}_global": v for k, v in pooled.items()})
        out["precision"], out["recall"] = pooled["precision"], pooled["recall"]
        out["images"] = n
        out["pixel_accuracy"] = float((counts[:, 0] + counts[:, 3]).sum()) / max(1, int(counts.sum()))
        if any(math.isnan(v) for v in out.values() if isinstance(v, float)):
            raise FloatingPointError(f"NaN in segmentation metrics: {out}")
        return out
