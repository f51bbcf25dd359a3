"""Semantic segmentation (`mixlab seg train`): images with masks, IoU / Dice as UNeXt's paper.

The split is written into the run directory (``split_train.txt`` / ``split_val.txt``) and
read back by ``--resume`` and ``mixlab seg eval``, so the validation cases stay the same.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from .base import RunContext, Task
from ..train.config import SEG_DEFAULTS

SPLIT_TRAIN, SPLIT_VAL, SPLIT_TEST = "split_train.txt", "split_val.txt", "split_test.txt"
# summary.json keeps these validation figures in percent
_PERCENT = {"iou", "dice", "precision", "recall", "pixel_accuracy"} | {
    f"{k}_{s}" for k in ("iou", "dice", "precision", "recall") for s in ("per_image", "global")}


def image_hw(value) -> tuple[int, int] | None:
    """A config's img_size (an int, [h, w], or null) as (h, w) or None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise UsageError(f"img_size must be N or [H, W], got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def load_seg_splits(cfg: dict, run_dir: Path | None = None, verbose: bool = False):
    """(train, val or None, test or None) :class:`~mixlab.seg.data.SegDataset` of a configuration.

    The split comes from, in order: the run directory's split files (resume, eval), the
    configured split files, a seeded random split (``data.test_split`` of all cases set aside
    first, then ``data.val_split`` of the rest; see :func:`mixlab.seg.data.three_way_split`).
    """
    from ..data.classification import default_cache_dir
    from ..seg.data import load_segmentation_data, read_split_file, three_way_split

    d = cfg["data"]
    if not d.get("root"):
        raise UsageError("no data folder given: pass --data DIR, a folder in the UNeXt layout "
                         "(images/<name>.png with masks/0/<name>.png) or images/ + masks/ with matching names")
    t0 = time.perf_counter()
    ds = load_segmentation_data(d["root"], size=image_hw(cfg.get("img_size")), cache_dir=default_cache_dir() / "seg",
                                mask_threshold=d.get("mask_threshold"), mask_values=d.get("mask_values"))
    seconds = time.perf_counter() - t0
    files = {k: d.get(f"{k}_split_file") for k in ("train", "val", "test")}
    if run_dir is not None and (Path(run_dir) / SPLIT_TRAIN).is_file():
        run_dir = Path(run_dir)
        files = {k: (run_dir / name if (run_dir / name).is_file() else None)
                 for k, name in (("train", SPLIT_TRAIN), ("val", SPLIT_VAL), ("test", SPLIT_TEST))}
        if files["val"] is None:  # trained without a validation split
            train = ds.subset(read_split_file(files["train"]))
            test = ds.subset(read_split_file(files["test"])) if files["test"] else None
            return train, None, test
    if any(files.values()):
        train, val, test = three_way_split(ds, train_file=files["train"], val_file=files["val"],
                                           test_file=files["test"],
                                           test_fraction=0.0 if files["test"] else float(d.get("test_split") or 0),
                                           seed=int(d["split_seed"]))
    else:
        train, val, test = three_way_split(ds, float(d["val_split"]), float(d.get("test_split") or 0),
                                           int(d["split_seed"]))
    if verbose:
        print(f"data: {ds.source} ({seconds:.2f} s): {len(train)} train, {len(val) if val else 0} val"
              + (f", {len(test)} test (held out)" if test else "")
              + f", {ds.num_classes} mask class(es), {ds.image_size[0]}x{ds.image_size[1]} px")
    return train, val, test


def load_seg_data(cfg: dict, run_dir: Path | None = None, verbose: bool = False):
    """(train, val or None) of :func:`load_seg_splits`."""
    train, val, _ = load_seg_splits(cfg, run_dir, verbose)
    return train, val


