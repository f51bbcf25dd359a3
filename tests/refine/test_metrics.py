"""Boundary F-score (hand-computed case, an independent scipy implementation) and the
before/after comparison; an oracle refiner reaches the ceiling on the pixels it covers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from refine_data import ellipse
from scipy import ndimage

from mixlab.refine.metrics import boundary_scores, compare_refinement, mask_boundary
from mixlab.refine.patches import boundary_boxes, crop_patches, paste_patches, reassemble
from mixlab.seg.metrics import official_iou_dice


def _block(h, w, rows, cols) -> torch.Tensor:
    m = torch.zeros(1, 1, h, w, dtype=torch.bool)
    m[0, 0, rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


def test_boundary_f_of_a_hand_computed_case():
    truth = _block(8, 8, (2, 6), (2, 6))  # 4x4 block: a ring of 12 boundary pixels
    pred = _block(8, 8, (2, 6), (2, 7))  # 4x5 block: a ring of 14
    assert int(mask_boundary(truth).sum()) == 12 and int(mask_boundary(pred).sum()) == 14
    # at 0 px, 10 boundary pixels coincide: P = 10/14, R = 10/12, F = 2 * 10 / (14 + 12)
    s = boundary_scores(pred, truth, tolerance=0)
    assert s["precision"].item() == pytest.approx(10 / 14) and s["recall"].item() == pytest.approx(10 / 12)
    assert s["f"].item() == pytest.approx(10 / 13)
    # at 1 px every boundary pixel has a partner (the extra column is next to the true edge)
    assert boundary_scores(pred, truth, tolerance=1)["f"].item() == 1.0


def test_boundary_f_conventions_for_empty_masks():
    empty, block = torch.zeros(1, 1, 8, 8, dtype=torch.bool), _block(8, 8, (2, 6), (2, 6))
    assert boundary_scores(empty, empty)["f"].item() == 1.0
    assert boundary_scores(empty, block)["f"].item() == 0.0
    assert boundary_scores(block, empty)["f"].item() == 0.0
    full = torch.ones(1, 1, 8, 8, dtype=torch.bool)  # the image edge is no boundary: none at all
    assert int(mask_boundary(full).sum()) == 0


def _scipy_boundary_f(pred: np.ndarray, truth: np.ndarray, tol: int) -> float:
    def boundary(m):
        padded = np.pad(m, 1, mode="edge")
        return m & ~ndimage.binary_erosion(padded, structure=np.ones((3, 3)))[1:-1, 1:-1]

    bp, bt = boundary(pred), boundary(truth)
    if not bp.any() and not bt.any():
        return 1.0
    if not bp.any() or not bt.any():
        return 0.0
    dist_to_t = ndimage.distance_transform_edt(~bt)
    dist_to_p = ndimage.distance_transform_edt(~bp)
    p = (dist_to_t[bp] <= tol).mean()
    r = (dist_to_p[bt] <= tol).mean()
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def test_boundary_f_matches_an_independent_implementation():
    rng = np.random.default_rng(3)
    preds, truths = [], []
    for _ in range(6):
        t = ellipse(48, *rng.uniform(12, 36, 2), *rng.uniform(5, 20, 2)).astype(bool)
        p = ellipse(48, *rng.uniform(12, 36, 2), *rng.uniform(5, 20, 2)).astype(bool)
        p ^= rng.random((48, 48)) > 0.97  # speckle: boundaries of every shape
        preds.append(p)
        truths.append(t)
    pred, truth = torch.from_numpy(np.stack(preds))[:, None], torch.from_numpy(np.stack(truths))[:, None]
    for tol in (0, 1, 2, 3):
        got = boundary_scores(pred, truth, tol)["f"].numpy()
        ref = [_scipy_boundary_f(p, t, tol) for p, t in zip(preds, truths)]
        np.testing.assert_allclose(got, ref, atol=1e-12)


def test_compare_refinement_scores_as_seg_eval_does():
    rng = np.random.default_rng(0)
    truth = torch.from_numpy(rng.random((5, 1, 16, 16)) > 0.5)
    before = torch.from_numpy(rng.random((5, 1, 16, 16)) > 0.5)
    r = compare_refinement(before, truth, truth, batch_size=2)
    # independently: per-image tp/fp/fn, pooled over batches of 2 (2, 2, 1), averaged by size
    counts = []
    for p, t in zip(before.numpy(), truth.numpy()):
        tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
        counts.append([tp, fp, fn, p.size - tp - fp - fn])
    iou, dice = official_iou_dice(torch.tensor(counts), 2)
    ious = []
    for start in (0, 2, 4):
        c = np.array(counts[start:start + 2]).sum(0)
        ious.append(((c[0] + 1e-5) / (c[0] + c[1] + c[2] + 1e-5), len(counts[start:start + 2])))
    assert r["iou_before"] == pytest.approx(sum(v * n for v, n in ious) / 5) == pytest.approx(iou)
    assert r["dice_before"] == pytest.approx(dice)
    assert r["iou_after"] == pytest.approx(1.0) and r["boundary_f_after"] == 1.0
    assert r["n_images"] == 5 and len(r["per_image"]["iou_before"]) == 5


def test_an_oracle_refiner_reaches_the_ceiling_on_the_covered_pixels():
    truth = torch.from_numpy(np.stack([ellipse(64, 32, 30, 14, 18), ellipse(64, 28, 36, 20, 11)]))[:, None].bool()
    coarse = torch.from_numpy(np.stack([ellipse(64, 33, 31, 16, 16), ellipse(64, 27, 35, 18, 13)]))[:, None].bool()
    boxes, idx = boundary_boxes(coarse, 16, 0.55)
    oracle = crop_patches(truth.float(), boxes, idx, 32)  # the ground-truth patch of each box
    total, count = paste_patches(oracle, boxes, idx, (2, 64, 64))
    refined = reassemble(coarse, total, count)
    covered = count[:, None] > 0
    assert torch.equal(refined[covered], truth[covered])  # exact on every covered pixel
    assert torch.equal(refined[~covered], coarse[~covered])
    ceiling = torch.where(covered, truth, coarse)
    r = compare_refinement(coarse, refined, truth, batch_size=1)
    c = compare_refinement(ceiling, ceiling, truth, batch_size=1)
    assert r["iou_after"] == c["iou_after"] > r["iou_before"]
    assert r["boundary_f_after"] == c["boundary_f_after"] > r["boundary_f_before"]
    # here the patches cover the whole band between the two boundaries: the ceiling is the truth
    assert r["iou_after"] == pytest.approx(1.0) and r["boundary_f_after"] == 1.0
