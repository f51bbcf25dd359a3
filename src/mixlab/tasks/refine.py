"""Boundary patch refinement (`mixlab refine train`): a small segmenter that sees an image
patch and the coarse mask's patch (4 channels) and outputs the refined patch.

The training set is cut once, before the first epoch, from coarse masks a model really made
of the training images (:mod:`mixlab.refine.coarse`: a folder of mask PNGs, e.g.
out-of-fold masks from `mixlab refine coarse`, or a `mixlab seg train` run's predictions of
images it did not train on; images the coarse model trained on are refused, their masks are
memorised). As the official code (``tools/filter.py``, ``tools/split_patches.py``): images
whose coarse mask has IoU <= 0.5 with the truth are left out (gross misses are not boundary
errors), boxes are NMS-filtered at IoU 0.25, and image, coarse-mask and ground-truth patches
of each box form one sample. Each epoch is validated on whole images: the validation
images' coarse masks are refined (NMS 0.55, the official inference value) and scored
before and after (IoU, Dice, boundary F); the best epoch is the one with the best refined
IoU.

The split of the images that have coarse masks into training and validation images is
written to the run directory (``split_train.txt`` / ``split_val.txt``), as for `mixlab seg
train`; `mixlab refine eval` warns when it scores images the refiner trained on.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from .base import RunContext
from .segmentation import SPLIT_TRAIN, SPLIT_VAL, SegmentationTask, image_hw
from ..errors import UsageError
from ..train.config import run_settings

_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

REFINE_DEFAULTS: dict = {
    "task": "refine",
    "model": "unext_s",  # any segmentation model taking in_chans=4 (`mixlab models --task segmentation`)
    "model_kwargs": {},
    "num_classes": 1,
    "img_size": 256,  # images and masks are read at this size (BUSI's UNeXt runs: 256); null keeps the files'
    "seed": 41,
    "epochs": 30,
    "batch_size": 32,  # patches per step
    "eval_batch_size": 8,  # images per batch of the pooled IoU/Dice (the UNeXt run's, as `mixlab seg eval`)
    "data": {"root": None, "val_split": 0.1, "split_seed": 41, "train_split_file": None, "val_split_file": None,
             "mean": list(_IMAGENET[0]), "std": list(_IMAGENET[1])},
    # source: a folder of mask PNGs or a `mixlab seg train` run; min_iou: training images whose
    # coarse mask has IoU <= this with the truth are left out (the official filter.py's 0.5)
    "coarse": {"source": None, "min_iou": 0.5},
    # size: box side in pixels of the image as read; input_size: the refiner's input (the
    # official small refiner: 64 -> 128); NMS IoU thresholds: the official Cityscapes values
    "patch": {"size": 64, "input_size": 128, "nms_iou_train": 0.25, "nms_iou": 0.55},
    "boundary_tolerance": 2,  # pixels, of the boundary F-score
    "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "momentum": 0.9, "nesterov": False,
                  "betas": [0.9, 0.999], "eps": 1e-8, "fused": "auto"},
    "schedule": {"name": "cosine", "warmup_epochs": 0.0, "min_lr": 0.0, "per_epoch": False},
    "loss": {"name": "bce"},  # the official refiner's loss is cross-entropy
    # the official refiner's augmentation: horizontal flips and photometric changes
    "augment": {"hflip": 0.5, "vflip": 0.0, "rot90": False, "crop_scale": None, "crop_p": 1.0,
                "brightness": 0.1, "contrast": 0.1},
    "threshold": 0.5,
    "drop_last": True,
    # select: best_val (best refined IoU on the refiner's validation images) | last
    **run_settings(log_every=10),
}

_PERCENT_KEYS = ("iou", "dice", "iou_per_image", "dice_per_image", "iou_global", "dice_global", "precision",
                 "recall", "boundary_f", "boundary_precision", "boundary_recall")


def percent(result: dict) -> dict:
    """A :func:`~mixlab.refine.metrics.compare_refinement` result with its scores in percent."""
    out = {}
    for k, v in result.items():
        base = k.rsplit("_", 1)[0] if k.endswith(("_before", "_after")) else None
        out[k] = 100 * v if base in _PERCENT_KEYS and isinstance(v, float) else v
    return out


def split_refine_names(names: list[str], cfg: dict, run_dir: Path | None) -> tuple[list[str], list[str]]:
    """(training, validation) names among the images with coarse masks: the run directory's split
    files (resume), else the configured split files, else a seeded split of ``data.val_split``."""
    from ..seg.data import read_split_file, split_names

    d = cfg["data"]
    known = set(names)
    if run_dir is not None and (Path(run_dir) / SPLIT_TRAIN).is_file():
        train_file = Path(run_dir) / SPLIT_TRAIN
        val_file = Path(run_dir) / SPLIT_VAL if (Path(run_dir) / SPLIT_VAL).is_file() else None
    else:
        train_file, val_file = d.get("train_split_file"), d.get("val_split_file")
    if train_file or val_file:
        train = read_split_file(train_file) if train_file else None
        val = read_split_file(val_file) if val_file else []
        if train is None:
            train = [n for n in names if n not in set(val)]
        unknown = [n for n in train + val if n not in known]
        if unknown:
            raise UsageError(f"{len(unknown)} image(s) of the split files have no coarse mask (or are not in the "
                             f"data): {', '.join(unknown[:5])}")
        return sorted(train), sorted(val)
    if float(d["val_split"]) > 0:
        return split_names(names, float(d["val_split"]), int(d["split_seed"]))
    return sorted(names), []


class RefineTask(SegmentationTask):
    name, command = "refine", "mixlab refine train"
    best_key, best_summary_key = "val_iou", "best_val_iou"
    curves = (("val_iou_before", "val IoU, coarse"), ("val_iou", "val IoU, refined"),
              ("val_boundary_f_before", "val boundary F, coarse"), ("val_boundary_f", "val boundary F, refined"))
    curves_label = "IoU / boundary F (%)"
    check_every = 5
    rate_digits = 0
    # a refiner is a segmentation model (4 input channels); its config a segmentation config
    # plus the refine keys
    model_task = config_kind = "segmentation"

    defaults = REFINE_DEFAULTS

    def validate_config(self, cfg: dict) -> None:
        p, c = cfg["patch"], cfg["coarse"]
        for key in ("size", "input_size"):
            if not isinstance(p[key], int) or p[key] < 2:
                raise UsageError(f"patch.{key} must be a whole number of pixels, 2 or more; got {p[key]!r}")
        for key in ("nms_iou_train", "nms_iou"):
            if not isinstance(p[key], (int, float)) or not 0.0 < float(p[key]) <= 1.0:
                raise UsageError(f"patch.{key} must be an IoU in (0, 1] (the paper uses 0.25-0.55); got {p[key]!r}")
        if not isinstance(c["min_iou"], (int, float)) or not 0.0 <= float(c["min_iou"]) < 1.0:
            raise UsageError(f"coarse.min_iou must be in [0, 1) (0 keeps every image); got {c['min_iou']!r}")
        if not isinstance(cfg["boundary_tolerance"], int) or cfg["boundary_tolerance"] < 0:
            raise UsageError(f"boundary_tolerance must be a whole number of pixels >= 0; got "
                             f"{cfg['boundary_tolerance']!r}")
        if cfg["num_classes"] not in (None, 1):
            raise UsageError("a refiner outputs one mask channel: num_classes must be 1")
        if not c.get("source"):
            raise UsageError("no coarse masks given: pass --coarse DIR (mask PNGs, e.g. from `mixlab refine coarse` "
                             "or `mixlab seg predict`) or --coarse RUN (a `mixlab seg train` run)")

    # --- data and model
    def setup(self, cfg: dict, ctx: RunContext, resume_dir=None) -> None:
        from ..data.classification import default_cache_dir
        from ..data.loader import DeviceLoader
        from ..refine.coarse import describe_missing, load_coarse
        from ..refine.refiner import PatchSettings, training_patches
        from ..seg.data import load_segmentation_data
        from ..seg.losses import build_loss
        from ..seg.metrics import confusion_counts, scores_from_counts
        from ..train.config import seg_augment
        from ..refine.patches import refiner_input

        self.validate_config(cfg)
        self.ctx, self.cfg = ctx, cfg
        say = ctx.say
        if not cfg["data"].get("root"):
            raise UsageError("no data folder given: pass --data DIR (images/ with masks/0/, the ground truth)")
        ds = load_segmentation_data(cfg["data"]["root"], size=image_hw(cfg.get("img_size")),
                                    cache_dir=default_cache_dir() / "seg")
        coarse = load_coarse(cfg["coarse"]["source"], ds, ctx.device)
        if coarse.missing:
            say(describe_missing(coarse.missing, len(ds), coarse.source))
        train_names, val_names = split_refine_names(coarse.names, cfg, resume_dir)
        seen = sorted(set(coarse.seen) & set(train_names + val_names))
        if seen:  # validating on memorised masks would favour the epoch that changes least
            raise UsageError(
                f"{len(seen)} of the refiner's {len(train_names) + len(val_names)} training and validation images "
                f"({', '.join(seen[:3])}, ...) are images "
                f"{coarse.source} was trained on: its masks of them are memorised, not the masks it makes of new "
                "images. Train the refiner on out-of-fold masks (`mixlab refine coarse --data ... --model ... --out "
                "DIR`, then --coarse DIR), or name only images the run did not see with --train-split FILE and "
                "--val-split FILE")
        by_name = {n: i for i, n in enumerate(coarse.names)}
        self.train, self.val = ds.subset(train_names), ds.subset(val_names) if val_names else None
        self.test = None  # the refiner is measured on its validation images (`mixlab refine eval` on any split)
        self.train_coarse = coarse.masks[torch.tensor([by_name[n] for n in train_names], dtype=torch.long)]
        self.val_coarse = (coarse.masks[torch.tensor([by_name[n] for n in val_names], dtype=torch.long)]
                           if val_names else None)
        self.coarse = coarse
        # official filter.py: leave out images whose coarse mask misses the object (IoU <= min_iou)
        iou = scores_from_counts(confusion_counts(self.train_coarse.bool(), self.train.masks.bool()))["iou"]
        keep = (iou > float(cfg["coarse"]["min_iou"])).nonzero().squeeze(1)
        self.low_iou = len(train_names) - keep.numel()
        self.train_iou_coarse = float(iou.mean()) if len(iou) else float("nan")
        if keep.numel() == 0:
            raise UsageError(f"every one of the {len(train_names)} training images has a coarse mask with IoU <= "
                             f"{cfg['coarse']['min_iou']} (mean {100 * self.train_iou_coarse:.1f}%): these masks miss "
                             "the objects rather than their boundaries; use better coarse masks, or "
                             "--set coarse.min_iou=0 to train on them anyway")
        patch_imgs, patch_masks, _ = training_patches(self.train.images[keep], self.train_coarse[keep],
                                                      self.train.masks[keep], PatchSettings.from_config(cfg, True))
        if len(patch_imgs) == 0:
            raise UsageError(f"the coarse masks of the {keep.numel()} training images have no boundary pixels (all "
                             "empty or full): there is nothing to train a boundary refiner on")
        self.n_patches = len(patch_imgs)
        cfg["num_classes"] = 1
        cfg["img_size"] = cfg["img_size"] or list(ds.image_size)
        self.has_val = self.val is not None and len(self.val) > 0
        self.loss_fn = self.picker_loss = build_loss(cfg["loss"]["name"])
        self.threshold = float(cfg["threshold"])
        augment, mean, std = seg_augment(cfg["augment"]), cfg["data"]["mean"], cfg["data"]["std"]
        say(f"coarse masks: {coarse.source} ({coarse.kind}); training on {keep.numel()} of {len(train_names)} images "
            f"(mean coarse IoU {100 * self.train_iou_coarse:.1f}; {self.low_iou} at IoU <= "
            f"{cfg['coarse']['min_iou']} left out): {self.n_patches} patches of {cfg['patch']['size']} px -> "
            f"{cfg['patch']['input_size']}; {len(val_names)} validation images")

        def train_prepare(seed: int):
            generator = torch.Generator().manual_seed(seed)

            def prepare(x, m):
                x, m = augment(x, m, generator=generator)
                inputs = refiner_input(x, m[:, :1].float() / 255.0, mean, std)
                return inputs.contiguous(memory_format=ctx.memory_format), m[:, 1:2].float()
            return prepare

        self.train_loader = DeviceLoader(patch_imgs.to(ctx.device), patch_masks.to(ctx.device),
                                         batch_size=int(cfg["batch_size"]), shuffle=True,
                                         drop_last=bool(cfg["drop_last"]), seed=int(cfg["seed"]),
                                         rank=ctx.dist.rank, world_size=ctx.dist.world_size, prepare=train_prepare)

    def build_model(self, cfg: dict, for_eval: bool = False) -> nn.Module:
        from ..registry import create_model, list_models, model_info

        if model_info(cfg["model"]).task != "segmentation":
            raise UsageError(f"{cfg['model']} is a {model_info(cfg['model']).task} model; a refiner is a segmentation "
                             f"model: {', '.join(list_models(task='segmentation'))}")
        kwargs = dict(cfg.get("model_kwargs") or {})
        if cfg.get("drop_path_rate") is not None and not for_eval:
            kwargs["drop_path_rate"] = cfg["drop_path_rate"]
        s = int(cfg["patch"]["input_size"])
        return create_model(cfg["model"], num_classes=1, in_chans=4, img_size=(s, s), **kwargs)

    def describe_data(self) -> str:
        return f"{Path(str(self.cfg['data']['root'])).name} boundary patches"

    def input_shape(self, cfg: dict) -> tuple:
        s = int(cfg["patch"]["input_size"])
        return (4, s, s)

    def model_line(self, cfg: dict, params: int, macs: int) -> str:
        s = int(cfg["patch"]["input_size"])
        return f"refiner: {cfg['model']} ({params:,} params, {macs / 1e6:.1f}M MACs per 4x{s}x{s} patch)"

    def timing_batch(self, batch_size: int):
        s = int(self.cfg["patch"]["input_size"])
        bs = min(batch_size, self.n_patches)
        return torch.randn(bs, 4, s, s), (torch.rand(bs, 1, s, s) > 0.5).float()

    def run_summary(self, cfg: dict) -> dict:
        return dict(task="refine", data=str(cfg["data"]["root"]), coarse=self.coarse.source,
                    coarse_kind=self.coarse.kind, train_images=len(self.train) - self.low_iou,
                    train_images_low_iou=self.low_iou, skipped_no_coarse=len(self.coarse.missing),
                    train_patches=self.n_patches, val_images=len(self.val) if self.has_val else 0)

    # --- validation and the end
    def evaluate_split(self, model: nn.Module, split, coarse=None) -> dict:
        result, _ = evaluate_refiner(model, split.images, coarse, split.masks, self.cfg, self.ctx.device,
                                     self.ctx.precision)
        return result

    def validate(self, model: nn.Module) -> dict:
        if not self.has_val:
            return dict(val_iou=None, val_dice=None, val_boundary_f=None, val_iou_before=None,
                        val_boundary_f_before=None, val_patches=None)
        r = self.evaluate_split(model, self.val, self.val_coarse)
        return dict(val_iou=100 * r["iou_after"], val_dice=100 * r["dice_after"],
                    val_boundary_f=100 * r["boundary_f_after"], val_iou_before=100 * r["iou_before"],
                    val_dice_before=100 * r["dice_before"], val_boundary_f_before=100 * r["boundary_f_before"],
                    val_patches=r["n_patches"])

    def epoch_line(self, row: dict) -> str:
        line = f"train loss {row['train_loss']:.4f} patch IoU {row['train_iou']:.2f}"
        if row["val_iou"] is not None:
            line += (f" | val IoU {row['val_iou_before']:.2f} -> {row['val_iou']:.2f}, boundary F "
                     f"{row['val_boundary_f_before']:.2f} -> {row['val_boundary_f']:.2f}")
        return line

    def finish(self, model: nn.Module, which: str, best_val: float, best_epoch: int, run_dir) -> dict:
        from ..train.rundir import LAST

        if not self.has_val:
            self.ctx.say(f"trained without validation images; weights in {Path(run_dir) / LAST}")
            return {}
        r = self.evaluate_split(model, self.val, self.val_coarse)
        self.ctx.say(f"val ({which}, {r['n_images']} images, {r['n_patches']} patches): IoU {100 * r['iou_before']:.2f}"
                     f" -> {100 * r['iou_after']:.2f}  Dice {100 * r['dice_before']:.2f} -> {100 * r['dice_after']:.2f}"
                     f"  boundary F@{r['boundary_tolerance_px']}px {100 * r['boundary_f_before']:.2f} -> "
                     f"{100 * r['boundary_f_after']:.2f}  [{run_dir}]")
        return dict(evaluated=which, val=percent({k: v for k, v in r.items() if k != "per_image"}))


def evaluate_refiner(model: nn.Module, images: torch.Tensor, coarse: torch.Tensor, truth: torch.Tensor | None,
                     cfg: dict, device, precision: str = "fp32",
                     batch_size: int | None = None) -> tuple[dict, torch.Tensor]:
    """(figures, refined masks (N, 1, H, W) bool): ``coarse`` refined by ``model`` as the refine
    config ``cfg`` says; the figures compare before and after when ``truth`` is given
    (:func:`~mixlab.refine.metrics.compare_refinement`) and always hold the patch count and
    the refinement time per image."""
    from ..refine.metrics import compare_refinement
    from ..refine.refiner import PatchSettings, refine_masks

    settings = PatchSettings.from_config(cfg)
    t0 = time.perf_counter()
    refined, counts = refine_masks(model, images, coarse, settings, cfg["data"]["mean"], cfg["data"]["std"],
                                   device=device, batch_size=max(int(cfg["batch_size"]), 32), precision=precision,
                                   threshold=float(cfg["threshold"]))
    seconds = time.perf_counter() - t0
    result = dict(n_images=int(images.shape[0]), n_patches=int(counts.sum()),
                  seconds_per_image=seconds / max(int(images.shape[0]), 1), patch_size=settings.size,
                  input_size=settings.input_size, nms_iou=settings.nms_iou)
    if truth is not None:
        result.update(compare_refinement(coarse, refined, truth, int(batch_size or cfg.get("eval_batch_size") or 8),
                                         int(cfg["boundary_tolerance"])))
        result["per_image"]["patches"] = counts.tolist()
    else:
        result["per_image"] = dict(patches=counts.tolist())
    return result, refined
