"""COCOeval through mixlab's eval path, the union IoU / Dice, the precision-recall plot."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mixlab.det.data import load_det_folder, read_coco_folder
from mixlab.det.metrics import (DetEvalMeter, coco_evaluate, coco_ground_truth, pr_curve, plot_pr_curves,
                                union_counts)
from mixlab.tasks.base import RunContext
from mixlab.tasks.detection import evaluate_detector, split_ground_truth
from mixlab.train.distributed import Distributed


class _Oracle(nn.Module):
    """Answers each image with the given outputs, in evaluation order (a stand-in detector)."""

    def __init__(self, outputs: list[dict]):
        super().__init__()
        self.outputs, self.i = outputs, 0

    def forward(self, images):
        out = self.outputs[self.i:self.i + len(images)]
        self.i += len(images)
        return out


def _truth_as_output(t: dict, shift: float = 0.0) -> dict:
    n = len(t["labels"])
    return dict(boxes=t["boxes"] + torch.tensor([shift, 0, shift, 0]), labels=t["labels"], scores=torch.ones(n),
                masks=t["masks"][:, None].float())


def _cfg(batch=3):
    return dict(batch_size=batch, eval_batch_size=None,
                eval=dict(union_score=0.5, union_batch=8, mask_threshold=0.5))


def _ctx():
    return RunContext(device=torch.device("cpu"), dist=Distributed())


@pytest.mark.parametrize("layout", ["masks", "coco"])
def test_ground_truth_fed_back_scores_100(layout, mask_folder, coco_folder):
    ds = load_det_folder(mask_folder) if layout == "masks" else read_coco_folder(coco_folder)
    oracle = _Oracle([_truth_as_output(t) for t in ds.targets])
    r, meter = evaluate_detector(oracle, ds, _cfg(), _ctx())
    for t in ("bbox", "segm"):
        assert r[f"{t}_AP"] == pytest.approx(100.0) and r[f"{t}_AP50"] == pytest.approx(100.0)
        assert r[f"{t}_AP75"] == pytest.approx(100.0) and r[f"{t}_AR100"] == pytest.approx(100.0)
    assert r["union_iou"] == pytest.approx(100.0) and r["union_dice"] == pytest.approx(100.0)
    assert r["n_images"] == len(ds) and r["n_detections"] == ds.num_instances
    assert r["infer_batch"] == 3


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def test_a_shifted_box_scores_as_pycocotools_says(tmp_path):
    """One object, one detection shifted right by 4 of its 20 pixels: IoU 16*20 / (2*400 - 320)
    = 2/3, so it matches at the COCO thresholds 0.50, 0.55, 0.60, 0.65 and not above: AP 40."""
    gt_box, shift = [10.0, 10.0, 30.0, 30.0], 4.0
    det_box = [gt_box[0] + shift, gt_box[1], gt_box[2] + shift, gt_box[3]]
    iou = _iou(gt_box, det_box)
    thresholds = np.linspace(0.5, 0.95, 10)
    expected_ap = 100.0 * float(np.mean(thresholds <= iou + 1e-12))
    assert iou == pytest.approx(2 / 3) and expected_ap == pytest.approx(40.0)
    gt = coco_ground_truth([dict(id=1, width=64, height=64, file_name="a")],
                           [[dict(image_id=1, category_id=1, bbox=[10, 10, 20, 20], area=400.0, iscrowd=0,
                                  segmentation=[[10, 10, 30, 10, 30, 30, 10, 30]])]],
                           [dict(id=1, name="box")])
    res = [dict(image_id=1, category_id=1, bbox=[det_box[0], det_box[1], 20.0, 20.0], score=0.9)]
    stats = coco_evaluate(gt, res, "bbox")["stats"]
    assert stats["AP"] == pytest.approx(expected_ap)
    assert stats["AP50"] == pytest.approx(100.0) and stats["AP75"] == pytest.approx(0.0)
    assert stats["APs"] == pytest.approx(expected_ap) and stats["APm"] is None and stats["APl"] is None
    # no detections at all: AP 0 (pycocotools cannot load an empty result list)
    assert coco_evaluate(gt, [], "segm")["stats"]["AP"] == 0.0


def test_union_counts_match_a_naive_union():
    rng = torch.Generator().manual_seed(0)
    truth = torch.rand(2, 16, 16, generator=rng) > 0.6
    masks = torch.rand(4, 1, 16, 16, generator=rng)
    out = dict(masks=masks, scores=torch.tensor([0.9, 0.3, 0.6, 0.5]), labels=torch.tensor([1, 2, 2, 1]))
    pred = torch.zeros(2, 16, 16, dtype=torch.bool)
    for i in range(4):
        if out["scores"][i] >= 0.5:
            pred[out["labels"][i] - 1] |= masks[i, 0] > 0.5
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    fn = int((~pred & truth).sum())
    assert union_counts(out, truth).tolist() == [tp, fp, fn, 2 * 256 - tp - fp - fn]


def test_union_iou_uses_the_semantic_mask_and_the_score_threshold(mask_folder):
    ds = load_det_folder(mask_folder, min_area=5)  # case05's speck is no instance: the union misses it
    outputs = [_truth_as_output(t) for t in ds.targets]
    outputs[0]["scores"][:] = 0.2  # below union_score: case00's instances leave the union (not the AP)
    r, _ = evaluate_detector(_Oracle(outputs), ds, _cfg(), _ctx())
    truth = [s[0].bool() for s in ds.semantic]
    pred = [t["masks"].bool().any(0) for t in ds.targets]
    pred[0] = torch.zeros_like(pred[0])
    tp = sum(int((p & t).sum()) for p, t in zip(pred, truth))
    union = sum(int((p | t).sum()) for p, t in zip(pred, truth))
    assert r["union_iou_global"] == pytest.approx(100 * (tp + 1e-5) / (union + 1e-5))
    assert r["union_iou_global"] < 100.0 and r["segm_AP"] == pytest.approx(100.0)


def test_pr_curves_plot_and_their_area_is_ap(mask_folder, tmp_path):
    ds = load_det_folder(mask_folder)
    outputs = [_truth_as_output(t, shift=3.0) for t in ds.targets]
    for o, t in zip(outputs, ds.targets):  # a false positive per image, scored below the objects
        o["boxes"] = torch.cat([o["boxes"], torch.tensor([[0.0, 40.0, 12.0, 60.0]])])
        o["scores"] = torch.cat([o["scores"], torch.tensor([0.95])])
        o["labels"] = torch.cat([o["labels"], torch.tensor([1])])
        o["masks"] = torch.cat([o["masks"], torch.zeros(1, 1, 64, 64)])
    meter = DetEvalMeter(split_ground_truth(ds), ds.categories)
    for o, i, t in zip(outputs, ds.image_ids, ds.targets):
        meter.update([o], [dict(image_id=i, truth=t["masks"].any(0, keepdim=True).bool())])
    r = meter.compute()
    curve = pr_curve(meter.evals["bbox"]["precision"], 0.5)
    assert 100 * curve.mean() == pytest.approx(r["bbox_AP50"]) and 0 < r["bbox_AP50"] < 100
    path = tmp_path / "pr.png"
    plot_pr_curves(meter.evals, path, "test")
    assert Image.open(path).format == "PNG" and Image.open(path).size[0] > Image.open(path).size[1]
