"""Boundary patches: boundary pixels, boxes and NMS against naive references; crop and paste."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from refine_data import ellipse

from mixlab.refine.patches import (boundary_boxes, boundary_map, crop_patches, fit_inside, nms_boxes,
                                   paste_patches, propose_boxes, reassemble)
from mixlab.refine.refiner import PatchSettings, refine_masks, training_patches


def _disc(size=96, r=24.0, cy=48.0, cx=47.0) -> torch.Tensor:
    return torch.from_numpy(ellipse(size, cy, cx, r, r)).float()[None, None]


def _naive_boundary(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: count the foreground pixels of the 3x3 neighbourhood, coordinates clamped."""
    h, w = mask.shape
    score = np.zeros((h, w), np.int64)
    for y in range(h):
        for x in range(w):
            c = sum(int(mask[min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)])
                    for dy in (-1, 0, 1) for dx in (-1, 0, 1))
            score[y, x] = min(c, 9 - c)
    return score > 0, score


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _naive_nms(boxes, scores, threshold) -> list[int]:
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])
    kept: list[int] = []
    for i in order:
        if all(_iou(boxes[i], boxes[k]) <= threshold for k in kept):
            kept.append(i)
    return kept


def test_boundary_map_matches_a_per_pixel_reference():
    rng = np.random.default_rng(1)
    masks = (rng.random((3, 1, 13, 17)) > 0.6).astype(np.uint8)
    masks[1, 0] = 0  # empty: no boundary
    masks[2, 0, :, :9] = 1  # a straight edge reaching the image border
    is_b, score = boundary_map(torch.from_numpy(masks))
    for i in range(3):
        ref_b, ref_s = _naive_boundary(masks[i, 0])
        assert np.array_equal(is_b[i].numpy(), ref_b)
        assert np.array_equal(score[i].numpy(), ref_s)
    assert not is_b[1].any()
    # the image edge is not a boundary: the straight edge's border pixels are interior
    assert not is_b[2, 0, 2] and is_b[2, 6, 8] and is_b[2, 6, 9]


def test_boxes_on_a_disc_are_centred_on_boundary_pixels_and_nms_is_greedy():
    mask = _disc()
    is_b, _ = boundary_map(mask)
    boxes, scores, idx = propose_boxes(mask, 32)
    assert len(boxes) == int(is_b.sum())
    centres = (boxes[:, :2] + 16).long()  # pixel x - 16 .. x + 15: the centre pixel is x
    assert is_b[0, centres[:, 1], centres[:, 0]].all()
    for threshold in (0.25, 0.55):
        keep = nms_boxes(boxes, scores, idx, threshold)
        ref = _naive_nms(boxes.tolist(), scores.tolist(), threshold)
        assert keep.tolist() == ref
        kept = boxes[keep].tolist()
        assert all(_iou(a, b) <= threshold for i, a in enumerate(kept) for b in kept[i + 1:])
    # the disc sits inside the image: fitting changes nothing, and boundary_boxes keeps those boxes
    fitted, fidx = boundary_boxes(mask, 32, 0.55)
    kept = boxes[nms_boxes(boxes, scores, idx, 0.55)]
    assert sorted(map(tuple, fitted.tolist())) == sorted(map(tuple, kept.tolist()))
    assert (fidx == 0).all()


def test_boxes_cover_the_boundary_at_nms_thresholds_from_one_third():
    masks = torch.cat([_disc(), _disc(r=30, cy=20, cx=80)])  # the second one is cut by the image edge
    is_b, _ = boundary_map(masks)
    for threshold in (0.34, 0.55, 0.9):
        boxes, idx = boundary_boxes(masks, 32, threshold)
        covered = torch.zeros_like(is_b)
        for (x0, y0, x1, y1), i in zip(boxes.long().tolist(), idx.tolist()):
            assert 0 <= x0 and x1 <= 96 and 0 <= y0 and y1 <= 96 and x1 - x0 == 32 and y1 - y0 == 32
            covered[i, y0:y1, x0:x1] = True
        assert covered[is_b].all(), threshold
    fewer, _ = boundary_boxes(masks, 32, 0.25)
    assert len(fewer) < len(boundary_boxes(masks, 32, 0.55)[0])


def test_fit_inside_shifts_boxes_back_without_resizing():
    boxes = torch.tensor([[-5.0, 3, 11, 19], [30, -2, 46, 14], [35, 30, 51, 46], [-20, -20, 30, 30]],
                         dtype=torch.float64)
    out = fit_inside(boxes, 40, 40)
    assert out.tolist() == [[0, 3, 16, 19], [24, 0, 40, 16], [24, 24, 40, 40], [-5, -5, 45, 45]]


def test_roi_align_crop_is_grid_sample_bilinear_sampling_and_exact_at_scale_one():
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.integers(0, 256, (2, 3, 40, 40)).astype(np.float32))
    boxes = torch.tensor([[4.0, 6, 20, 22], [10, 0, 26, 16]], dtype=torch.float64)
    idx = torch.tensor([0, 1])
    same = crop_patches(img, boxes, idx, 16)
    assert torch.equal(same[0], img[0, :, 6:22, 4:20]) and torch.equal(same[1], img[1, :, 0:16, 10:26])
    up = crop_patches(img, boxes, idx, 48)
    for k in range(2):
        x0, y0, x1, y1 = boxes[k].tolist()
        # the affine map from the output's [-1, 1] onto the box edges in the image's [-1, 1]
        theta = torch.tensor([[[(x1 - x0) / 40, 0, (x0 + x1) / 40 - 1], [0, (y1 - y0) / 40, (y0 + y1) / 40 - 1]]])
        grid = F.affine_grid(theta.float(), [1, 3, 48, 48], align_corners=False)
        ref = F.grid_sample(img[idx[k]][None], grid, mode="bilinear", padding_mode="border", align_corners=False)
        torch.testing.assert_close(up[k], ref[0], atol=1e-3, rtol=0)


