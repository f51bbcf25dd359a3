"""A trained `mixlab det train` run: evaluate it (`mixlab det eval`) and predict with it
(`mixlab det predict`).

Both read images the same way and run the detector in the same batches (the run's eval batch
size, images in name order), so the ``predictions.json`` that `det predict` writes for a data
folder, scored by pycocotools against its ``ground_truth.json``, gives the figures `det eval
--data` prints for that folder.
"""
from __future__ import annotations

from pathlib import Path

import torch
from ..errors import UsageError

__all__ = ["load_det_run", "evaluate_det_run", "predict_det_run"]


def load_det_run(run_dir, weights: str = "best"):
    """(Mask R-CNN in eval mode with the run's weights, its config)."""
    from ..tasks import load_run_model
    from ..train import rundir as rd

    from . import require_det_packages

    require_det_packages()
    cfg = rd.read_config(run_dir)
    if cfg.get("task") != "detection":
        raise UsageError(f"{run_dir} is a {cfg.get('task', 'classification')} run, not a `mixlab det train` run")
    return load_run_model(run_dir, weights, task="detection")


def _context(cfg: dict, device: str):
    from ..tasks.base import RunContext
    from ..train.distributed import Distributed
    from ..train.settings import pick_device, pick_precision

    dev = pick_device(device, Distributed())
    return RunContext(device=dev, dist=Distributed(), precision=pick_precision(cfg.get("precision", "fp32"), dev))


def _read_data(cfg: dict, data):
    """All images of a data folder, read with the run's data settings."""
    from ..data.classification import default_cache_dir
    from ..tasks.segmentation import image_hw
    from .data import load_det_folder

    d = cfg["data"]
    return load_det_folder(data, size=image_hw(d.get("resize")), min_area=int(d["min_area"]),
                           connectivity=int(d["connectivity"]), cache_dir=default_cache_dir() / "seg")


def run_categories(cfg: dict) -> list[dict]:
    """The COCO categories a run was trained on (label k is the k-th)."""
    return cfg.get("categories") or [dict(id=c + 1, name=f"class{c}") for c in range(int(cfg["num_classes"]))]


def _check_classes(cfg: dict, ds, what: str) -> None:
    ours = [c["id"] for c in run_categories(cfg)]
    theirs = [c["id"] for c in ds.categories]
    if ours != theirs:
        raise UsageError(f"the run detects the categories with ids {ours} but {what} has {theirs}: evaluate on data "
                         "annotated with the run's categories")


def evaluate_det_run(run_dir, data=None, weights: str = "best", device: str = "auto", batch_size: int | None = None,
                     plot: str | None = None, union_score: float | None = None) -> dict:
    """COCOeval (bbox, segm) and union IoU / Dice of a run on its validation split, or on every
    image of ``data``; ``plot``: write the precision-recall curves there; ``union_score``: the
    score an instance needs to join the union (default: the run's ``eval.union_score``)."""
    from ..tasks.detection import evaluate_detector, load_det_data
    from .metrics import plot_pr_curves

    if union_score is not None and not 0.0 <= union_score <= 1.0:
        raise UsageError(f"--union-score must be a score between 0 and 1, got {union_score}")
    model, cfg = load_det_run(run_dir, weights)
    if union_score is not None:
        cfg["eval"]["union_score"] = float(union_score)
    if data:
        part = _read_data(cfg, data)
        split = f"all {len(part)} images of {data}"
    else:
        _, part = load_det_data(cfg, Path(run_dir))
        if part is None:
            raise UsageError(f"{run_dir} was trained without a validation split: pass --data DIR to evaluate")
        split = f"validation split of {cfg['data']['root']} ({len(part)} images)"
    _check_classes(cfg, part, split)
    ctx = _context(cfg, device)
    figures, meter = evaluate_detector(model.to(ctx.device), part, cfg, ctx, batch_size)
    if plot:
        from ..io import atomic_path

        with atomic_path(plot, suffix=".png") as tmp:
            plot_pr_curves(meter.evals, tmp, f"Mask R-CNN on {cfg['model']}, {split} ({weights} weights)")
    return dict(run=str(run_dir), backbone=cfg["model"], weights=weights, split=split, precision=ctx.precision,
                **figures)


@torch.no_grad()
def predict_det_run(run_dir, input_path, out_dir, weights: str = "best", device: str = "auto",
                    score_threshold: float = 0.5, overlays: bool = True) -> dict:
    """Detect in an image, a folder of images, or a data folder (its ground truth is written
    beside the predictions and drawn in the overlays); write :mod:`mixlab.det.predict`'s files."""
    from ..det.data import COCO_FILE, ListLoader
    from ..tasks.detection import split_ground_truth
    from ..train.step import autocast
    from .metrics import detections_to_results
    from .predict import read_images, write_detections

    if not 0.0 <= score_threshold <= 1.0:
        raise UsageError(f"--score-threshold must be between 0 and 1, got {score_threshold}")
    model, cfg = load_det_run(run_dir, weights)
    path = Path(input_path)
    is_data = path.is_dir() and ((path / COCO_FILE).is_file()
                                 or ((path / "images").is_dir() and (path / "masks").is_dir()))
    ground_truth = truth_boxes = None
    if is_data:
        ds = _read_data(cfg, path)
        _check_classes(cfg, ds, str(path))
        names, images, ids = ds.names, ds.images, ds.image_ids
        ground_truth = split_ground_truth(ds)
        truth_boxes = [t["boxes"] for t in ds.targets]
    else:
        names, images = read_images(path)
        ids = list(range(1, len(names) + 1))
    ctx = _context(cfg, device)
    model = model.to(ctx.device).eval()
    batch = int(cfg.get("eval_batch_size") or cfg["batch_size"])
    loader = ListLoader(images, batch_size=batch)
    categories = run_categories(cfg)
    outputs = []
    for (chunk,) in loader:
        with autocast(ctx.device, ctx.precision):
            out = model([im.to(ctx.device).float().div_(255.0) for im in chunk])
        outputs += [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in out]
    mask_threshold = float(cfg["eval"]["mask_threshold"])
    results = [r for o, i in zip(outputs, ids) for r in detections_to_results(o, i, categories, mask_threshold)]
    written = write_detections(out_dir, names, images, ids, outputs, categories, results, score_threshold,
                               ground_truth, truth_boxes, overlays, mask_threshold)
    return dict(run=str(run_dir), input=str(input_path), out=str(out_dir), images=len(names),
                score_threshold=score_threshold, with_truth=ground_truth is not None, **written)
