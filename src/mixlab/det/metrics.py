"""Detection and instance segmentation figures: pycocotools' COCOeval, and the union of the
predicted instances scored as a semantic mask.

* ``bbox_*`` / ``segm_*``: COCOeval's 12 figures for boxes and masks, in percent: AP (IoU
  0.50:0.95), AP50, AP75, AP small / medium / large, AR at 1 / 10 / 100 detections, AR small /
  medium / large. A figure COCOeval leaves undefined (no ground truth of that size) is None.
  Detections are given as torchvision's post-processing returns them (every box above
  ``detector.box_score_thresh``, up to ``box_detections_per_img``); a mask is the instance's
  pasted probabilities > 0.5, encoded as COCO RLE.
* ``union_*``: the union of the predicted masks whose score is at least ``union_score`` (0.5
  unless set) against the semantic mask, with :mod:`mixlab.seg.metrics`' formulas:
  ``union_iou`` / ``union_dice`` are the UNeXt paper's figure (pixels pooled per batch of
  ``union_batch`` images, batches averaged by size: 8, the batch of the ``unext-busi`` recipe,
  so the figure compares with `mixlab seg eval`'s on the same split), ``*_per_image`` the mean
  over images, ``*_global`` all pixels pooled.
* the precision-recall curves COCOeval accumulates (101 recall points, all areas, 100
  detections, mean over the categories) at IoU 0.5 and 0.75: :func:`plot_pr_curves`.
"""
from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import torch
from ..errors import UsageError

__all__ = ["COCO_STATS", "coco_ground_truth", "detections_to_results", "coco_evaluate", "union_counts",
           "DetEvalMeter", "plot_pr_curves"]

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_ground_truth(images: list[dict], annotations: list[list[dict]], categories: list[dict]) -> dict:
    """A COCO instances dict (``images``, ``annotations``, ``categories``) for COCOeval.

    ``images``: ``{"id", "width", "height", "file_name"}`` per image; ``annotations``: each
    image's COCO annotations. Annotation ids are renumbered 1..N (COCOeval needs them unique
    and non-zero)."""
    anns, k = [], 0
    for per_image in annotations:
        for a in per_image:
            k += 1
            anns.append(dict(a, id=k))
    return dict(images=list(images), annotations=anns, categories=list(categories))


def detections_to_results(output: dict, image_id: int, categories: list[dict],
                          mask_threshold: float = 0.5) -> list[dict]:
    """COCO results (``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``,
    ``segmentation`` RLE) of one image's torchvision Mask R-CNN output."""
    from .data import encode_mask

    boxes = output["boxes"].detach().float().cpu()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    masks = (output["masks"].detach().float().cpu()[:, 0] > mask_threshold).numpy() if "masks" in output else None
    out = []
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        r = dict(image_id=int(image_id), category_id=int(categories[labels[i] - 1]["id"]),
                 bbox=[round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)], score=round(scores[i], 6))
        if masks is not None:
            r["segmentation"] = encode_mask(masks[i])
        out.append(r)
    return out


def _coco(gt: dict):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
    return coco


def coco_evaluate(gt: dict, results: list[dict], iou_type: str) -> dict:
    """COCOeval of ``results`` against ``gt`` (dicts as above) for ``iou_type`` bbox or segm.

    Returns ``stats`` (COCO_STATS -> percent or None), ``precision`` (COCOeval's
    [IoU, recall, category, area, max dets] array, or None without detections) and ``text``
    (COCOeval's 12 summary lines). For ``segm`` each result's ``bbox`` is dropped first, as
    detectron2 does: pycocotools would otherwise take the box's area as the mask's."""
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise UsageError(f"iou_type must be bbox or segm, got {iou_type!r}")
    coco_gt = _coco(gt)
    has_gt = any(not a.get("iscrowd", 0) for a in gt["annotations"])
    if iou_type == "segm":
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        if results and "segmentation" not in results[0]:
            raise UsageError("segm evaluation needs results with a segmentation")
    else:
        results = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    if not results:  # pycocotools cannot load an empty result list: nothing detected scores 0
        stats = {k: (0.0 if has_gt else None) for k in COCO_STATS}
        return dict(stats=stats, precision=None, text="no detections")
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: (None if v < 0 else 100.0 * float(v)) for k, v in zip(COCO_STATS, ev.stats)}
    summary = "".join(line + "\n" for line in text.getvalue().splitlines() if line.lstrip().startswith("Average"))
    return dict(stats=stats, precision=np.asarray(ev.eval["precision"]), text=summary)