@pytest.mark.parametrize("input_size", [32, 64, 96, 128])
def test_identity_refiner_gives_the_coarse_mask_back_exactly_at_integer_scales(input_size):
    masks = torch.cat([_disc(), _disc(r=30, cy=20, cx=80), torch.zeros(1, 1, 96, 96)])
    boxes, idx = boundary_boxes(masks, 32, 0.55)
    total, count = paste_patches(crop_patches(masks, boxes, idx, input_size), boxes, idx, (3, 96, 96))
    assert torch.equal(reassemble(masks, total, count), masks > 0.5)


def test_identity_round_trip_off_integer_scales_stays_within_the_interpolation_error():
    masks = torch.cat([_disc(), _disc(r=30, cy=20, cx=80)])
    boxes, idx = boundary_boxes(masks, 32, 0.55)
    is_b, _ = boundary_map(masks)
    near = F.max_pool2d(is_b.float()[:, None], 3, stride=1, padding=1)[:, 0] > 0  # within 1 px of the boundary
    for size in (16, 24, 40):  # shrunk 2x, 1.33x; enlarged 1.25x
        total, count = paste_patches(crop_patches(masks, boxes, idx, size), boxes, idx, (2, 96, 96))
        changed = reassemble(masks, total, count)[:, 0] != (masks[:, 0] > 0.5)
        assert not changed[~near].any(), size
        assert int(changed.sum()) <= 0.1 * int(is_b.sum()), size


def test_overlapping_patches_average_and_uncovered_pixels_keep_the_coarse_mask():
    coarse = torch.zeros(1, 1, 20, 20)
    coarse[0, 0, 15:, 15:] = 1  # outside both boxes: kept as it is
    boxes = torch.tensor([[0.0, 0, 8, 8], [4, 4, 12, 12]], dtype=torch.float64)
    idx = torch.tensor([0, 0])
    for second, expect in ((0.0, False), (0.2, True)):  # overlap mean 0.5 (not > 0.5) or 0.6
        patches = torch.stack([torch.ones(1, 8, 8), torch.full((1, 8, 8), second)])
        total, count = paste_patches(patches, boxes, idx, (1, 20, 20))
        assert count[0, 5, 5] == 2 and count[0, 1, 1] == 1 and count[0, 10, 10] == 1 and count[0, 14, 14] == 0
        assert total[0, 5, 5].item() == pytest.approx(1 + second)
        out = reassemble(coarse, total, count)[0, 0]
        assert bool(out[5, 5]) is expect and bool(out[1, 1]) and not out[10, 10]
        assert torch.equal(out[12:, 12:], coarse[0, 0, 12:, 12:] > 0.5)


class _Constant(torch.nn.Module):
    """A 'refiner' that says foreground everywhere (logit 10), whatever it sees."""

    def forward(self, x):
        assert x.shape[1] == 4
        return torch.full_like(x[:, :1], 10.0)


def test_refine_masks_changes_only_patch_pixels_and_passes_empty_masks_through():
    masks = torch.cat([_disc(), torch.zeros(1, 1, 96, 96)])
    images = torch.zeros(2, 3, 96, 96, dtype=torch.uint8)
    settings = PatchSettings(size=16, input_size=32, nms_iou=0.55)
    refined, counts = refine_masks(_Constant(), images, masks, settings, [0.5] * 3, [0.25] * 3)
    boxes, idx = boundary_boxes(masks, 16, 0.55)
    inside = torch.zeros(2, 96, 96, dtype=torch.bool)
    for (x0, y0, x1, y1), i in zip(boxes.long().tolist(), idx.tolist()):
        inside[i, y0:y1, x0:x1] = True
    assert counts.tolist() == [len(boxes), 0]
    assert refined[:, 0][inside].all()
    assert torch.equal(refined[:, 0][~inside], masks[:, 0][~inside] > 0.5)
    assert not refined[1].any()  # the empty mask: no patches, unchanged


def test_training_patches_pair_image_coarse_and_truth_crops():
    truth = _disc()
    coarse = F.max_pool2d(truth, 5, stride=1, padding=2)  # 2 px too large
    image = (truth * 200).to(torch.uint8).expand(1, 3, 96, 96).contiguous()
    imgs, masks, where = training_patches(image, coarse, truth, PatchSettings(16, 16, 0.25))
    boxes, _ = boundary_boxes(coarse, 16, 0.25)
    assert len(imgs) == len(boxes) == len(masks) and (where == 0).all()
    for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        assert torch.equal(imgs[k], image[0, :, y0:y1, x0:x1])
        assert torch.equal(masks[k, 0], (coarse[0, 0, y0:y1, x0:x1] * 255).to(torch.uint8))
        assert torch.equal(masks[k, 1], truth[0, 0, y0:y1, x0:x1].to(torch.uint8))
