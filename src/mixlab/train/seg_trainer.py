"""The training loop of `mixlab seg train`, top to bottom.

    setup (device, precision, seed) -> images and masks as uint8 tensors on the device,
    split into train/val -> model, optimizer, loss -> [resume] -> for each epoch: shuffle,
    augment images and masks together on the device, step; evaluate IoU/Dice on val; write
    metrics, checkpoints, curves, summary -> evaluate the selected weights.

It shares its pieces with the classification loop (:mod:`mixlab.train.trainer`): device and
precision choice, optimizers, the learning-rate schedule, the training step, the run
directory and its atomic checkpoints, DDP, per-epoch reseeding (a resumed run on the CPU
ends with the metrics of an uninterrupted one).

The split is written into the run directory (``split_train.txt`` / ``split_val.txt``) and
read back by ``--resume`` and ``mixlab seg eval``, so the validation cases stay the same.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import rundir as rd
from .distributed import Distributed
from .step import TrainStep, autocast
from ..errors import TrainingDiverged, UsageError
from .trainer import _progress, build_optimizer, epoch_seed, lr_factor, pick_device, pick_run_settings

SPLIT_TRAIN, SPLIT_VAL = "split_train.txt", "split_val.txt"
SEG_CURVES = (("train_iou", "train IoU"), ("val_iou", "val IoU"), ("val_dice", "val Dice"))


# ----------------------------------------------------------------------------- pieces

def load_seg_data(cfg: dict, run_dir: Path | None = None, verbose: bool = False):
    """(train, val or None) :class:`~mixlab.seg.data.SegDataset` for a configuration.

    The split comes from, in order: the run directory's split files (resume, eval), the
    configured split files, a seeded random split of ``data.val_split``.
    """
    from ..data.classification import default_cache_dir
    from ..seg.data import load_segmentation_data, read_split_file, split_dataset

    d = cfg["data"]
    if not d.get("root"):
        raise UsageError("no data folder given: pass --data DIR, a folder in the UNeXt layout "
                         "(images/<name>.png with masks/0/<name>.png) or images/ + masks/ with matching names; "
                         "on this project's machines: --data ../shared/data/busi")
    size = image_hw(cfg.get("img_size"))
    t0 = time.perf_counter()
    ds = load_segmentation_data(d["root"], size=size, cache_dir=default_cache_dir() / "seg",
                                mask_threshold=d.get("mask_threshold"), mask_values=d.get("mask_values"))
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
        print(f"data: {ds.source} ({seconds:.2f} s): {len(train)} train, {len(val) if val else 0} val, "
              f"{ds.num_classes} mask class(es), {ds.image_size[0]}x{ds.image_size[1]} px")
    return train, val


def image_hw(value) -> tuple[int, int] | None:
    """A config's img_size (an int, [h, w], or null) as (h, w) or None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise UsageError(f"img_size must be N or [H, W], got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def build_seg_model(cfg: dict, num_classes: int, img_size: tuple[int, int] | None):
    """The segmentation model a configuration describes (fresh weights)."""
    from .. import create_model, model_info

    info = model_info(cfg["model"])
    if info.task != "segmentation":
        from .. import list_models

        raise UsageError(f"{cfg['model']} is a {info.task} model; `mixlab seg train` trains segmentation models: "
                         f"{', '.join(list_models(task='segmentation'))}")
    kwargs = dict(cfg.get("model_kwargs") or {})
    if cfg.get("drop_path_rate") is not None:
        kwargs["drop_path_rate"] = cfg["drop_path_rate"]
    return create_model(cfg["model"], num_classes=num_classes, img_size=img_size, **kwargs)


