"""Where one training step of a model goes on this machine: ms per step, then torch.profiler's
operators by self time, eager and (``--compile``) under torch.compile.

    python benchmarks/profile_train_step.py --model convmixer_256_8 --batch-size 128 --img-size 32 \
        --precision bf16 [--compile] [--out FILE.txt]

The model gets the settings `mixlab train` would use on the CPU (channels_last, mixlab's fast
depthwise convolution) unless told otherwise; the step is mixlab's own (`mixlab.train.step.TrainStep`,
AdamW, cross-entropy). Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import mixlab
from mixlab.ops.depthwise import use_fast_depthwise
from mixlab.runtime import tune_malloc
from mixlab.train.cpu_defaults import cpu_model_name
from mixlab.train.step import TrainStep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--img-size", type=int, required=True)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--nchw", action="store_true", help="keep NCHW (default: channels_last)")
    ap.add_argument("--aten-depthwise", action="store_true", help="keep aten's depthwise convolution")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after 3 warm-up steps)")
    ap.add_argument("--rows", type=int, default=15, help="operators listed")
    ap.add_argument("--out", help="also write the report there")
    args = ap.parse_args()
    tune_malloc()
    torch.manual_seed(0)
    model = mixlab.create_model(args.model, num_classes=args.num_classes)
    if not args.aten_depthwise:
        use_fast_depthwise(model)
    fmt = torch.contiguous_format if args.nchw else torch.channels_last
    model = model.to(memory_format=fmt)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size).to(memory_format=fmt)
    y = torch.randint(0, args.num_classes, (args.batch_size,))
    net = torch.compile(model) if args.compile else model
    step = TrainStep(net, torch.optim.AdamW(model.parameters(), 1e-3), nn.CrossEntropyLoss(), "cpu", args.precision)
    for _ in range(3):  # warm-up (and the compile)
        step(x, y)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(x, y)
    seconds = (time.perf_counter() - start) / args.steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step(x, y)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"python {' '.join(sys.argv)}",
             f"commit {commit}, {cpu_model_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{datetime.date.today().isoformat()}",
             f"{args.model}: batch {args.batch_size}, {args.img_size} px, {args.precision}, "
             f"{'NCHW' if args.nchw else 'channels_last'}, {'aten' if args.aten_depthwise else 'fast'} depthwise conv, "
             f"{'compiled' if args.compile else 'eager'}: {1000 * seconds:.1f} ms/step, "
             f"{args.batch_size / seconds:.1f} images/s",
             "operators over 3 profiled steps (divide by 3 for one step):",
             prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
