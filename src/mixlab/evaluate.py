"""Evaluating trained runs: what `mixlab eval`, `mixlab seg eval` and `mixlab seg predict` compute.

A classification run: accuracy, per-class accuracy and the confusion matrix on its test or
validation split. A segmentation run: IoU, Dice, precision and recall on its validation
split or any data folder, and predicted masks (with scores where ground truth is known) for
any images.
"""
from __future__ import annotations

from pathlib import Path

import torch

# Run files, model building and the evaluation loops belong to the tasks and the training
# package: every name this module takes from them is imported here, in this one block.
from .tasks import load_run_model
from .tasks.base import RunContext
from .tasks.classification import evaluate_classifier
from .tasks.segmentation import evaluate_segmenter, image_hw, load_seg_splits
from .train.distributed import Distributed
from .train.settings import pick_channels_last, pick_device, pick_precision

from .errors import UsageError

__all__ = ["evaluate_run", "library_metrics", "load_seg_run", "evaluate_seg_run", "predict_seg_run"]


def _on_device(model, device: str, cfg: dict, dist: Distributed):
    """(model moved to the device in the run's memory format, device, autocast precision, memory format)."""
    dev = pick_device(device, dist)
    precision = pick_precision(cfg.get("precision", "auto"), dev)
    mf = torch.channels_last if pick_channels_last(cfg.get("channels_last", "auto"), model) else torch.contiguous_format
    return model.to(dev, memory_format=mf), dev, precision, mf


# ----------------------------------------------------------------------------- classification

def evaluate_run(run_dir, weights="best", data_root=None, split="test", device="auto", batch_size=500,
                 return_predictions: bool = False) -> dict:
    """Accuracy, loss, top-5 accuracy, macro-F1, per-class accuracy and the confusion matrix of a
    `mixlab train` run on a split (``return_predictions``: also each image's top-1 class index,
    in the split's order)."""
    from .data.classification import load_classification_data

    model, cfg = load_run_model(run_dir, weights)
    if data_root:
        cfg["data"]["root"] = data_root
    data = load_classification_data(cfg)
    if data.num_classes != cfg["num_classes"]:
        raise UsageError(f"the run was trained on {cfg['num_classes']} classes but the data has {data.num_classes}")
    part = data.test if split == "test" else data.val
    if part is None:
        raise UsageError("the run was trained without a validation split (val_split 0): use --split test")
    dist = Distributed()
    model, dev, precision, mf = _on_device(model, device, cfg, dist)
    ctx = RunContext(device=dev, dist=dist, precision=precision, memory_format=mf)
    # the logits of the loop's own evaluation, batch by batch, for the library metrics
    logits: list = []
    hook = model.register_forward_hook(lambda module, args, output: logits.append(output.detach().float().cpu()))
    try:
        r = evaluate_classifier(model, part.images, part.labels, cfg["num_classes"], cfg["data"]["mean"],
                                cfg["data"]["std"], batch_size, ctx)
    finally:
        hook.remove()
    conf = r["confusion"]
    # a class without images in the split has no accuracy (None, shown as n/a), not 0%
    per_class = {c: 100.0 * float(conf[i, i]) / int(conf[i].sum()) if int(conf[i].sum()) else None
                 for i, c in enumerate(data.classes)}
    all_logits = torch.cat(logits) if logits else torch.zeros(0, cfg["num_classes"])
    out = dict(run=str(run_dir), model=cfg["model"], weights=weights, split=split, n=r["n"], accuracy=r["acc"],
               loss=r["loss"], **library_metrics(all_logits, part.labels), per_class_accuracy=per_class,
               classes=data.classes, confusion=conf.tolist())
    if return_predictions:
        out["predictions"] = all_logits.argmax(1).tolist()
    return out


