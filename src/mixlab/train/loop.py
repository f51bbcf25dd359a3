"""The training loop of every task, top to bottom.

    setup (device, seed) -> the task's data (complete config) -> model, CPU settings,
    optimizer, EMA -> [resume] -> for each epoch: train_one_epoch, the task's validation,
    checkpoint, curves, summary -> the task's evaluation of the selected weights.

What differs between tasks (data, model, loss, metrics, final evaluation) is the task's
(:class:`mixlab.tasks.base.Task`); everything else is here, once.

Determinism: every epoch reseeds its shuffling, augmentation and dropout RNGs from
(seed, epoch, rank), so a run resumed from the checkpoint of epoch e draws exactly the random
numbers an uninterrupted run draws; on the CPU the two end with the same metrics.
"""
from __future__ import annotations

import math
import os
import random
import time
from contextlib import ExitStack, closing
from pathlib import Path

import numpy as np
import torch

from . import rundir as rd
from .distributed import Distributed
from .loggers import TRAIN_LOG, StepLoggers
from .optim import build_optimizer, lr_factor
from .settings import pick_device, pick_run_settings
from .step import TrainStep, autocast
from ..data.loader import epoch_seed
from ..errors import TrainingDiverged, UsageError
from ..runtime import denormals_flushed


def run_training(task, cfg: dict, out_dir: str | Path, resume: bool = False) -> dict:
    """Train ``cfg`` as ``task`` into ``out_dir`` (resume: from its last checkpoint), holding
    the folder's lock throughout; returns the final summary."""
    from .loggers import ConsoleLog

    with ExitStack() as stack:  # whatever the run opens is closed when it ends, however it ends
        stack.enter_context(rd.writing(out_dir))
        console = stack.enter_context(ConsoleLog(enabled=Distributed.from_env().is_main))
        return _run(task, cfg, Path(out_dir), resume, stack, console)


def train_one_epoch(task, step: TrainStep, loader, epoch: int, cfg: dict, optimizer, base_lrs, ema, model,
                    bar=None, out_dir: Path | None = None, loggers=None) -> tuple[dict, float, float]:
    """One pass over the task's training batches: (training figures, images seen, seconds)."""
    steps, epochs = len(loader), int(cfg["epochs"])
    meter = task.train_meter()
    t0 = time.perf_counter()
    for i, (x, target) in enumerate(loader):
        factor = lr_factor(cfg["schedule"], epochs, epoch + (i + 1) / steps, float(cfg["optimizer"]["lr"]))
        for g, base in zip(optimizer.param_groups, base_lrs):
            g["lr"] = base * factor
        loss, outputs = step(x, target)
        if ema is not None:
            ema.update(model)
        meter.update(loss, outputs, target)
        if loggers is not None and loggers.wants(i + 1):
            loggers.step(epoch, i + 1, float(loss), optimizer.param_groups[0]["lr"])
        if (i + 1) % task.check_every == 0 or i + 1 == steps:
            running = meter.running_loss()  # a device sync: every check_every steps, not every step
            if not math.isfinite(running):
                raise TrainingDiverged(
                    f"the training loss became {running} in epoch {epoch + 1}, step {i + 1}: training stopped. "
                    f"The last good checkpoint (epoch {epoch}) is kept in {out_dir}; lower the learning rate "
                    "(--set optimizer.lr=...), add gradient clipping (--set clip_grad=1.0) or use fp32, then "
                    f"`{task.command} --resume {out_dir}`")
            if bar is not None:
                bar.update((i + 1) - bar.n)
                bar.set_postfix(loss=f"{running:.4f}", **meter.postfix(),
                                img_s=f"{meter.seen * task.ctx.dist.world_size / (time.perf_counter() - t0):.{task.rate_digits}f}")
    seconds = time.perf_counter() - t0
    figures, seen = meter.compute()
    return figures, seen, seconds


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, meter, ctx) -> dict:
    """Run ``model`` (eval mode, the run's precision) over ``loader``'s prepared batches into
    the task's ``meter``; its figures."""
    model.eval()
    for x, target in loader:
        with autocast(ctx.device, ctx.precision):
            outputs = model(x)
        meter.update(outputs, target)
    return meter.compute()


