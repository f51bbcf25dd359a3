"""Instance segmentation (`mixlab det train`): Mask R-CNN on any features_only backbone,
scored with pycocotools' COCOeval (boxes and masks) and as a semantic mask (the union of the
predicted instances, IoU / Dice as `mixlab seg`).

The model is torchvision's MaskRCNN on :class:`mixlab.det.backbone.BackboneFPN`; it computes
its losses inside its forward in training mode, so :meth:`DetectionTask.forward_loss` calls it
with (images, targets) and sums the loss dict. A batch is a list of images and a list of
target dicts (:class:`mixlab.det.data.ListLoader`). The split is written into the run
directory (``split_train.txt`` / ``split_val.txt``) as `mixlab seg` writes it, and drawn the
same way, so that the same data folder gives both commands the same validation images.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from ..det.model import DETECTOR_DEFAULTS
from .base import RunContext, Task
from .segmentation import SPLIT_TRAIN, SPLIT_VAL
from ..errors import MissingFileError, UsageError
from ..train.config import run_settings

DET_DEFAULTS: dict = {
    "task": "detection",
    "model": None,  # the backbone: a mixlab model (`mixlab models`) or any timm model with features_only
    "model_kwargs": {},  # the backbone's architecture arguments
    "num_classes": None,  # object classes, from the data (the background class is added)
    "categories": None,  # the data's COCO categories ({id, name}; label k is the k-th), from the data
    "init": None,  # backbone weights: a weights file, or a mixlab run directory (its best weights)
    "seed": 0,
    "epochs": 12,
    "batch_size": 4,
    "eval_batch_size": None,  # default: batch_size
    "drop_last": False,
    "data": {"root": None, "val_split": 0.2, "split_seed": 41, "train_split_file": None, "val_split_file": None,
             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
             "resize": None,  # [H, W]: resize a mask folder's images on reading (null: keep their size)
             "min_area": 0,  # mask folders: connected components under this many pixels are not instances
             "connectivity": 8},  # mask folders: 8 (corners join) or 4
    "detector": copy.deepcopy(DETECTOR_DEFAULTS),
    # union_score: predicted instances scoring at least this form the union scored as a mask;
    # union_batch: images pooled per batch in the paper's IoU/Dice (8: the unext-busi recipe's)
    "eval": {"union_score": 0.5, "union_batch": 8, "mask_threshold": 0.5},
    "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 1e-4, "momentum": 0.9, "nesterov": False,
                  "betas": [0.9, 0.999], "eps": 1e-8, "fused": "auto"},
    "schedule": {"name": "cosine", "warmup_epochs": 0.0, "min_lr": 0.0, "per_epoch": False},
    "augment": {"hflip": 0.5, "vflip": 0.0, "rot90": False, "brightness": 0.0, "contrast": 0.0},
    # select: best_val (highest validation mask AP) | last; freeze_backbone is not for detection
    # (detector.trainable_stages sets what trains); init is listed above. fp32: under bf16
    # autocast torchvision decodes boxes in bf16 (8 significant bits: steps of 2 pixels at
    # coordinates 256-511), which costs the box and mask accuracy AP75 measures; channels_last
    # off: the detector's transform builds its batch in NCHW, channels_last would convert every map
    **run_settings(log_every=10, omit=("init",), precision="fp32", channels_last=False),
}

_LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
_VAL_KEYS = ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75", "union_iou", "union_dice")


def check_config(cfg: dict) -> None:
    """Detection-specific checks of a resolved configuration (ValueError naming the key)."""
    import timm

    from ..det.augment import DetAugment
    from ..det.model import check_detector_options
    from ..registry import _unknown, list_models

    name = cfg["model"]
    if name not in list_models() and not timm.is_model(name):
        raise _unknown(name)
    check_detector_options(cfg["detector"])
    DetAugment(**cfg["augment"])
    e = cfg["eval"]
    if not isinstance(e["union_score"], (int, float)) or not 0 <= e["union_score"] <= 1:
        raise UsageError(f"eval.union_score must be a score between 0 and 1, got {e['union_score']!r}")
    if not isinstance(e["union_batch"], int) or e["union_batch"] < 1:
        raise UsageError(f"eval.union_batch must be a positive integer, got {e['union_batch']!r}")
    if not isinstance(e["mask_threshold"], (int, float)) or not 0 < e["mask_threshold"] < 1:
        raise UsageError(f"eval.mask_threshold must be between 0 and 1, got {e['mask_threshold']!r}")
    d = cfg["data"]
    if d["connectivity"] not in (4, 8):
        raise UsageError(f"data.connectivity must be 4 or 8, got {d['connectivity']!r}")
    if not isinstance(d["min_area"], int) or d["min_area"] < 0:
        raise UsageError(f"data.min_area must be a number of pixels >= 0, got {d['min_area']!r}")


def load_det_data(cfg: dict, run_dir: Path | None = None, verbose: bool = False):
    """(train, val or None) :class:`~mixlab.det.data.DetDataset` for a configuration; the split
    as :func:`mixlab.tasks.segmentation.load_seg_data` draws it (run directory's split files,
    then the configured ones, then a seeded split of ``data.val_split``)."""
    from ..data.classification import default_cache_dir
    from ..det import require_det_packages
    from ..det.data import load_det_folder
    from ..seg.data import read_split_file, split_dataset
    from .segmentation import image_hw

    require_det_packages()
    d = cfg["data"]
    if not d.get("root"):
        raise UsageError("no data folder given: pass --data DIR, a COCO folder (annotations.json + images/) or a mask "
                         "folder (images/ with masks/0/, e.g. ../shared/data/busi)")
    t0 = time.perf_counter()
    ds = load_det_folder(d["root"], size=image_hw(d.get("resize")), min_area=int(d["min_area"]),
                         connectivity=int(d["connectivity"]), cache_dir=default_cache_dir() / "seg")
    seconds = time.perf_counter() - t0
    train_file, val_file = d.get("train_split_file"), d.get("val_split_file")
    if run_dir is not None and (Path(run_dir) / SPLIT_TRAIN).is_file():
        train_file = Path(run_dir) / SPLIT_TRAIN
        val_file = Path(run_dir) / SPLIT_VAL if (Path(run_dir) / SPLIT_VAL).is_file() else None
        if val_file is None:
            return ds.subset(read_split_file(train_file)), None
    if train_file or val_file:
        train, val = split_dataset(ds, train_file=train_file, val_file=val_file)
    elif float(d["val_split"]) > 0:
        train, val = split_dataset(ds, float(d["val_split"]), int(d["split_seed"]))
    else:
        train, val = ds, None
    if verbose:
        notes = ds.notes
        dropped = (f"; {notes['dropped_components']} component(s) under {notes['min_area']} px left out"
                   if notes.get("dropped_components") else "")
        degenerate = (f"; {notes['degenerate_annotations']} annotation(s) without area not trained on"
                      if notes.get("degenerate_annotations") else "")
        print(f"data: {ds.source} ({seconds:.2f} s): {len(train)} train, {len(val) if val else 0} val images; "
              f"{ds.num_instances} instance(s) of {ds.num_classes} class(es), {ds.empty_images} image(s) without "
              f"any{dropped}{degenerate}")
    return train, val


def eval_targets(ds) -> list[dict]:
    """Per image: its COCO id and the semantic mask the union of predictions is scored against."""
    from ..det.metrics import semantic_truth

    sem = ds.semantic or [None] * len(ds)
    return [dict(image_id=i, truth=semantic_truth(t, s, ds.num_classes))
            for i, t, s in zip(ds.image_ids, ds.targets, sem)]


def split_ground_truth(ds) -> dict:
    from ..det.metrics import coco_ground_truth

    images = [dict(id=i, width=int(im.shape[-1]), height=int(im.shape[-2]), file_name=n)
              for i, im, n in zip(ds.image_ids, ds.images, ds.names)]
    return coco_ground_truth(images, ds.annotations, ds.categories)


class _Timed(nn.Module):
    """The model, timing its forward passes (inference latency per image)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.seconds, self.images = model, 0.0, 0

    def forward(self, images):
        sync = images[0].device.type == "cuda"
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self.model(images)
        if sync:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.images += len(images)
        return out


