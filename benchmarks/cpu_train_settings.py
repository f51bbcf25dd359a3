"""Training-step speed of one model under every CPU setting `mixlab train` can pick, in one process.

For each combination of precision (bf16 / fp32), layout (channels_last / NCHW) and mixlab's CPU
ops or aten's (the fast depthwise convolution, the GELU kernels, GELU + BatchNorm fused where
the model has such pairs, the LayerNorm kernel, the 1x1 and dense KxK convolutions' weight
gradients, BatchNorm + ReLU and the fused resampling layers, the BCE + Dice loss kernel of
segmentation models, and torch's fused AdamW, as `mixlab train` uses them), the same model,
batch and task loss; two more rows take mixlab's ops with torch's default AdamW and with aten's
dense KxK convolution. The settings are timed in turn, one window each per round, so drift in the
machine falls on all alike. Prints images/s (median over rounds) and the ratio of each to the
best plain-torch setting (aten's ops throughout), and writes a JSON with the command, commit,
CPU, torch and date.

    python benchmarks/cpu_train_settings.py --model convmixer_256_8 --batch-size 128 --img-size 32 \
        --json benchmarks/results/cpu-settings-convmixer.json

Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import mixlab
from mixlab.ops.depthwise import use_fast_depthwise
from mixlab.ops.gelu import use_fast_gelu
from mixlab.ops.layernorm import use_fast_layernorm
from mixlab.ops.pointwise import use_fast_pointwise
from mixlab.ops.dense_conv import use_fast_dense_conv
from mixlab.ops.resample import use_fast_resample
from mixlab.ops.bn_relu import use_fast_bn_relu
from mixlab.runtime import flush_denormals, tune_malloc
from mixlab.train.cpu_defaults import cpu_model_name
from mixlab.train.step import TrainStep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--window-seconds", type=float, default=2.0)
    ap.add_argument("--precisions", default="bf16,fp32",
                    help="comma-separated, of bf16 and fp32 (e.g. fp32 alone on a CPU without native bf16, "
                         "where a bf16 step can take minutes)")
    ap.add_argument("--json")
    args = ap.parse_args()
    precisions = tuple(p.strip() for p in args.precisions.split(","))
    if not precisions or set(precisions) - {"bf16", "fp32"}:
        ap.error(f"--precisions takes bf16, fp32 or both (comma-separated), got {args.precisions!r}")
    tune_malloc()
    flush_denormals()  # as the CLI does, before torch's first parallel operation
    info = mixlab.model_info(args.model)
    size = args.img_size or info.input_size[1]
    seg = info.task == "segmentation"
    torch.manual_seed(0)
    base = mixlab.create_model(args.model, num_classes=1 if seg else args.num_classes)
    x = torch.randn(args.batch_size, getattr(base, "in_chans", 3), size, size)
    if seg:
        from mixlab.seg.losses import BCEDiceLoss

        # mixlab's settings its BCE + Dice kernel (as `mixlab seg train` computes the loss), plain torch aten's
        y = (torch.rand(args.batch_size, 1, size, size) > 0.5).float()
        losses = {True: BCEDiceLoss(), False: BCEDiceLoss(fast=False)}
    else:
        y = torch.randint(0, args.num_classes, (args.batch_size,))
        losses = {True: nn.CrossEntropyLoss(), False: nn.CrossEntropyLoss()}
    # the optimizer (AdamW) as each side builds it: mixlab's settings torch's fused form, as `mixlab train`
    # builds it on the CPU (optimizer.fused=auto); plain torch's its default loop. One more row gives
    # mixlab's ops with torch's default loop, to tell the two apart.
    settings = [dict(precision=p, channels_last=cl, fast_depthwise=fd, fused_optimizer=fd, dense_conv=fd)
                for p, cl, fd in itertools.product(precisions, (True, False), (True, False))]
    settings.insert(1, dict(precision=precisions[0], channels_last=True, fast_depthwise=True, fused_optimizer=False,
                            dense_conv=True))
    # and one with mixlab's ops but aten's dense KxK convolution, to show that op's share
    settings.insert(2, dict(precision=precisions[0], channels_last=True, fast_depthwise=True, fused_optimizer=True,
                            dense_conv=False))
    steps, runs = [], []
    for s in settings:
        m = __import__("copy").deepcopy(base)
        n_fast = (use_fast_resample(m) + use_fast_depthwise(m) + sum(use_fast_gelu(m)) + use_fast_bn_relu(m) + use_fast_layernorm(m) + use_fast_pointwise(m)) if s["fast_depthwise"] else 0
        if s["dense_conv"] and s["fast_depthwise"]:
            n_fast += use_fast_dense_conv(m)
        if s["fast_depthwise"] and n_fast == 0:
            continue  # no eligible depthwise convolution or GELU: the same as the aten setting
        fmt = torch.channels_last if s["channels_last"] else torch.contiguous_format
        m = m.to(memory_format=fmt).train()
        xs = x.contiguous(memory_format=fmt)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-6, **({"fused": True} if s["fused_optimizer"] else {}))
        step = TrainStep(m, opt, losses[s["fast_depthwise"]], "cpu", s["precision"])
        for _ in range(2):
            step(xs, y)
        t0 = time.perf_counter()
        step(xs, y)
        n = max(1, round(args.window_seconds / (time.perf_counter() - t0)))
        steps.append((s, step, xs, n))
        runs.append([])
        print(f"  warmed up {label(s)} ({n} steps per window)", file=sys.stderr, flush=True)
    for _ in range(args.rounds):
        for i, (s, step, xs, n) in enumerate(steps):
            t0 = time.perf_counter()
            for _ in range(n):
                step(xs, y)
            runs[i].append(n * args.batch_size / (time.perf_counter() - t0))
    rows = [dict(label(s), **s, images_per_sec=statistics.median(r), min=min(r), max=max(r))
            for (s, *_), r in zip(steps, runs)]
    plain = max(r["images_per_sec"] for r in rows if not r["fast_depthwise"])
    print(f"{args.model}: train step, batch {args.batch_size}, {size}x{size}, {torch.get_num_threads()} threads, "
          f"{cpu_model_name()}, torch {torch.__version__}")
    for r in sorted(rows, key=lambda r: -r["images_per_sec"]):
        r["ratio_to_best_plain"] = r["images_per_sec"] / plain
        print(f"  {r['label']:52s} {r['images_per_sec']:8.1f} images/s (min {r['min']:.1f}, max {r['max']:.1f})  "
              f"{r['ratio_to_best_plain']:.2f}x the best plain-torch setting")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        out = dict(command="python " + " ".join([sys.argv[0], *sys.argv[1:]]), commit=commit, cpu=cpu_model_name(),
                   threads=torch.get_num_threads(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                   model=args.model, batch_size=args.batch_size, img_size=size, rows=rows)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


def label(s: dict) -> dict:
    ops = "mixlab ops" if s["fast_depthwise"] else "aten"
    if s["fast_depthwise"] and not s["fused_optimizer"]:
        ops += ", torch's default AdamW"
    if s["fast_depthwise"] and not s["dense_conv"]:
        ops += ", aten's dense conv"
    return dict(label=f"{s['precision']}, {'channels_last' if s['channels_last'] else 'NCHW'}, {ops}")


if __name__ == "__main__":
    main()