def _run(task, cfg: dict, out_dir: Path, resume: bool, stack: ExitStack, console) -> dict:
    from ..analysis.curves import plot_curves
    from ..analysis.profile import count_macs, count_params
    from ..tasks.base import RunContext

    dist = Distributed.from_env()
    device = pick_device(cfg["device"], dist)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg["num_threads"]))
    main = dist.is_main
    say = print if main else (lambda *a, **k: None)
    ctx = RunContext(device=device, dist=dist, say=say, run_dir=out_dir)

    # --- data: the task reads it and completes the config
    task.setup(cfg, ctx, out_dir if resume else None)
    loader, has_val = task.train_loader, task.has_val
    select = cfg["select"] if has_val else "last"

    # --- model, speed settings, optimizer
    torch.manual_seed(int(cfg["seed"]))
    model = task.build_model(cfg)
    if cfg.get("init") and task.init_in_loop:  # start from trained weights (a resumed run restores its own below)
        from ..finetune import init_from, train_classifier_only

        if not (resume and rd.has_checkpoint(out_dir)):
            init_from(model, cfg["init"], freeze_backbone=bool(cfg.get("freeze_backbone")),
                      new_classifier=task.new_classifier_for(cfg["init"]), say=say)
        elif cfg.get("freeze_backbone"):  # the optimizer's parameter groups must be the run's
            train_classifier_only(model)
    params, _ = count_params(model)
    macs = count_macs(model, task.input_shape(cfg))
    batch_size = int(cfg["batch_size"])
    if len(loader) == 0:
        raise UsageError(f"{loader.num_samples} training images are fewer than one batch of {batch_size} per rank "
                         "(and drop_last is on): lower --batch-size or set --set drop_last=false")
    picked = pick_run_settings(cfg, model, device, dist, lambda: task.timing_batch(batch_size), task.picker_loss,
                               len(loader) * int(cfg["epochs"]), say)
    ctx.precision, ctx.memory_format = picked["precision"], (
        torch.channels_last if picked["channels_last"] else torch.contiguous_format)
    if cfg.get("memory_check", True) and not resume:
        from ..analysis.memory import check_memory, estimate_memory

        try:  # an estimate only: a model the meta device cannot run (a detector without targets) is not checked
            estimate = estimate_memory(lambda: task.build_model(cfg), (batch_size, *task.input_shape(cfg)), "train",
                                       low_precision=ctx.precision != "fp32")
        except Exception:  # noqa: BLE001
            estimate = None
        check_memory(estimate, device,
                     f"a training step of {cfg['model']} with batch {batch_size} at "
                     f"{'x'.join(map(str, task.input_shape(cfg)[1:]))}", "lower --batch-size (or the image size)",
                     "set --set memory_check=false")
    model = model.to(device, memory_format=ctx.memory_format)
    ema = None
    if cfg["ema"]["enabled"]:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=float(cfg["ema"]["decay"]))
    optimizer = build_optimizer(model, cfg["optimizer"])
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    # --- resume or start
    r = rd.open_run(out_dir, cfg, resume, model, optimizer, ema, write=main, command=task.command)
    model.to(device, memory_format=ctx.memory_format)
    start_epoch, best_val, best_epoch, wall_before, rows = (r["epoch"], r["best_val"], r["best_epoch"],
                                                            r["wall_seconds"], r["rows"])
    if main and start_epoch == 0:  # a new run, or one started again (no checkpoint)
        task.on_new_run(out_dir)
    console.attach(out_dir / TRAIN_LOG)  # the console so far, and from now on
    dist.barrier()
    net = dist.wrap(model, device)
    if picked.get("compile"):
        net = torch.compile(net)
    step = TrainStep(net, optimizer, None, device, ctx.precision, cfg["clip_grad"], forward_loss=task.forward_loss)
    say(f"{task.model_line(cfg, params, macs)}; device {device}"
        f"{f' x {dist.world_size} ranks' if dist.enabled else ''}, {ctx.precision}"
        f"{', channels_last' if picked['channels_last'] else ''}"
        f"{', fast depthwise conv' if picked['fast_depthwise'] else ''}"
        f"{', mixlab GELU kernels' if picked.get('fast_gelu') else ''}"
        f"{', mixlab LayerNorm kernel' if picked.get('fast_layernorm') else ''}"
        f"{', mixlab 1x1 conv' if picked.get('fast_pointwise') else ''}"
        f"{', mixlab dense conv' if picked.get('fast_dense_conv') else ''}"
        f"{', mixlab resampling kernels' if picked.get('fast_resample') else ''}"
        f"{', mixlab BatchNorm + ReLU' if picked.get('fast_bn_relu') else ''}"
        f"{', compiled' if picked.get('compile') else ''}, {torch.get_num_threads()} threads"
        f"{task.loss_note(cfg)}; {cfg['epochs']} epochs x {len(loader)} steps of {batch_size}")

    summary = dict(model=cfg["model"], recipe=cfg.get("recipe"), params=params, macs=macs, epochs=int(cfg["epochs"]),
                   device=str(device), world_size=dist.world_size, precision=ctx.precision,
                   channels_last=picked["channels_last"], fast_depthwise=picked["fast_depthwise"],
                   fast_gelu=bool(picked.get("fast_gelu")),
                   fast_layernorm=bool(picked.get("fast_layernorm")), fast_pointwise=bool(picked.get("fast_pointwise")),
                   fast_dense_conv=bool(picked.get("fast_dense_conv")),
                   fast_resample=bool(picked.get("fast_resample")), fast_bn_relu=bool(picked.get("fast_bn_relu")),
                   denormals_flushed=denormals_flushed(),
                   settings_picked=picked, **task.run_summary(cfg))
    log = cfg.get("log") or {}
    loggers = stack.enter_context(closing(StepLoggers(out_dir, log.get("loggers") or [] if main else [],
                                                      log.get("every_n_steps", 50), len(loader), start_epoch)))
    t_run = time.perf_counter()
    for epoch in range(start_epoch, int(cfg["epochs"])):
        seed = epoch_seed(cfg["seed"], epoch, dist.rank)
        torch.manual_seed(seed)  # dropout, drop path, RandAugment draw from torch's global RNG
        np.random.seed(seed % 2**32)  # timm's Mixup draws from numpy's
        random.seed(seed)  # timm's RandomErasing draws from Python's
        loader.set_epoch(epoch)
        net.train()
        t0 = time.perf_counter()
        bar = _progress(cfg, main, len(loader), f"epoch {epoch + 1}/{cfg['epochs']}")
        try:  # a rank that stops answering in DDP's gradient all-reduce is named (see Distributed.watch)
            with dist.watch("a training step"):
                figures, seen, train_seconds = train_one_epoch(task, step, loader, epoch, cfg, optimizer, base_lrs,
                                                               ema, model, bar, out_dir, loggers)
        finally:
            if bar is not None:
                bar.close()

        # --- validate, record, checkpoint
        eval_model = ema.module if ema is not None else model
        row = dict(epoch=epoch + 1, **figures, **task.validate(eval_model), lr=optimizer.param_groups[0]["lr"])
        row.update(epoch_seconds=time.perf_counter() - t0, train_seconds=train_seconds,
                   images_per_sec=seen / train_seconds)
        rows.append(row)
        loggers.epoch(row)
        improved = row[task.best_key] is not None and row[task.best_key] > best_val
        if improved:
            best_val, best_epoch = row[task.best_key], epoch + 1
        best = {task.best_summary_key: best_val if has_val else None, "best_epoch": best_epoch if has_val else None}
        if main:
            rd.save_checkpoint(out_dir, cfg["model"], model, optimizer, ema, rows, best_val, best_epoch,
                               wall_before + time.perf_counter() - t_run, eval_model if improved else None)
            rd.write_file(out_dir, rd.CURVES, lambda path: plot_curves(
                path, rows, f"{cfg['model']} on {task.describe_data()}", task.curves, task.curves_label),
                epoch=epoch + 1)
            rd.write_summary(out_dir, dict(summary, **best, **task.pending_summary(), epochs_done=epoch + 1,
                                           finished=False, wall_seconds=wall_before + time.perf_counter() - t_run,
                                           images_per_sec=row["images_per_sec"]))
        dist.barrier()
        say(f"epoch {epoch + 1}/{cfg['epochs']}: {task.epoch_line(row)} | lr {row['lr']:.2e} | "
            f"{row['epoch_seconds']:.1f} s, {row['images_per_sec']:.{task.rate_digits}f} img/s")

    # --- evaluate the selected weights
    if select == "best_val" and (out_dir / rd.BEST).is_file():
        from ..checkpoint import load_weights
        from ..io import read_state_dict

        chosen = task.build_model(cfg, for_eval=True)
        load_weights(chosen, read_state_dict(out_dir / rd.BEST))
        chosen = chosen.to(device, memory_format=ctx.memory_format)
        which = f"best-val weights (epoch {best_epoch})"
    else:
        chosen, which = (ema.module if ema is not None else model), "last weights"
    result = task.finish(chosen, which, best_val, best_epoch, out_dir)
    final = dict(summary, **{task.best_summary_key: best_val if has_val else None,
                             "best_epoch": best_epoch if has_val else None}, **result,
                 epochs_done=int(cfg["epochs"]), finished=True, wall_seconds=wall_before + time.perf_counter() - t_run,
                 images_per_sec=sum(r["images_per_sec"] for r in rows) / max(len(rows), 1))
    if main:
        rd.write_summary(out_dir, final)
    dist.shutdown()  # every rank leaves together, the process groups destroyed before the interpreter exits
    return final


def _progress(cfg: dict, main: bool, total: int, desc: str):
    if not (main and cfg.get("progress", True)):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True,
                disable=os.environ.get("MIXLAB_NO_PROGRESS") == "1")