def _normalizer(cfg: dict, device: torch.device):
    mean = torch.tensor(cfg["data"]["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg["data"]["std"], device=device).view(1, -1, 1, 1)
    return lambda x01: (x01 - mean) / std  # images in 0..1 -> normalised


@torch.no_grad()
def evaluate_seg(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, cfg: dict, device: torch.device,
                 precision: str, memory_format=torch.contiguous_format, loss_fn=None,
                 keep_per_image: bool = False) -> dict:
    """IoU, Dice, precision, recall (see :mod:`mixlab.seg.metrics`) and the loss over a split.

    ``iou``/``dice`` are the paper's figures: batch-pooled over consecutive batches of
    ``eval_batch_size`` (default: the training batch size, as the paper's validation loader).
    """
    from ..seg.metrics import SegMetrics

    model.eval()
    batch = int(cfg.get("eval_batch_size") or cfg["batch_size"])
    norm = _normalizer(cfg, device)
    metrics = SegMetrics(official_batch_size=batch, threshold=float(cfg["threshold"]))
    loss_sum, n = 0.0, 0
    for start in range(0, len(images), batch):
        x = norm(images[start:start + batch].to(device).float().div_(255.0)).contiguous(memory_format=memory_format)
        y = masks[start:start + batch].to(device)
        with autocast(device, precision):
            logits = model(x)
        logits = logits.float()
        if loss_fn is not None:
            loss_sum += float(loss_fn(logits, y.float())) * x.shape[0]
        metrics.update(logits, y)
        n += x.shape[0]
    out = metrics.compute()
    out["loss"] = loss_sum / max(n, 1) if loss_fn is not None else None
    if keep_per_image:
        out["per_image"] = {k: v.tolist() for k, v in metrics.per_image().items()}
    return out


# ----------------------------------------------------------------------------- the run

def run_seg_training(cfg: dict, out_dir: str | Path, resume: bool = False) -> dict:
    """Train ``cfg`` into ``out_dir`` (resume: from its last checkpoint), holding the folder's
    lock throughout; returns the final summary."""
    with rd.writing(out_dir):
        return _run_seg_training(cfg, out_dir, resume)


def _run_seg_training(cfg: dict, out_dir: str | Path, resume: bool = False) -> dict:
    from ..analysis.profile import count_macs, count_params
    from ..seg.data import write_split_file
    from .config import seg_augment
    from ..seg.losses import build_loss
    from ..seg.metrics import confusion_counts, scores_from_counts

    out_dir = Path(out_dir)
    dist = Distributed.from_env()
    device = pick_device(cfg["device"], dist)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg["num_threads"]))
    main = dist.is_main
    say = print if main else (lambda *a, **k: None)

    # --- data: every image and mask as uint8 tensors on the training device
    train, val = load_seg_data(cfg, out_dir if resume else None, verbose=main)
    num_classes = train.num_classes
    if cfg["num_classes"] not in (None, num_classes):
        raise UsageError(f"num_classes is {cfg['num_classes']} but the masks have {num_classes} class(es) "
                         f"(masks/0 .. masks/{num_classes - 1})")
    cfg["num_classes"] = num_classes
    size = train.image_size
    cfg["img_size"] = cfg["img_size"] or list(size)
    train_x, train_m = train.images.to(device), train.masks.to(device)
    has_val = val is not None and len(val) > 0
    select = cfg["select"] if has_val else "last"
    batch_size = int(cfg["batch_size"])
    if cfg["drop_last"] and len(train) // dist.world_size < batch_size:
        raise UsageError(f"{len(train)} training images are fewer than one batch of {batch_size} per rank "
                         "(and drop_last is on): lower --batch-size or set --set drop_last=false")

    # --- model, loss, optimizer
    torch.manual_seed(int(cfg["seed"]))
    model = build_seg_model(cfg, num_classes, size)
    params, _ = count_params(model)
    macs = count_macs(model, (3, *size))
    loss_fn = build_loss(cfg["loss"]["name"])
    per_rank = len(train) // dist.world_size
    steps_per_epoch = per_rank // batch_size if cfg["drop_last"] else math.ceil(per_rank / batch_size)
    bs = min(batch_size, len(train))

    def timing_batch():
        return (torch.randn(bs, train_x.shape[1], *train_x.shape[2:]),
                (torch.rand(bs, num_classes, *train_x.shape[2:]) > 0.5).float())

    picked = pick_run_settings(cfg, model, device, dist, timing_batch, loss_fn, steps_per_epoch * int(cfg["epochs"]),
                               say)
    precision, channels_last = picked["precision"], picked["channels_last"]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    ema = None
    if cfg["ema"]["enabled"]:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=float(cfg["ema"]["decay"]))
    optimizer = build_optimizer(model, cfg["optimizer"])
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    # --- resume or start
    r = rd.open_run(out_dir, cfg, resume, model, optimizer, ema, write=main)
    model.to(device, memory_format=memory_format)
    start_epoch, best_val, best_epoch, wall_before, rows = (r["epoch"], r["best_val"], r["best_epoch"],
                                                            r["wall_seconds"], r["rows"])
    if main and start_epoch == 0:  # a new run, or one started again (no checkpoint): its split
        write_split_file(out_dir / SPLIT_TRAIN, train.names)
        if has_val:
            write_split_file(out_dir / SPLIT_VAL, val.names)
        else:
            (out_dir / SPLIT_VAL).unlink(missing_ok=True)
    dist.barrier()

    net = dist.wrap(model, device)
    if picked.get("compile"):
        net = torch.compile(net)
    step = TrainStep(net, optimizer, loss_fn, device, precision, cfg["clip_grad"])
    augment = seg_augment(cfg["augment"])
    norm = _normalizer(cfg, device)
    say(f"model: {cfg['model']} ({params:,} params, {macs / 1e9:.3f} GMACs at {size[0]}x{size[1]}); device {device}"
        f"{f' x {dist.world_size} ranks' if dist.enabled else ''}, {precision}"
        f"{', channels_last' if channels_last else ''}{', fast depthwise conv' if picked['fast_depthwise'] else ''}"
        f"{', compiled' if picked.get('compile') else ''}, {torch.get_num_threads()} threads; loss {cfg['loss']['name']}; "
        f"{cfg['epochs']} epochs x {steps_per_epoch} steps of {batch_size}")

    summary = dict(model=cfg["model"], task="segmentation", recipe=cfg.get("recipe"), data=str(cfg["data"]["root"]),
                   train_images=len(train), val_images=len(val) if has_val else 0, params=params, macs=macs,
                   epochs=int(cfg["epochs"]), device=str(device), world_size=dist.world_size, precision=precision,
                   channels_last=channels_last, fast_depthwise=picked["fast_depthwise"], settings_picked=picked)
    t_run = time.perf_counter()
    for epoch in range(start_epoch, int(cfg["epochs"])):
        # --- one epoch
        seed = epoch_seed(cfg["seed"], epoch, dist.rank)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        aug_gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch_seed(cfg["seed"], epoch, 0)))
        order = order[dist.rank::dist.world_size]
        net.train()
        t0 = time.perf_counter()
        loss_sum, iou_sum, seen = 0.0, 0.0, 0
        bar = _progress(cfg, main, steps_per_epoch, f"epoch {epoch + 1}/{cfg['epochs']}")
        for i in range(steps_per_epoch):
            b = order[i * batch_size:(i + 1) * batch_size].to(device)
            factor = lr_factor(cfg["schedule"], int(cfg["epochs"]), epoch + (i + 1) / steps_per_epoch,
                               float(cfg["optimizer"]["lr"]))
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * factor
            x, m = augment(train_x[b], train_m[b], generator=aug_gen)
            x = norm(x).contiguous(memory_format=memory_format)
            loss, logits = step(x, m.float())
            if ema is not None:
                ema.update(model)
            if dist.enabled:  # every rank decides together, or one would wait forever in the next all-reduce
                loss = dist.all_reduce_(loss.detach().clone().float()) / dist.world_size
            loss_value = float(loss)  # per step: segmentation steps are few and long
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"the training loss became {loss_value} in epoch {epoch + 1}, step {i + 1}: training stopped. "
                    f"The last good checkpoint (epoch {epoch}) is kept in {out_dir}; lower the learning rate "
                    "(--set optimizer.lr=...), add gradient clipping (--set clip_grad=1.0) or use fp32, then "
                    f"`mixlab seg train --resume {out_dir}`")
            # the paper's training IoU: each batch's pixels pooled, averaged over batches by size
            batch_iou = float(scores_from_counts(confusion_counts(logits, m, float(cfg["threshold"])).sum(0))["iou"])
            loss_sum += loss_value * x.shape[0]
            iou_sum += batch_iou * x.shape[0]
            seen += x.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", iou=f"{100 * iou_sum / seen:.1f}",
                                img_s=f"{seen * dist.world_size / (time.perf_counter() - t0):.1f}")
        if bar is not None:
            bar.close()
        train_seconds = time.perf_counter() - t0
        totals = torch.tensor([loss_sum, iou_sum, float(seen)], dtype=torch.float64, device=device)
        dist.all_reduce_(totals)
        train_loss, train_iou = float(totals[0] / totals[2]), 100.0 * float(totals[1] / totals[2])
        images_per_sec = float(totals[2]) / train_seconds

        # --- evaluate (every rank evaluates the whole val split: it is small), record, checkpoint
        eval_model = ema.module if ema is not None else model
        v = evaluate_seg(eval_model, val.images, val.masks, cfg, device, precision, memory_format,
                         loss_fn) if has_val else None
        row = dict(epoch=epoch + 1, train_loss=train_loss, train_iou=train_iou,
                   val_loss=v["loss"] if v else None, val_iou=100 * v["iou"] if v else None,
                   val_dice=100 * v["dice"] if v else None,
                   val_iou_per_image=100 * v["iou_per_image"] if v else None,
                   val_dice_per_image=100 * v["dice_per_image"] if v else None,
                   val_precision=100 * v["precision"] if v else None, val_recall=100 * v["recall"] if v else None,
                   lr=optimizer.param_groups[0]["lr"], epoch_seconds=time.perf_counter() - t0,
                   train_seconds=train_seconds, images_per_sec=images_per_sec)
        rows.append(row)
        improved = v is not None and row["val_iou"] > best_val
        if improved:
            best_val, best_epoch = row["val_iou"], epoch + 1
        if main:
            rd.save_checkpoint(out_dir, cfg["model"], model, optimizer, ema, rows, best_val, best_epoch,
                               wall_before + time.perf_counter() - t_run, eval_model if improved else None)
            rd.plot_curves(out_dir, rows, f"{cfg['model']} on {Path(str(cfg['data']['root'])).name}",
                           SEG_CURVES, "IoU / Dice (%)")
            rd.write_summary(out_dir, dict(summary, best_val_iou=best_val if has_val else None,
                                           best_epoch=best_epoch if has_val else None,
                                           epochs_done=epoch + 1, finished=False,
                                           wall_seconds=wall_before + time.perf_counter() - t_run,
                                           images_per_sec=images_per_sec))
        dist.barrier()
        say(f"epoch {epoch + 1}/{cfg['epochs']}: train loss {train_loss:.4f} IoU {train_iou:.2f}"
            + (f" | val loss {v['loss']:.4f} IoU {row['val_iou']:.2f} Dice {row['val_dice']:.2f}" if v else "")
            + f" | lr {row['lr']:.2e} | {row['epoch_seconds']:.1f} s, {images_per_sec:.1f} img/s")

    # --- evaluate the selected weights on the validation split
    final = dict(summary, epochs_done=int(cfg["epochs"]), finished=True,
                 wall_seconds=wall_before + time.perf_counter() - t_run,
                 images_per_sec=sum(r["images_per_sec"] for r in rows) / max(len(rows), 1))
    if has_val:
        if select == "best_val" and (out_dir / rd.BEST).is_file():
            from ..checkpoint import load_weights
            from ..io import read_state_dict

            chosen = build_seg_model({**cfg, "drop_path_rate": None}, num_classes, size)
            load_weights(chosen, read_state_dict(out_dir / rd.BEST))
            chosen = chosen.to(device, memory_format=memory_format)
            which = f"best-val weights (epoch {best_epoch})"
        else:
            chosen, which = (ema.module if ema is not None else model), "last weights"
        v = evaluate_seg(chosen, val.images, val.masks, cfg, device, precision, memory_format, loss_fn)
        final.update(best_val_iou=best_val, best_epoch=best_epoch, evaluated=which,
                     val={k: (100 * x if k in _PERCENT else x) for k, x in v.items()})
        say(f"val ({which}, {len(val)} images): IoU {100 * v['iou']:.2f}  Dice {100 * v['dice']:.2f}  "
            f"(per image: IoU {100 * v['iou_per_image']:.2f} Dice {100 * v['dice_per_image']:.2f}; "
            f"precision {100 * v['precision']:.2f} recall {100 * v['recall']:.2f})  [{out_dir}]")
    else:
        say(f"trained without a validation split; weights in {out_dir / rd.LAST}")
    if main:
        rd.write_summary(out_dir, final)
    dist.barrier()
    dist.shutdown()
    return final


_PERCENT = {"iou", "dice", "precision", "recall", "pixel_accuracy"} | {
    f"{k}_{s}" for k in ("iou", "dice", "precision", "recall") for s in ("per_image", "global")}