def union_counts(output: dict, truth: torch.Tensor, score_threshold: float = 0.5,
                 mask_threshold: float = 0.5) -> torch.Tensor:
    """(4,) pixel counts tp, fp, fn, tn of the per-class union of the predicted masks scoring at
    least ``score_threshold`` against ``truth`` (K, H, W), over all classes and pixels."""
    k, h, w = truth.shape
    pred = torch.zeros(k, h, w, dtype=torch.bool)
    keep = output["scores"].detach().float().cpu() >= score_threshold
    if keep.any():
        masks = output["masks"].detach().float().cpu()[keep, 0] > mask_threshold
        labels = output["labels"].detach().cpu()[keep]
        for c in labels.unique().tolist():
            pred[c - 1] |= masks[labels == c].any(0)
    t = truth.cpu().bool()
    tp = int((pred & t).sum())
    fp = int((pred & ~t).sum())
    fn = int((~pred & t).sum())
    return torch.tensor([tp, fp, fn, pred.numel() - tp - fp - fn], dtype=torch.long)


def semantic_truth(target: dict, semantic: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """The (K, H, W) class masks of an image: the data's own, or the union of its instances."""
    if semantic is not None:
        return semantic
    masks, labels = target["masks"].cpu().bool(), target["labels"].cpu()
    out = torch.zeros(num_classes, *masks.shape[-2:], dtype=torch.bool)
    for c in labels.unique().tolist():
        out[c - 1] = masks[labels == c].any(0)
    return out


class DetEvalMeter:
    """Collects an evaluation's detections (for :func:`mixlab.train.loop.evaluate`): ``update``
    takes the model's outputs and the batch's targets (each with ``image_id`` and ``truth``,
    the semantic mask); ``compute`` runs COCOeval and the union scores."""

    def __init__(self, gt: dict, categories: list[dict], union_score: float = 0.5, union_batch: int = 8,
                 mask_threshold: float = 0.5):
        self.gt, self.categories = gt, categories
        self.union_score, self.union_batch, self.mask_threshold = union_score, union_batch, mask_threshold
        self.results: list[dict] = []
        self.counts: list[torch.Tensor] = []
        self.evals: dict = {}

    def update(self, outputs: list[dict], targets: list[dict]) -> None:
        for out, t in zip(outputs, targets):
            self.results += detections_to_results(out, int(t["image_id"]), self.categories, self.mask_threshold)
            self.counts.append(union_counts(out, t["truth"], self.union_score, self.mask_threshold))

    def compute(self) -> dict:
        from ..seg.metrics import official_iou_dice, scores_from_counts

        if not self.counts:
            raise UsageError("no images were evaluated")
        out: dict = {}
        for iou_type in ("bbox", "segm"):
            r = coco_evaluate(self.gt, self.results, iou_type)
            self.evals[iou_type] = r
            out.update({f"{iou_type}_{k}": v for k, v in r["stats"].items()})
        counts = torch.stack(self.counts)
        iou, dice = official_iou_dice(counts, self.union_batch)
        per_image = {k: float(v.mean()) for k, v in scores_from_counts(counts).items()}
        pooled = {k: float(v) for k, v in scores_from_counts(counts.sum(0)).items()}
        out.update(union_iou=100 * iou, union_dice=100 * dice, union_iou_per_image=100 * per_image["iou"],
                   union_dice_per_image=100 * per_image["dice"], union_iou_global=100 * pooled["iou"],
                   union_dice_global=100 * pooled["dice"], union_precision=100 * pooled["precision"],
                   union_recall=100 * pooled["recall"], union_score=self.union_score, union_batch=self.union_batch,
                   n_images=len(self.counts), n_detections=len(self.results))
        return out


def pr_curve(precision: np.ndarray, iou: float) -> np.ndarray | None:
    """Precision at COCOeval's 101 recall points, IoU ``iou`` (0.5 ... 0.95), all areas, 100
    detections, averaged over the categories that have ground truth; None without any."""
    t = int(round((iou - 0.5) / 0.05))
    p = precision[t, :, :, 0, -1]  # (recall, category)
    valid = (p > -1).all(0)
    if not valid.any():
        return None
    return p[:, valid].mean(1)


def plot_pr_curves(evals: dict, path, title: str = "") -> None:
    """One panel per iou type (bbox, segm): precision against recall at IoU 0.5 and 0.75, the
    area under each (COCO's AP at that IoU) in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recall = np.linspace(0, 1, 101)
    fig, axes = plt.subplots(1, len(evals), figsize=(5 * len(evals), 4.2), squeeze=False)
    for ax, (iou_type, r) in zip(axes[0], evals.items()):
        for iou, style in ((0.5, "-"), (0.75, "--")):
            curve = pr_curve(r["precision"], iou) if r.get("precision") is not None else None
            if curve is None:
                ax.plot([], [], style, label=f"IoU {iou:g}: no detections")
                continue
            ax.plot(recall, curve, style, label=f"IoU {iou:g} (AP {100 * curve.mean():.1f})")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
               title=f"{'boxes' if iou_type == 'bbox' else 'masks'} ({iou_type})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
