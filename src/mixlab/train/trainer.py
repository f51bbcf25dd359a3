"""The training loop of `mixlab train`, top to bottom.

    setup (device, precision, seed) -> data as uint8 tensors on the device -> model,
    optimizer, schedule, EMA -> [resume] -> for each epoch: shuffle, augment on the
    device, step; evaluate; write metrics, checkpoints, curves, summary -> test the
    selected weights.

Determinism: every epoch reseeds its own shuffling, augmentation and dropout RNGs from
(seed, epoch, rank), so a run resumed from the checkpoint of epoch e draws exactly the
random numbers an uninterrupted run draws; on the CPU the two end with the same metrics.
"""
from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import rundir as rd
from .cpu_defaults import cpu_has_bf16, has_spatial_conv
from .distributed import Distributed
from .step import TrainStep, autocast


from ..errors import TrainingDiverged  # noqa: E402,F401  (re-exported: mixlab.train.trainer.TrainingDiverged)
from ..errors import UsageError  # noqa: E402


# ----------------------------------------------------------------------------- pieces

def pick_device(name: str, dist: Distributed) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("device cuda was asked for, but torch sees no CUDA device; use --device cpu")
        if dist.enabled and name == "cuda":
            name = f"cuda:{dist.local_rank}"
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    """The precision when not measured (CUDA, DDP, short runs): bf16 where the device has it."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def pick_channels_last(value, model: nn.Module) -> bool:
    return bool(value) if value != "auto" else has_spatial_conv(model)


def pick_run_settings(cfg: dict, model: nn.Module, device: torch.device, dist: Distributed, batch, loss_fn,
                      total_steps: int, say=print) -> dict:
    """precision, channels_last and fast_depthwise for this run, recorded in ``cfg['picked']``
    (config.yaml) so that a resumed run uses the same. On the CPU the settings left on auto are
    measured (:mod:`mixlab.train.cpu_defaults`); the fast depthwise op is switched on in
    ``model`` when picked. ``batch``: a callable giving an (inputs, targets) batch of the real
    shape for timing."""
    from ..ops.depthwise import use_fast_depthwise
    from .cpu_defaults import resolve_cpu_settings

    if device.type == "cpu":
        p = resolve_cpu_settings(cfg, model, batch, loss_fn, total_steps, say, measure=not dist.enabled)
    else:  # CUDA keeps cuDNN's depthwise convolution
        p = cfg.get("picked") or dict(precision=pick_precision(cfg["precision"], device),
                                      channels_last=pick_channels_last(cfg["channels_last"], model),
                                      fast_depthwise=False, compile=cfg.get("compile") is True,
                                      how="device defaults", figures={})
    cfg["picked"] = p
    if p["fast_depthwise"] and device.type == "cpu":
        use_fast_depthwise(model)
    return p


def build_optimizer(model: nn.Module, opt: dict) -> torch.optim.Optimizer:
    name, lr, wd = opt["name"], float(opt["lr"]), float(opt["weight_decay"])
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=tuple(opt["betas"]), eps=float(opt["eps"]))
    if name == "adamw_tfa":  # decay of weight_decay per step whatever the lr (TensorFlow Addons' AdamW)
        from .optim import AdamWAbsoluteDecay

        return AdamWAbsoluteDecay(params, lr=lr, weight_decay=wd, betas=tuple(opt["betas"]), eps=float(opt["eps"]))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, betas=tuple(opt["betas"]), eps=float(opt["eps"]))
    return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(opt["momentum"]),
                           nesterov=bool(opt["nesterov"]))


def lr_factor(sched: dict, epochs: int, progress: float, base_lr: float | None = None) -> float:
    """Learning-rate multiplier at ``progress`` (epochs done, fractional).

    Written as a plain function of progress rather than a stateful scheduler so that a
    resumed run needs nothing but the step count. ``onecycle`` is the piecewise-linear
    schedule of the public ConvMixer CIFAR-10 script (0 -> max at 2/5 -> max/20 at 4/5 -> 0,
    knots at integer epochs as its np.interp uses them), which is not torch's cosine
    OneCycleLR; ``cosine`` is linear warmup then cosine decay to ``min_lr`` (an absolute rate,
    as torch's ``eta_min``; ``base_lr`` is the optimizer's rate it is relative to). With
    ``per_epoch`` the rate is held for each whole epoch at its value at the epoch's start, as
    a torch scheduler stepped once per epoch gives it (``progress`` is where a step ends, so
    a step with progress in (e, e + 1] belongs to epoch e).
    """
    name = sched["name"]
    if sched.get("per_epoch"):
        progress = float(max(0, math.ceil(progress - 1e-9) - 1))
    if name == "constant":
        warm = float(sched.get("warmup_epochs") or 0)
        return min(1.0, progress / warm) if warm > 0 else 1.0
    if name == "onecycle":
        knots = [0, epochs * 2 // 5, epochs * 4 // 5, epochs]
        return float(np.interp(progress, knots, [0.0, 1.0, 1 / 20, 0.0]))
    warm = float(sched.get("warmup_epochs") or 0)
    if warm > 0 and progress < warm:
        return progress / warm
    t = min(1.0, (progress - warm) / max(epochs - warm, 1e-8))
    min_lr = float(sched.get("min_lr") or 0.0)
    if min_lr and not base_lr:
        raise ValueError("lr_factor needs base_lr (the optimizer's rate) when schedule.min_lr is set")
    floor = min_lr / base_lr if min_lr else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + epoch * 9_176 + rank * 7_919) % (2**62)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, prep, batch_size: int,
             device: torch.device, precision: str, dist: Distributed, num_classes: int,
             memory_format=torch.contiguous_format) -> dict:
    """Loss, accuracy and the confusion matrix over a split (sharded across ranks)."""
    model.eval()
    idx = torch.arange(len(labels))[dist.rank::dist.world_size]
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for start in range(0, len(idx), batch_size):
        b = idx[start:start + batch_size].to(images.device)
        x, y = prep(images[b], labels[b], train=False, memory_format=memory_format)
        with autocast(device, precision):
            logits = model(x)
        logits = logits.float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").double()
        pred = logits.argmax(1)
        confusion += torch.bincount(y * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
    dist.all_reduce_(total_loss)
    dist.all_reduce_(confusion)
    n = int(confusion.sum())
    return dict(loss=float(total_loss) / max(n, 1), acc=100.0 * float(confusion.diag().sum()) / max(n, 1),
                n=n, confusion=confusion.cpu())


# ----------------------------------------------------------------------------- the run

def run_training(cfg: dict, out_dir: str | Path, resume: bool = False) -> dict:
    """Train ``cfg`` into ``out_dir`` (resume: from its last checkpoint), holding the folder's
    lock throughout; returns the final summary."""
    with rd.writing(out_dir):
        return _run_training(cfg, out_dir, resume)


def _run_training(cfg: dict, out_dir: str | Path, resume: bool = False) -> dict:
    from .. import model_info
    from ..analysis.profile import count_macs, count_params
    from ..data.augment import AugmentConfig, BatchAugment
    from ..data.classification import load_classification_data
    from ..data.constants import CIFAR_MEAN, CIFAR_STD
    from .config import evaluation_protocol

    out_dir = Path(out_dir)
    if model_info(cfg["model"]).task != "classification":
        raise UsageError(f"{cfg['model']} is a {model_info(cfg['model']).task} model; train it with `mixlab seg "
                         f"train --model {cfg['model']} --data DIR` (`mixlab models --task classification` lists "
                         "classifiers)")
    dist = Distributed.from_env()
    device = pick_device(cfg["device"], dist)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg["num_threads"]))
    main = dist.is_main
    say = print if main else (lambda *a, **k: None)

    # --- data: the whole set as uint8 tensors on the training device
    data = load_classification_data(cfg, verbose=main)
    cfg["num_classes"] = cfg["num_classes"] or data.num_classes
    if cfg["num_classes"] != data.num_classes:
        raise UsageError(f"num_classes is {cfg['num_classes']} but the data set has {data.num_classes} classes")
    img_size = int(data.image_size[0])
    cfg["img_size"] = cfg["img_size"] or img_size
    mean = tuple(cfg["data"]["mean"] or (CIFAR_MEAN if data.name.startswith("cifar") else (0.5, 0.5, 0.5)))
    std = tuple(cfg["data"]["std"] or (CIFAR_STD if data.name.startswith("cifar") else (0.25, 0.25, 0.25)))
    cfg["data"]["mean"], cfg["data"]["std"] = list(mean), list(std)
    train_x, train_y = data.train.images.to(device), data.train.labels.to(device)
    has_val = data.val is not None and len(data.val) > 0
    select = cfg["select"] if has_val else "last"

    # --- model
    torch.manual_seed(int(cfg["seed"]))
    info = model_info(cfg["model"])
    takes_size = info.model_cls is not None and "img_size" in __import__("inspect").signature(info.model_cls).parameters
    model = rd.build_model_for(cfg, cfg["num_classes"], cfg["img_size"] if takes_size else None)
    params, _ = count_params(model)
    macs = count_macs(model, (3, cfg["img_size"], cfg["img_size"]))
    per_rank, batch_size = len(train_y) // dist.world_size, int(cfg["batch_size"])
    if cfg["drop_last"] and per_rank < batch_size:
        raise UsageError(f"{len(train_y)} training images are fewer than one batch of {batch_size} per rank "
                         "(and drop_last is on): lower --batch-size or set --set drop_last=false")
    # drop_last: only whole batches, as a loader with drop_last=True (the Conv2Former seed's)
    steps_per_epoch = (per_rank // batch_size if cfg["drop_last"]
                       else math.ceil(len(train_y) / dist.world_size / batch_size))
    bs = min(batch_size, len(train_y))

    def timing_batch():
        return (torch.randn(bs, train_x.shape[1], *train_x.shape[2:]),
                torch.randint(0, int(cfg["num_classes"]), (bs,)))

    picked = pick_run_settings(cfg, model, device, dist, timing_batch, nn.CrossEntropyLoss(),
                               steps_per_epoch * int(cfg["epochs"]), say)
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
    dist.barrier()

    net = dist.wrap(model, device)
    if picked.get("compile"):
        net = torch.compile(net)
    if cfg["loss"]["label_smoothing"] and not cfg["augment"].get("mixup_alpha") and not cfg["augment"].get("cutmix_alpha"):
        loss_fn = nn.CrossEntropyLoss(label_smoothing=float(cfg["loss"]["label_smoothing"]))
    else:
        loss_fn = nn.CrossEntropyLoss()  # MixUp targets are soft (and carry the smoothing)
    step = TrainStep(net, optimizer, loss_fn, device, precision, cfg["clip_grad"])
    aug_cfg = AugmentConfig.from_dict(cfg["augment"])
    say(f"model: {cfg['model']} ({params:,} params, {macs / 1e6:.1f}M MACs at {cfg['img_size']}px); device {device}"
        f"{f' x {dist.world_size} ranks' if dist.enabled else ''}, {precision}"
        f"{', channels_last' if channels_last else ''}{', fast depthwise conv' if picked['fast_depthwise'] else ''}"
        f"{', compiled' if picked.get('compile') else ''}, "
        f"{torch.get_num_threads()} threads; {cfg['epochs']} epochs x {steps_per_epoch} steps of {cfg['batch_size']}")

    summary = dict(model=cfg["model"], recipe=cfg.get("recipe"), params=params, macs=macs, epochs=int(cfg["epochs"]),
                   device=str(device), world_size=dist.world_size, precision=precision, channels_last=channels_last,
                   fast_depthwise=picked["fast_depthwise"], settings_picked=picked,
                   # the evaluation protocol, so that no table shows an accuracy selected on
                   # the test set without saying so (protocol, selected_on_test)
                   **evaluation_protocol(cfg))
    t_run = time.perf_counter()
    for epoch in range(start_epoch, int(cfg["epochs"])):
        # --- one epoch
        seed = epoch_seed(cfg["seed"], epoch, dist.rank)
        torch.manual_seed(seed)  # dropout, drop path, RandAugment draw from torch's global RNG
        np.random.seed(seed % 2**32)  # timm's Mixup draws from numpy's
        random.seed(seed)  # timm's RandomErasing draws from Python's
        prep = BatchAugment(aug_cfg, mean, std, cfg["num_classes"], float(cfg["loss"]["label_smoothing"]),
                            seed=seed, device=device)
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(epoch_seed(cfg["seed"], epoch, 0)))
        order = order[dist.rank::dist.world_size]
        net.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        bar = _progress(cfg, main, steps_per_epoch, f"epoch {epoch + 1}/{cfg['epochs']}")
        for i in range(steps_per_epoch):
            b = order[i * int(cfg["batch_size"]):(i + 1) * int(cfg["batch_size"])].to(device)
            if len(b) == 0:
                break
            factor = lr_factor(cfg["schedule"], int(cfg["epochs"]), epoch + (i + 1) / steps_per_epoch,
                               float(cfg["optimizer"]["lr"]))
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * factor
            y_hard = train_y[b]
            x, y = prep(train_x[b], y_hard, train=True, memory_format=memory_format)
            y_hard = y_hard[: x.shape[0]]
            loss, logits = step(x, y)
            if ema is not None:
                ema.update(model)
            loss_sum += loss.double() * x.shape[0]
            correct += (logits.argmax(1) == y_hard).sum()
            seen += x.shape[0]
            if (i + 1) % 20 == 0 or i + 1 == steps_per_epoch:
                running = float(loss_sum) / seen  # a sync every 20 steps, not every step
                if not math.isfinite(running):
                    raise TrainingDiverged(
                        f"the training loss became {running} in epoch {epoch + 1}, step {i + 1}: training stopped. "
                        f"The last good checkpoint (epoch {epoch}) is kept in {out_dir}; lower the learning rate "
                        "(--set optimizer.lr=...), add gradient clipping (--set clip_grad=1.0) or use fp32, then "
                        f"`mixlab train --resume {out_dir}`")
                if bar is not None:
                    bar.update((i + 1) - bar.n)
                    bar.set_postfix(loss=f"{running:.3f}", acc=f"{100 * float(correct) / seen:.1f}",
                                    img_s=f"{seen * dist.world_size / (time.perf_counter() - t0):.0f}")
        if bar is not None:
            bar.close()
        train_seconds = time.perf_counter() - t0
        totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), device=device, dtype=torch.float64)])
        dist.all_reduce_(totals)
        train_loss, train_acc = float(totals[0] / totals[2]), 100.0 * float(totals[1] / totals[2])
        images_per_sec = float(totals[2]) / train_seconds

        # --- evaluate, record, checkpoint
        eval_model = ema.module if ema is not None else model
        val = evaluate(eval_model, data.val.images, data.val.labels, prep, int(cfg["eval_batch_size"]), device,
                       precision, dist, cfg["num_classes"], memory_format) if has_val else None
        row = dict(epoch=epoch + 1, train_loss=train_loss, train_acc=train_acc,
                   val_loss=val["loss"] if val else None, val_acc=val["acc"] if val else None,
                   lr=optimizer.param_groups[0]["lr"], epoch_seconds=time.perf_counter() - t0,
                   train_seconds=train_seconds, images_per_sec=images_per_sec)
        rows.append(row)
        improved = val is not None and val["acc"] > best_val
        if improved:
            best_val, best_epoch = val["acc"], epoch + 1
        if main:
            rd.save_checkpoint(out_dir, cfg["model"], model, optimizer, ema, rows, best_val, best_epoch,
                               wall_before + time.perf_counter() - t_run, eval_model if improved else None)
            rd.plot_curves(out_dir, rows, f"{cfg['model']} on {data.name}")
            rd.write_summary(out_dir, dict(summary, best_val_acc=best_val if has_val else None,
                                           best_epoch=best_epoch if has_val else None, test_acc=None,
                                           epochs_done=epoch + 1, finished=False,
                                           wall_seconds=wall_before + time.perf_counter() - t_run,
                                           images_per_sec=images_per_sec))
        dist.barrier()
        say(f"epoch {epoch + 1}/{cfg['epochs']}: train loss {train_loss:.4f} acc {train_acc:.2f}%"
            + (f" | val loss {val['loss']:.4f} acc {val['acc']:.2f}%" if val else "")
            + f" | lr {row['lr']:.2e} | {row['epoch_seconds']:.1f} s, {images_per_sec:.0f} img/s")

    # --- test the selected weights
    if select == "best_val" and (out_dir / rd.BEST).is_file():
        from ..checkpoint import load_weights
        from ..io import read_state_dict

        test_model = rd.build_model_for({**cfg, "drop_path_rate": None}, cfg["num_classes"],
                                        cfg["img_size"] if takes_size else None)
        load_weights(test_model, read_state_dict(out_dir / rd.BEST))
        test_model = test_model.to(device, memory_format=memory_format)
        which = f"best-val weights (epoch {best_epoch})"
    else:
        test_model, which = (ema.module if ema is not None else model), "last weights"
    prep = BatchAugment(aug_cfg, mean, std, cfg["num_classes"], seed=0, device=device)
    test = evaluate(test_model, data.test.images.to(device), data.test.labels.to(device), prep,
                    int(cfg["eval_batch_size"]), device, precision, dist, cfg["num_classes"], memory_format)
    wall = wall_before + time.perf_counter() - t_run
    final = dict(summary, best_val_acc=best_val if has_val else None, best_epoch=best_epoch if has_val else None,
                 test_acc=test["acc"], test_loss=test["loss"], tested=which, epochs_done=int(cfg["epochs"]),
                 finished=True, wall_seconds=wall,
                 images_per_sec=sum(r["images_per_sec"] for r in rows) / max(len(rows), 1))
    if main:
        rd.write_summary(out_dir, final)
    say(f"test accuracy ({which}): {test['acc']:.2f}%  [{out_dir}]")
    dist.barrier()
    dist.shutdown()
    return final


def _progress(cfg: dict, main: bool, total: int, desc: str):
    if not (main and cfg.get("progress", True)):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True,
                disable=os.environ.get("MIXLAB_NO_PROGRESS") == "1")
