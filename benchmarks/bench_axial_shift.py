"""Forward + backward time of mixlab.ops.axial_shift against the official roll formulation.

One iteration = what an AS-MLP block does with the shift: shift the same (N, C, H, W) map along
W and along H (shift size 5, zero padding), sum the two results, backpropagate a gradient of
ones. Default input (32, 96, 56, 56): the first stage of AS-MLP-T at batch 32.

    python benchmarks/bench_axial_shift.py                     # CPU, and CUDA when there is one
    python benchmarks/bench_axial_shift.py --device cpu --repeat 10 --channels-last

Reports the best and the median of ``--repeat`` timed iterations (after warm-up) in ms, and
images/s from the median. The two implementations are timed alternately, one iteration each in
turn, so that load from other processes on a shared machine falls on both alike. glibc's malloc
is tuned as the mixlab CLI does (``mixlab.runtime.tune_malloc``: large blocks stay in the
process instead of being page-faulted in again at every iteration); ``--no-malloc-tuning``
measures without.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mixlab.ops import axial_shift


def roll_shift(x, shift_size, dim, dilation=1, padding="zero"):
    """The roll version kept in the official AS-MLP repository (pad, chunk, roll, cat, crop)."""
    _, _, h, w = x.shape
    half = shift_size // 2
    pad = half * dilation
    x = F.pad(x, (pad, pad, pad, pad), mode="constant" if padding == "zero" else padding)
    xs = torch.chunk(x, shift_size, 1)
    x = torch.cat([torch.roll(c, (i - half) * dilation, dim) for i, c in enumerate(xs)], 1)
    return x[:, :, pad:pad + h, pad:pad + w]


def make_step(fn, x, shift_size, dilation, padding):
    x = x.detach().requires_grad_()

    def step():
        y = fn(x, shift_size, 3, dilation, padding) + fn(x, shift_size, 2, dilation, padding)
        y.backward(torch.ones_like(y))
        x.grad = None

    return step


def time_alternately(steps: dict, repeat: int, warmup: int, device) -> dict:
    """{label: (best ms, median ms)}, one iteration of each step in turn per round."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {label: [] for label in steps}
    for _ in range(repeat):
        for label, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[label].append(time.perf_counter() - t0)
    return {label: (min(t) * 1e3, statistics.median(t) * 1e3) for label, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", action="append", help="cpu / cuda (repeatable; default: cpu, and cuda if available)")
    p.add_argument("--shape", type=int, nargs=4, default=(32, 96, 56, 56), metavar=("N", "C", "H", "W"))
    p.add_argument("--shift-size", type=int, default=5)
    p.add_argument("--dilation", type=int, default=1)
    p.add_argument("--padding", default="zero", choices=("zero", "reflect", "replicate", "circular"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc's malloc thresholds alone")
    args = p.parse_args(argv)
    tuned = False
    if not args.no_malloc_tuning:
        from mixlab.runtime import tune_malloc

        tuned = tune_malloc()

    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; input {tuple(args.shape)} {args.dtype}"
          f"{' channels_last' if args.channels_last else ''}, shift {args.shift_size}, dilation {args.dilation}, "
          f"padding {args.padding}; malloc tuned: {tuned}; one iteration = W shift + H shift, forward + backward")
    print(f"{'device':<8} {'implementation':<16} {'best ms':>9} {'median ms':>10} {'images/s':>9} {'speed-up':>9}")
    for name in devices:
        device = torch.device(name)
        x = torch.randn(*args.shape, device=device, dtype=getattr(torch, args.dtype))
        if args.channels_last:
            x = x.to(memory_format=torch.channels_last)
        assert torch.equal(axial_shift(x, args.shift_size, 3, args.dilation, args.padding),
                           roll_shift(x, args.shift_size, 3, args.dilation, args.padding))
        steps = {label: make_step(fn, x, args.shift_size, args.dilation, args.padding)
                 for label, fn in (("roll (official)", roll_shift), ("mixlab", axial_shift))}
        results = time_alternately(steps, args.repeat, args.warmup, device)
        base_med = results["roll (official)"][1]
        for label, (best, med) in results.items():
            print(f"{name:<8} {label:<16} {best:>9.1f} {med:>10.1f} {args.shape[0] / med * 1e3:>9.0f} "
                  f"{base_med / med:>8.2f}x")


if __name__ == "__main__":
    main()
