"""mixlab's paper-style segmentation figures against torchmetrics on the same predictions.

Where the definitions agree they must give the same numbers: pixel counts per image, the
data-set-wide (pooled) IoU, Dice, precision, recall and pixel accuracy, the per-image IoU of
images with a non-empty union, and the paper's batch-pooled IoU (each batch's pooled IoU,
averaged weighted by batch size). Where they do not (mixlab's 1e-5 smoothing makes an empty
image score 1; torchmetrics' zero_division gives 0), only non-empty cases are compared, and
the smoothing's effect is bounded by the tolerance.
"""
from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import (
    binary_accuracy, binary_f1_score, binary_jaccard_index, binary_precision, binary_recall, binary_stat_scores,
    multilabel_jaccard_index,
)

from mixlab.seg.metrics import SegMetrics, confusion_counts, scores_from_counts


def _batch(n=10, k=1, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    truth = torch.zeros(n, k, size, size)
    for i in range(n):
        y, x, h = torch.randint(0, size // 2, (3,), generator=g).tolist()
        truth[i, :, y:y + h + 3, x:x + h + 3] = 1.0  # a square lesion of another size per image
    logits = 4 * (truth - 0.5) + 2.5 * torch.randn(n, k, size, size, generator=g)  # a noisy prediction
    return logits, truth


def test_pixel_counts_per_image_equal_torchmetrics():
    logits, truth = _batch()
    ours = confusion_counts(logits, truth)  # tp, fp, fn, tn
    theirs = binary_stat_scores(torch.sigmoid(logits).flatten(1), truth.long().flatten(1), threshold=0.5,
                                multidim_average="samplewise")  # tp, fp, tn, fn, support
    assert torch.equal(ours, theirs[:, [0, 1, 3, 2]].long())


def test_pooled_figures_equal_torchmetrics():
    logits, truth = _batch()
    m = SegMetrics()
    m.update(logits[:6], truth[:6])
    m.update(logits[6:], truth[6:])
    got = m.compute()
    p, t = torch.sigmoid(logits).flatten(), truth.long().flatten()
    tol = dict(rel=1e-6, abs=1e-6)  # the 1e-5 smoothing over hundreds of pixels
    assert got["iou_global"] == pytest.approx(float(binary_jaccard_index(p, t)), **tol)
    assert got["dice_global"] == pytest.approx(float(binary_f1_score(p, t)), **tol)
    assert got["precision"] == pytest.approx(float(binary_precision(p, t)), **tol)
    assert got["recall"] == pytest.approx(float(binary_recall(p, t)), **tol)
    assert got["pixel_accuracy"] == pytest.approx(float(binary_accuracy(p, t)), abs=1e-7)  # float32 there


def test_per_image_iou_equals_torchmetrics_for_non_empty_images():
    logits, truth = _batch()
    ours = scores_from_counts(confusion_counts(logits, truth))["iou"]
    for i in range(len(truth)):
        theirs = binary_jaccard_index(torch.sigmoid(logits[i]).flatten(), truth[i].long().flatten())
        assert float(ours[i]) == pytest.approx(float(theirs), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 10])
def test_the_papers_batch_pooled_iou_is_torchmetrics_per_batch_weighted_by_size(batch_size):
    logits, truth = _batch(n=10)
    got = SegMetrics(official_batch_size=batch_size)
    got.update(logits, truth)
    want, n = 0.0, 0
    for s in range(0, 10, batch_size):
        b = slice(s, s + batch_size)
        size = len(truth[b])
        want += size * float(binary_jaccard_index(torch.sigmoid(logits[b]).flatten(), truth[b].long().flatten()))
        n += size
    assert got.compute()["iou"] == pytest.approx(want / n, rel=1e-6, abs=1e-6)


def test_several_mask_classes_pool_like_torchmetrics_micro_average():
    logits, truth = _batch(n=6, k=2)
    got = SegMetrics()
    got.update(logits, truth)
    # (N, K, H, W) -> pixels x labels: micro averaging pools every class's pixels, as mixlab does
    p = torch.sigmoid(logits).permute(0, 2, 3, 1).reshape(-1, 2)
    t = truth.permute(0, 2, 3, 1).reshape(-1, 2).long()
    theirs = multilabel_jaccard_index(p, t, num_labels=2, average="micro")
    assert got.compute()["iou_global"] == pytest.approx(float(theirs), rel=1e-6, abs=1e-6)
