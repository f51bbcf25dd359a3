"""Segmentation metrics against hand-computed cases and the official formula."""
from __future__ import annotations

import pytest
import torch

from mixlab.seg.metrics import (SMOOTH, SegMetrics, confusion_counts, official_iou_dice, official_iou_score,
                                scores_from_counts)

S = SMOOTH


def _logits(mask) -> torch.Tensor:
    """Confident logits for a 0/1 mask given as nested lists (one image, one class)."""
    m = torch.tensor(mask, dtype=torch.float32)
    return (m * 20 - 10)[None, None]


def _mask(mask) -> torch.Tensor:
    return torch.tensor(mask, dtype=torch.float32)[None, None]


EMPTY = [[0] * 4 for _ in range(4)]
FULL = [[1] * 4 for _ in range(4)]
TRUTH = [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]  # 4 pixels
PRED = [[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0]]  # 5 pixels, 3 of them on the truth


def _scores(pred, truth):
    return {k: float(v) for k, v in scores_from_counts(confusion_counts(_logits(pred), _mask(truth))[0]).items()}


def test_counts_of_partial_overlap():
    assert confusion_counts(_logits(PRED), _mask(TRUTH)).tolist() == [[3, 2, 1, 10]]


def test_both_empty_scores_one():
    s = _scores(EMPTY, EMPTY)
    assert s == dict(iou=1.0, dice=1.0, precision=1.0, recall=1.0)


def test_empty_prediction_of_nonempty_truth():
    s = _scores(EMPTY, TRUTH)
    assert s["iou"] == pytest.approx(S / (4 + S), rel=1e-12) and s["iou"] < 1e-5
    assert s["dice"] == pytest.approx(2 * s["iou"] / (1 + s["iou"]), rel=1e-12)
    assert s["recall"] == pytest.approx(S / (4 + S), rel=1e-12)
    assert s["precision"] == 1.0  # no false positive: smoothing convention, stated in the docstring


def test_full_masks():
    assert _scores(FULL, FULL) == dict(iou=1.0, dice=1.0, precision=1.0, recall=1.0)
    s = _scores(FULL, TRUTH)  # 16 predicted, 4 true
    assert s["iou"] == pytest.approx((4 + S) / (16 + S)) and s["recall"] == 1.0
    assert s["precision"] == pytest.approx((4 + S) / (16 + S))
    assert s["dice"] == pytest.approx(8 / 20, abs=1e-6)


def test_partial_overlap_by_hand():
    s = _scores(PRED, TRUTH)  # tp 3, fp 2, fn 1
    assert s["iou"] == pytest.approx((3 + S) / (6 + S), rel=1e-12)
    assert s["dice"] == pytest.approx(6 / 9, abs=1e-6)  # 2tp / (2tp + fp + fn)
    assert s["precision"] == pytest.approx((3 + S) / (5 + S), rel=1e-12)
    assert s["recall"] == pytest.approx((3 + S) / (4 + S), rel=1e-12)


def test_threshold_is_strict_at_half():
    # sigmoid(0) = 0.5 is not foreground in the official code (> 0.5)
    counts = confusion_counts(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    assert counts.tolist() == [[0, 0, 4, 0]]
    counts = confusion_counts(torch.full((1, 1, 2, 2), 0.5), torch.ones(1, 1, 2, 2), from_logits=False)
    assert counts.tolist() == [[0, 0, 4, 0]]


def test_official_batch_pooling_and_averages():
    logits = torch.cat([_logits(PRED), _logits(EMPTY)])
    target = torch.cat([_mask(TRUTH), _mask(EMPTY)])
    iou, dice = official_iou_score(logits, target)  # one batch of two: pixels pooled
    assert iou == pytest.approx((3 + S) / (6 + S)) and dice == pytest.approx(2 * iou / (1 + iou))
    counts = confusion_counts(logits, target)
    assert official_iou_dice(counts, 2)[0] == pytest.approx(iou)
    per_image = ((3 + S) / (6 + S) + 1.0) / 2
    assert official_iou_dice(counts, 1)[0] == pytest.approx(per_image)

    m = SegMetrics()
    m.update(logits, target)
    r = m.compute()
    assert r["iou"] == pytest.approx(iou) and r["official_batch_size"] == 2
    assert r["iou_per_image"] == pytest.approx(per_image)
    assert r["iou_global"] == pytest.approx((3 + S) / (6 + S))
    assert r["precision"] == pytest.approx((3 + S) / (5 + S)) and r["recall"] == pytest.approx((3 + S) / (4 + S))
    assert r["images"] == 2 and r["pixel_accuracy"] == pytest.approx(29 / 32)
    # the paper's figure computed for another batch size, regardless of the update batches
    m1 = SegMetrics(official_batch_size=1)
    m1.update(logits[:1], target[:1])
    m1.update(logits[1:], target[1:])
    assert m1.compute()["iou"] == pytest.approx(per_image)


def _official_numpy(output: torch.Tensor, target: torch.Tensor):
    """UNeXt-pytorch metrics.iou_score, as written there (numpy on sigmoid outputs)."""
    out = torch.sigmoid(output).numpy() > 0.5
    tgt = target.numpy() > 0.5
    iou = ((out & tgt).sum() + 1e-5) / ((out | tgt).sum() + 1e-5)
    return iou, 2 * iou / (iou + 1)


def test_matches_official_formula_on_random_batches():
    g = torch.Generator().manual_seed(0)
    meter_iou = meter_n = 0.0
    m = SegMetrics()
    for n in (3, 3, 2):  # a last partial batch, as drop_last=False leaves it
        out = torch.randn(n, 1, 16, 16, generator=g)
        tgt = (torch.rand(n, 1, 16, 16, generator=g) > 0.6).float()
        ref_iou, ref_dice = _official_numpy(out, tgt)
        iou, dice = official_iou_score(out, tgt)
        assert iou == pytest.approx(ref_iou, rel=1e-9) and dice == pytest.approx(ref_dice, rel=1e-9)
        m.update(out, tgt)
        meter_iou += ref_iou * n
        meter_n += n
    assert m.compute()["iou"] == pytest.approx(meter_iou / meter_n, rel=1e-9)


def test_multi_class_counts_pool_classes_per_image():
    out = torch.tensor([[[[5.0, -5.0]], [[5.0, 5.0]]]])  # (1, 2, 1, 2)
    tgt = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]])
    assert confusion_counts(out, tgt).tolist() == [[2, 1, 1, 0]]


def test_shape_mismatch_and_empty_are_errors():
    with pytest.raises(ValueError, match="same shape"):
        confusion_counts(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))
    with pytest.raises(ValueError, match="before any update"):
        SegMetrics().compute()