def seg_normalizer(cfg: dict, device: torch.device):
    """Images in 0..1 -> normalised by the config's mean and std (the UNeXt code's order)."""
    mean = torch.tensor(cfg["data"]["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg["data"]["std"], device=device).view(1, -1, 1, 1)
    return lambda x01: (x01 - mean) / std


class SegmentationTask(Task):
    name, command = "segmentation", "mixlab seg train"
    best_key, best_summary_key = "val_iou", "best_val_iou"
    curves = (("train_iou", "train IoU"), ("val_iou", "val IoU"), ("val_dice", "val Dice"))
    curves_label = "IoU / Dice (%)"
    check_every = 1  # segmentation steps are few and long: read the loss every step
    rate_digits = 1

    defaults = SEG_DEFAULTS

    # --- data and model
    def setup(self, cfg: dict, ctx: RunContext, resume_dir=None) -> None:
        from ..data.loader import DeviceLoader
        from ..seg.losses import build_loss
        from ..train.config import seg_augment

        self.ctx = ctx
        self.train, self.val, self.test = load_seg_splits(cfg, resume_dir, verbose=ctx.dist.is_main)
        num_classes = self.train.num_classes
        if cfg["num_classes"] not in (None, num_classes):
            raise UsageError(f"num_classes is {cfg['num_classes']} but the masks have {num_classes} class(es) "
                             f"(masks/0 .. masks/{num_classes - 1})")
        cfg["num_classes"] = num_classes
        self.size = self.train.image_size
        cfg["img_size"] = cfg["img_size"] or list(self.size)
        self.cfg, self.has_val = cfg, self.val is not None and len(self.val) > 0
        self.loss_fn = self.picker_loss = build_loss(cfg["loss"]["name"])
        self.threshold = float(cfg["threshold"])
        augment, norm = seg_augment(cfg["augment"]), seg_normalizer(cfg, ctx.device)

        def train_prepare(seed: int):
            generator = torch.Generator().manual_seed(seed)

            def prepare(x, m):
                x, m = augment(x, m, generator=generator)
                return norm(x).contiguous(memory_format=ctx.memory_format), m
            return prepare

        self.train_loader = DeviceLoader(self.train.images.to(ctx.device), self.train.masks.to(ctx.device),
                                         batch_size=int(cfg["batch_size"]), shuffle=True,
                                         drop_last=bool(cfg["drop_last"]), seed=int(cfg["seed"]),
                                         rank=ctx.dist.rank, world_size=ctx.dist.world_size, prepare=train_prepare)

    def build_model(self, cfg: dict, for_eval: bool = False) -> nn.Module:
        from ..registry import create_model

        kwargs = dict(cfg.get("model_kwargs") or {})
        if cfg.get("drop_path_rate") is not None and not for_eval:
            kwargs["drop_path_rate"] = cfg["drop_path_rate"]
        return create_model(cfg["model"], num_classes=int(cfg["num_classes"]), img_size=image_hw(cfg["img_size"]),
                            **kwargs)

    def describe_data(self) -> str:
        return Path(str(self.cfg["data"]["root"])).name

    def loss_note(self, cfg: dict) -> str:
        return f"; loss {cfg['loss']['name']}"

    def input_shape(self, cfg: dict) -> tuple:
        return (3, *image_hw(cfg["img_size"]))

    def model_line(self, cfg: dict, params: int, macs: int) -> str:
        h, w = image_hw(cfg["img_size"])
        return f"model: {cfg['model']} ({params:,} params, {macs / 1e9:.3f} GMACs at {h}x{w})"

    def timing_batch(self, batch_size: int):
        x = self.train_loader.tensors[0]
        bs = min(batch_size, len(x))
        return (torch.randn(bs, x.shape[1], *x.shape[2:]),
                (torch.rand(bs, self.train.num_classes, *x.shape[2:]) > 0.5).float())

    def run_summary(self, cfg: dict) -> dict:
        return dict(task="segmentation", data=str(cfg["data"]["root"]), train_images=len(self.train),
                    val_images=len(self.val) if self.has_val else 0, test_images=len(self.test) if self.test else 0,
                    selected_on="val" if self.has_val and cfg["select"] == "best_val" else "none (last weights)")

    def on_new_run(self, run_dir: Path) -> None:
        from ..seg.data import write_split_file

        write_split_file(run_dir / SPLIT_TRAIN, self.train.names)
        for name, part in ((SPLIT_VAL, self.val if self.has_val else None), (SPLIT_TEST, self.test)):
            if part is not None:
                write_split_file(run_dir / name, part.names)
            else:
                (run_dir / name).unlink(missing_ok=True)

    # --- training
    def forward_loss(self, net: nn.Module, x, masks):
        logits = net(x)
        return self.loss_fn(logits.float(), masks.float()), logits

    def train_meter(self):
        return _TrainMeter(self.ctx, self.threshold)

    def evaluate_split(self, model: nn.Module, split) -> dict:
        return evaluate_segmenter(model, split.images, split.masks, self.cfg, self.ctx, self.loss_fn)

    def validate(self, model: nn.Module) -> dict:
        v = self.evaluate_split(model, self.val) if self.has_val else None
        return dict(val_loss=v["loss"] if v else None, val_iou=100 * v["iou"] if v else None,
                    val_dice=100 * v["dice"] if v else None,
                    val_iou_per_image=100 * v["iou_per_image"] if v else None,
                    val_dice_per_image=100 * v["dice_per_image"] if v else None,
                    val_precision=100 * v["precision"] if v else None, val_recall=100 * v["recall"] if v else None)

    def epoch_line(self, row: dict) -> str:
        return (f"train loss {row['train_loss']:.4f} IoU {row['train_iou']:.2f}"
                + (f" | val loss {row['val_loss']:.4f} IoU {row['val_iou']:.2f} Dice {row['val_dice']:.2f}"
                   if row["val_iou"] is not None else ""))

    def finish(self, model: nn.Module, which: str, best_val: float, best_epoch: int, run_dir) -> dict:
        from ..train.rundir import LAST

        out = {}
        if self.has_val:
            v = self.evaluate_split(model, self.val)
            self.ctx.say(_figures_line(f"val ({which}, {len(self.val)} images)", v) + f"  [{run_dir}]")
            out.update(evaluated=which, val=_percent(v))
        else:
            self.ctx.say(f"trained without a validation split; weights in {Path(run_dir) / LAST}")
        if self.test:
            t = self.evaluate_split(model, self.test)
            self.ctx.say(_figures_line(f"test, held out: never trained on nor used to select ({len(self.test)} images)",
                                       t))
            out.update(test=_percent(t))
        return out


def _percent(figures: dict) -> dict:
    return {k: (100 * x if k in _PERCENT else x) for k, x in figures.items()}


def _figures_line(label: str, v: dict) -> str:
    return (f"{label}: IoU {100 * v['iou']:.2f}  Dice {100 * v['dice']:.2f}  "
            f"(per image: IoU {100 * v['iou_per_image']:.2f} Dice {100 * v['dice_per_image']:.2f}; "
            f"precision {100 * v['precision']:.2f} recall {100 * v['recall']:.2f})")


def evaluate_segmenter(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, cfg: dict, ctx: RunContext,
                      loss_fn=None, keep_per_image: bool = False) -> dict:
    """IoU, Dice, precision, recall (see :mod:`mixlab.seg.metrics`) and the loss over a split;
    ``iou``/``dice`` are the paper's figures: batch-pooled over consecutive batches of
    ``eval_batch_size`` (default: the training batch size, as the paper's validation loader).
    Every rank evaluates the whole split: it is small."""
    from ..data.loader import DeviceLoader
    from ..train.loop import evaluate

    norm, device, mf = seg_normalizer(cfg, ctx.device), ctx.device, ctx.memory_format
    batch = int(cfg.get("eval_batch_size") or cfg["batch_size"])
    loader = DeviceLoader(images, masks, batch_size=batch, prepare=lambda seed: (
        lambda x, m: (norm(x.to(device).float().div_(255.0)).contiguous(memory_format=mf), m.to(device))))
    meter = SegEvalMeter(batch, float(cfg["threshold"]), loss_fn, keep_per_image)
    return evaluate(model, loader, meter, ctx)


class _TrainMeter:
    """Loss and the paper's training IoU (each batch's pixels pooled, averaged over batches
    by size), read every step; under DDP every rank decides on the loss together, or one
    would wait forever in the next all-reduce."""

    def __init__(self, ctx: RunContext, threshold: float):
        self.ctx, self.threshold = ctx, threshold
        self.loss_sum = self.iou_sum = 0.0
        self.seen = 0
        self.last_loss = 0.0

    def update(self, loss, logits, masks) -> None:
        from ..seg.metrics import confusion_counts, scores_from_counts

        dist = self.ctx.dist
        if dist.enabled:
            loss = dist.all_reduce_(loss.detach().clone().float()) / dist.world_size
        self.last_loss = float(loss)
        n = logits.shape[0]
        batch_iou = float(scores_from_counts(confusion_counts(logits, masks, self.threshold).sum(0))["iou"])
        self.loss_sum += self.last_loss * n
        self.iou_sum += batch_iou * n
        self.seen += n

    def running_loss(self) -> float:
        return self.loss_sum / self.seen

    def postfix(self) -> dict:
        return dict(iou=f"{100 * self.iou_sum / self.seen:.1f}")

    def compute(self) -> tuple[dict, float]:
        totals = torch.tensor([self.loss_sum, self.iou_sum, float(self.seen)], dtype=torch.float64,
                              device=self.ctx.device)
        self.ctx.dist.all_reduce_(totals)
        return dict(train_loss=float(totals[0] / totals[2]), train_iou=100.0 * float(totals[1] / totals[2])), \
            float(totals[2])


class SegEvalMeter:
    """:class:`~mixlab.seg.metrics.SegMetrics` plus the loss, for :func:`mixlab.train.loop.evaluate`."""

    def __init__(self, batch: int, threshold: float, loss_fn=None, keep_per_image: bool = False):
        from ..seg.metrics import SegMetrics

        self.metrics = SegMetrics(official_batch_size=batch, threshold=threshold)
        self.loss_fn, self.keep_per_image = loss_fn, keep_per_image
        self.loss_sum, self.n = 0.0, 0

    def update(self, logits, masks) -> None:
        logits = logits.float()
        if self.loss_fn is not None:
            self.loss_sum += float(self.loss_fn(logits, masks.float())) * logits.shape[0]
        self.metrics.update(logits, masks)
        self.n += logits.shape[0]

    def compute(self) -> dict:
        out = self.metrics.compute()
        out["loss"] = self.loss_sum / max(self.n, 1) if self.loss_fn is not None else None
        if self.keep_per_image:
            out["per_image"] = {k: v.tolist() for k, v in self.metrics.per_image().items()}
        return out