def evaluate_detector(model: nn.Module, ds, cfg: dict, ctx: RunContext, batch_size: int | None = None):
    """(figures, meter) of ``model`` on ``ds``: COCOeval's bbox / segm figures, the union
    IoU / Dice, ``infer_ms_per_image`` (forward passes only, at this batch size). Every rank
    evaluates the whole split."""
    from ..det.data import ListLoader
    from ..det.metrics import DetEvalMeter
    from ..train.loop import evaluate

    device = ctx.device
    batch = int(batch_size or cfg.get("eval_batch_size") or cfg["batch_size"])
    loader = ListLoader(ds.images, eval_targets(ds), batch_size=batch, prepare=lambda seed: (
        lambda ims, ts: ([im.to(device).float().div_(255.0) for im in ims], ts)))
    e = cfg["eval"]
    meter = DetEvalMeter(split_ground_truth(ds), ds.categories, float(e["union_score"]), int(e["union_batch"]),
                         float(e["mask_threshold"]))
    timed = _Timed(model)
    figures = evaluate(timed, loader, meter, ctx)
    figures.update(infer_ms_per_image=1000 * timed.seconds / max(timed.images, 1), infer_batch=batch)
    return figures, meter


def load_init_weights(model: nn.Module, init: str, backbone: str) -> int:
    """Load ``--init`` (a weights file or a mixlab run directory) into the detector's backbone."""
    from ..det.backbone import load_backbone_weights
    from ..io import read_state_dict
    from ..train import rundir as rd

    path = Path(init)
    if path.is_dir():
        run_model = rd.read_config(path)["model"]
        if run_model != backbone:
            raise UsageError(f"--init {path} is a run of {run_model}, but the backbone is {backbone}")
        path = rd.weights_path(path, "best")
    elif not path.is_file():
        raise MissingFileError(f"--init {init}: no such weights file or run directory")
    return load_backbone_weights(model.backbone, read_state_dict(path), str(init))