def library_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-5 accuracy and macro-F1 (in %) from torchmetrics; top-5 is None with 5 classes or fewer
    (every image's class is then among its top 5)."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    k = logits.shape[1]
    labels = labels.to(logits.device)
    top5 = (100.0 * float(multiclass_accuracy(logits, labels, num_classes=k, top_k=5, average="micro"))
            if k > 5 else None)
    f1 = 100.0 * float(multiclass_f1_score(logits, labels, num_classes=k, average="macro"))
    return dict(top5_accuracy=top5, macro_f1=f1)


# ----------------------------------------------------------------------------- segmentation

def load_seg_run(run_dir, weights: str = "best"):
    """(model in eval mode with the run's weights, config) of a `mixlab seg train` run."""
    return load_run_model(run_dir, weights, task="segmentation")


def evaluate_seg_run(run_dir, data=None, weights="best", device="auto", batch_size=None,
                     keep_per_image=False, split_name: str = "val") -> dict:
    """IoU, Dice (batch-pooled as the paper's code, per image, over all pixels), precision, recall,
    pixel accuracy and loss of a `mixlab seg train` run: on its validation split (the one that
    selected the weights), its held-out test split (``split_name="test"``), or on every image of
    the data folder ``data``."""
    from .seg.data import load_segmentation_data
    from .seg.losses import build_loss

    model, cfg = load_seg_run(run_dir, weights)
    if batch_size:
        cfg["eval_batch_size"] = batch_size
    if data:
        from .data.classification import default_cache_dir

        part = load_segmentation_data(data, size=image_hw(cfg.get("img_size")), cache_dir=default_cache_dir() / "seg",
                                      mask_threshold=cfg["data"].get("mask_threshold"),
                                      mask_values=cfg["data"].get("mask_values"))
        split = f"all {len(part)} images of {data}"
    elif split_name == "test":
        _, _, part = load_seg_splits(cfg, run_dir)
        if part is None:
            raise UsageError(f"{run_dir} was trained without a test split (mixlab seg train --test-split): evaluate "
                             "--split val, or pass --data DIR")
        split = (f"held-out test split of {cfg['data']['root']} ({len(part)} images, never trained on nor used to "
                 "select the weights)")
    else:
        _, part, _ = load_seg_splits(cfg, run_dir)
        if part is None:
            raise UsageError(f"{run_dir} was trained without a validation split: pass --data DIR to evaluate")
        split = f"validation split of {cfg['data']['root']} ({len(part)} images, the split that selected the weights)"
    if part.num_classes != cfg["num_classes"]:
        raise UsageError(f"the run predicts {cfg['num_classes']} mask class(es) but the {split} has "
                         f"{part.num_classes}")
    model, dev, precision, mf = _on_device(model, device, cfg, Distributed())
    ctx = RunContext(device=dev, dist=Distributed(), precision=precision, memory_format=mf)
    r = evaluate_segmenter(model, part.images, part.masks, cfg, ctx, build_loss(cfg["loss"]["name"]),
                           keep_per_image=keep_per_image)
    if keep_per_image:
        r["per_image"]["name"] = list(part.names)
    return dict(run=str(run_dir), model=cfg["model"], weights=weights, split=split, autocast=precision,
                threshold=float(cfg["threshold"]), **r)


def predict_seg_run(run_dir, input_path, out_dir, weights="best", threshold=None, device="auto",
                    overlays=True) -> dict:
    """Predict masks for an image, a folder of images or a data folder with a `mixlab seg train`
    run; write ``OUT/masks/<k>/<name>.png`` (and ``OUT/overlays/``). Where ground truth is found,
    the result has its IoU and Dice too (percent, at the images' own size)."""
    from .seg.predict import predict_images, read_predict_inputs, truth_scores, write_predictions

    model, cfg = load_seg_run(run_dir, weights)
    threshold = float(threshold if threshold is not None else cfg.get("threshold", 0.5))
    if not 0.0 < threshold < 1.0:
        raise UsageError(f"--threshold must be between 0 and 1, got {threshold}")
    names, images, truths = read_predict_inputs(input_path, cfg["data"].get("mask_threshold"),
                                                cfg["data"].get("mask_values"))
    dev = pick_device(device, Distributed())
    k = int(cfg["num_classes"])
    mismatched = [n for n, t in zip(names, truths) if t is not None and t.shape[0] != k]
    if mismatched:
        raise UsageError(f"the run predicts {k} mask class(es) but the ground truth of {mismatched[0]!r}"
                         f"{f' (and {len(mismatched) - 1} more)' if len(mismatched) > 1 else ''} has "
                         f"{truths[names.index(mismatched[0])].shape[0]}; predict from an images folder without masks, "
                         "or from data with the run's mask classes (nothing was written)")
    size = image_hw(cfg.get("img_size"))
    probs = predict_images(model.to(dev), images, size=size, batch_size=int(cfg["batch_size"]),
                           mean=cfg["data"]["mean"], std=cfg["data"]["std"], device=dev)
    written = write_predictions(out_dir, names, images, probs, truths, threshold, overlays=overlays)
    result = dict(run=str(run_dir), input=str(input_path), out=str(out_dir), images=len(names),
                  threshold=threshold, masks=len(written["masks"]), overlays=len(written["overlays"]))
    result.update(truth_scores(probs, truths, threshold))
    return result