class DetectionTask(Task):
    name, command = "detection", "mixlab det train"
    best_key, best_summary_key = "val_segm_AP", "best_val_segm_AP"
    curves = (("val_bbox_AP", "val box AP"), ("val_segm_AP", "val mask AP"), ("val_segm_AP50", "val mask AP50"),
              ("val_union_iou", "val union IoU"))
    curves_label = "AP / IoU (%)"
    check_every = 1  # few, long steps
    rate_digits = 1
    init_in_loop = False  # --init is the backbone's weights: build_model loads them
    model_task = None  # the model is a backbone: any mixlab or timm classifier (validate_config checks it)
    config_kind = None  # its settings are its own: validate_config checks them all

    defaults = DET_DEFAULTS

    def validate_config(self, cfg: dict) -> None:
        """A detection config's checks: the settings every task shares, then the detector's own
        (a detection config is not a classification one: no spec-based check covers it)."""
        from ..errors import as_usage_error
        from ..train.config import OPTIMIZERS, SCHEDULES

        if not cfg.get("model"):
            raise UsageError("no backbone given: pass --backbone NAME (see `mixlab models`) or set `model:` in the recipe")
        if cfg["optimizer"]["name"] not in OPTIMIZERS:
            raise UsageError(f"optimizer.name must be one of {', '.join(OPTIMIZERS)}, got {cfg['optimizer']['name']!r}")
        if cfg["schedule"]["name"] not in SCHEDULES:
            raise UsageError(f"schedule.name must be one of {', '.join(SCHEDULES)}, got {cfg['schedule']['name']!r}")
        for key in ("epochs", "batch_size"):
            if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
                raise UsageError(f"{key} must be a whole number, 1 or more, got {cfg[key]!r}")
        for key in ("lr", "weight_decay"):
            v = cfg["optimizer"][key]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (key == "lr" and v == 0):
                raise UsageError(f"optimizer.{key} must be a number {'> 0' if key == 'lr' else '>= 0'}, got {v!r}")
        if cfg["select"] not in ("best_val", "last"):
            raise UsageError(f"select must be 'best_val' or 'last', got {cfg['select']!r}")
        if float(cfg["schedule"].get("min_lr") or 0) > float(cfg["optimizer"]["lr"]):
            raise UsageError(f"schedule.min_lr ({cfg['schedule']['min_lr']}) is above optimizer.lr "
                             f"({cfg['optimizer']['lr']}); min_lr is the rate the schedule ends at")
        try:
            check_config(cfg)
        except ValueError as e:
            raise as_usage_error(e) from None

    # --- data and model
    def setup(self, cfg: dict, ctx: RunContext, resume_dir=None) -> None:
        from ..det.augment import DetAugment
        from ..det.data import ListLoader

        self.ctx, self.resuming = ctx, resume_dir is not None
        self.train, self.val = load_det_data(cfg, resume_dir, verbose=ctx.dist.is_main)
        k = self.train.num_classes
        if cfg["num_classes"] not in (None, k):
            raise UsageError(f"num_classes is {cfg['num_classes']} but the data has {k} class(es)")
        cfg["num_classes"] = k
        cats = [dict(id=int(c["id"]), name=str(c.get("name", c["id"]))) for c in self.train.categories]
        if cfg["categories"] not in (None, cats):
            raise UsageError(f"the run's categories {cfg['categories']} differ from the data's {cats}")
        cfg["categories"] = cats
        self.cfg, self.has_val = cfg, self.val is not None and len(self.val) > 0
        augment = DetAugment(**cfg["augment"])
        train = self.train.to(ctx.device)

        def train_prepare(seed: int):
            generator = torch.Generator().manual_seed(seed)

            def prepare(images, targets):
                return augment([im.float().div_(255.0) for im in images], targets, generator=generator)
            return prepare

        self.train_loader = ListLoader(train.images, train.targets, batch_size=int(cfg["batch_size"]), shuffle=True,
                                       drop_last=bool(cfg["drop_last"]), seed=int(cfg["seed"]), rank=ctx.dist.rank,
                                       world_size=ctx.dist.world_size, prepare=train_prepare)

    def build_model(self, cfg: dict, for_eval: bool = False) -> nn.Module:
        from ..det.model import build_mask_rcnn

        model = build_mask_rcnn(cfg["model"], int(cfg["num_classes"]), cfg["detector"], cfg["data"]["mean"],
                                cfg["data"]["std"], cfg.get("model_kwargs"),
                                None if for_eval else cfg.get("drop_path_rate"))
        if cfg.get("init") and not for_eval and not getattr(self, "resuming", False):
            n = load_init_weights(model, cfg["init"], cfg["model"])
            if self.ctx is not None:
                self.ctx.say(f"backbone weights from {cfg['init']} ({n} tensors)")
        return model

    def describe_data(self) -> str:
        return Path(str(self.cfg["data"]["root"])).name

    def input_shape(self, cfg: dict) -> tuple:
        side = max(cfg["detector"]["min_size"]) if isinstance(cfg["detector"]["min_size"], list) \
            else cfg["detector"]["min_size"]
        side = min(int(side), int(cfg["detector"]["max_size"]))
        return (3, side, side)

    def model_line(self, cfg: dict, params: int, macs: int) -> str:
        _, h, w = self.input_shape(cfg)
        return (f"model: Mask R-CNN on {cfg['model']} ({params:,} params, {macs / 1e9:.2f} GMACs for one {h}x{w} "
                "image at inference)")

    def timing_batch(self, batch_size: int):
        return None  # the CPU settings picker times a loss of the outputs; a detector's loss is in its forward

    def run_summary(self, cfg: dict) -> dict:
        return dict(task="detection", backbone=cfg["model"], data=str(cfg["data"]["root"]),
                    train_images=len(self.train), val_images=len(self.val) if self.has_val else 0,
                    train_instances=self.train.num_instances)

    def on_new_run(self, run_dir: Path) -> None:
        from ..seg.data import write_split_file

        write_split_file(run_dir / SPLIT_TRAIN, self.train.names)
        if self.has_val:
            write_split_file(run_dir / SPLIT_VAL, self.val.names)
        else:
            (run_dir / SPLIT_VAL).unlink(missing_ok=True)

    # --- training
    def forward_loss(self, net: nn.Module, images, targets):
        losses = net(images, targets)
        return sum(losses.values()), {k: v.detach() for k, v in losses.items()}

    def train_meter(self):
        return _TrainMeter(self.ctx)

    def evaluate_split(self, model: nn.Module, split):
        return evaluate_detector(model, split, self.cfg, self.ctx)

    def validate(self, model: nn.Module) -> dict:
        if not self.has_val:
            return {f"val_{k}": None for k in _VAL_KEYS}
        v, _ = self.evaluate_split(model, self.val)
        return {f"val_{k}": v[k] for k in _VAL_KEYS}

    def epoch_line(self, row: dict) -> str:
        line = f"train loss {row['train_loss']:.4f} (mask {row['train_loss_mask']:.4f})"
        if row.get("val_segm_AP") is None:
            return line
        return (line + f" | val box AP {row['val_bbox_AP']:.1f} mask AP {row['val_segm_AP']:.1f} "
                f"AP50 {row['val_segm_AP50']:.1f} union IoU {row['val_union_iou']:.1f}")

    def finish(self, model: nn.Module, which: str, best_val: float, best_epoch: int, run_dir) -> dict:
        from ..det.metrics import plot_pr_curves
        from ..io import atomic_write_text
        from ..train.rundir import LAST, write_file

        if not self.has_val:
            self.ctx.say(f"trained without a validation split; weights in {Path(run_dir) / LAST}")
            return {}
        v, meter = self.evaluate_split(model, self.val)
        if self.ctx.dist.is_main:
            run_dir = Path(run_dir)
            write_file(run_dir, "pr_curves.png", lambda p: plot_pr_curves(
                meter.evals, p, f"Mask R-CNN on {self.cfg['model']}, {self.describe_data()} val ({which})"))
            atomic_write_text(run_dir / "coco_eval.txt", "".join(
                f"{t} ({which}, {len(self.val)} images):\n{meter.evals[t]['text']}\n" for t in ("bbox", "segm")))
        self.ctx.say(f"val ({which}, {len(self.val)} images): box AP {_f(v['bbox_AP'])} AP50 {_f(v['bbox_AP50'])} | "
                     f"mask AP {_f(v['segm_AP'])} AP50 {_f(v['segm_AP50'])} AP75 {_f(v['segm_AP75'])} | union IoU "
                     f"{v['union_iou']:.2f} Dice {v['union_dice']:.2f} (score >= {v['union_score']:g})  [{run_dir}]")
        return dict(evaluated=which, val=v)


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


class _TrainMeter:
    """The summed loss and each of Mask R-CNN's five losses, per image, read every step
    (all-reduced under DDP, so every rank decides on the loss together)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.sums = dict.fromkeys(("loss", *_LOSSES), 0.0)
        self.seen = 0
        self.last_loss = 0.0

    def update(self, loss, parts: dict, targets) -> None:
        dist = self.ctx.dist
        values = torch.stack([loss.detach().float(), *(parts[k].float() for k in _LOSSES)])
        if dist.enabled:
            values = dist.all_reduce_(values.clone()) / dist.world_size
        values = values.tolist()
        n = len(targets)
        self.last_loss = values[0]
        for key, v in zip(self.sums, values):
            self.sums[key] += v * n
        self.seen += n

    def running_loss(self) -> float:
        return self.sums["loss"] / self.seen

    def postfix(self) -> dict:
        return dict(mask=f"{self.sums['loss_mask'] / self.seen:.3f}")

    def compute(self) -> tuple[dict, float]:
        totals = torch.tensor([*self.sums.values(), float(self.seen)], dtype=torch.float64, device=self.ctx.device)
        self.ctx.dist.all_reduce_(totals)
        n = float(totals[-1])
        out = {("train_loss" if k == "loss" else f"train_{k}"): float(t) / n for k, t in zip(self.sums, totals)}
        return out, n
