"""Depthwise convolution on the CPU: forward, input gradient and weight gradient, aten vs mixlab.

For the depthwise layers of the seed models (ConvMixer-256/8 5x5, Conv2Former-N CIFAR 11x11 on
its 32x32, 16x16, 8x8 and 4x4 maps, ConvMLP 3x3, UNeXt 3x3), in channels_last and NCHW, bf16 and
fp32: the median time of each part, and the weight gradient by aten (in the layer's dtype, and
upcast to fp32: the fallback) and by mixlab's kernel, with its largest difference from an fp64
reference; for channels_last, also mixlab's C++ forward and the input gradient as that forward
with the flipped kernel (where the CPU has AVX-512).

    python benchmarks/bench_depthwise.py [--repeats 7] [--json OUT.json]

Run it alone on the machine (other processes' threads distort every figure).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mixlab.ops.depthwise import (_aten_weight_grad, _kernel_forward, _kernel_forward_ok, depthwise_weight_grad,
                                  fast_depthwise_available, PLAN, set_weight_grad_method)
from mixlab.ops.depthwise_build import load_kernel
from mixlab.train.cpu_defaults import cpu_model_name

# (name, N, C, H, W, kernel)
LAYERS = [
    ("convmixer_256_8 block (batch 128)", 128, 256, 16, 16, 5),
    ("conv2former_n_cifar stage 1 (batch 256)", 256, 64, 32, 32, 11),
    ("conv2former_n_cifar stage 2 (batch 128)", 128, 128, 16, 16, 11),
    ("conv2former_n_cifar stage 3 (batch 128)", 128, 256, 8, 8, 11),
    ("conv2former_n_cifar stage 4 (batch 128)", 128, 512, 4, 4, 11),
    ("conv2former_n_cifar stage 1 MLP 3x3 (batch 256)", 256, 128, 32, 32, 3),
    ("conv2former_n_cifar stage 2 MLP 3x3 (batch 256)", 256, 256, 16, 16, 3),
    ("convmlp_s stage 1 dw (batch 64, 224px)", 64, 64, 56, 56, 3),
    ("unext encoder dw (batch 8, 256px)", 8, 160, 32, 32, 3),
]


def timed(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1000 * statistics.median(ts)


def forced(method: str, fn, repeats: int) -> float:
    set_weight_grad_method(method)
    try:
        return timed(fn, repeats)
    finally:
        set_weight_grad_method(None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    assert fast_depthwise_available(), "the kernel did not build; see the message above"
    rows = []
    for name, n, c, h, w, k in LAYERS:
        for dtype in (torch.bfloat16, torch.float32):
            for cl in (True, False):
                fmt = torch.channels_last if cl else torch.contiguous_format
                g = torch.Generator().manual_seed(0)
                x = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=fmt)
                wt = torch.randn(c, 1, k, k, generator=g).to(dtype)
                gy = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=fmt)
                p = k // 2

                def bwd(mask):
                    return torch.ops.aten.convolution_backward(gy, x, wt, None, [1, 1], [p, p], [1, 1], False,
                                                               [0, 0], c, mask)

                row = dict(layer=name, shape=[n, c, h, w], kernel=k, dtype=str(dtype).split(".")[-1],
                           channels_last=cl,
                           forward_ms=timed(lambda: F.conv2d(x, wt, None, 1, p, 1, c), args.repeats),
                           input_grad_ms=timed(lambda: bwd([True, False, False]), args.repeats),
                           aten_weight_grad_ms=timed(lambda: bwd([False, True, False]), args.repeats),
                           aten_fp32_weight_grad_ms=timed(lambda: _aten_weight_grad(x, gy, (k, k), (p, p), (1, 1)),
                                                          args.repeats),
                           kernel_weight_grad_ms=forced("kernel", lambda: depthwise_weight_grad(x, gy, k, p), args.repeats),
                           mixlab_weight_grad_ms=timed(lambda: depthwise_weight_grad(x, gy, k, p), args.repeats))
                lib = load_kernel()
                if _kernel_forward_ok(lib, x, (k, k), (1, 1)):
                    row["kernel_forward_ms"] = timed(lambda: _kernel_forward(lib, x, wt, None, (p, p), (1, 1)),
                                                     args.repeats)
                    row["kernel_input_grad_ms"] = timed(
                        lambda: _kernel_forward(lib, gy, wt.flip(2, 3), None, (k - 1 - p, k - 1 - p), (1, 1)),
                        args.repeats)
                row["mixlab_method"] = [v for key, v in PLAN.choices().items()
                                        if key.startswith(f"{(n, c, h, w)}|k{k}x{k}") and ("nhwc" if cl else "nchw") in key
                                        and str(dtype)[6:] in key][-1]
                ref = torch.ops.aten.convolution_backward(gy.double(), x.double(), wt.double(), None, [1, 1], [p, p],
                                                          [1, 1], False, [0, 0], c, [False, True, False])[1]
                got = depthwise_weight_grad(x, gy, k, p)
                row["mixlab_max_rel_err"] = float((got.double() - ref).abs().max() / ref.abs().max())
                row["speedup_vs_aten"] = row["aten_weight_grad_ms"] / row["mixlab_weight_grad_ms"]
                rows.append(row)
                kf = (f" (kernel {row['kernel_forward_ms']:6.2f})" if "kernel_forward_ms" in row else " " * 17)
                kd = (f" (kernel {row['kernel_input_grad_ms']:6.2f})" if "kernel_input_grad_ms" in row else " " * 17)
                print(f"{name:42s} {row['dtype']:8s} {'NHWC' if cl else 'NCHW'}  fwd {row['forward_ms']:7.2f}{kf}  "
                      f"dx {row['input_grad_ms']:7.2f}{kd}  dW aten {row['aten_weight_grad_ms']:8.2f} "
                      f"(fp32 {row['aten_fp32_weight_grad_ms']:7.2f})  kernel {row['kernel_weight_grad_ms']:7.2f}  "
                      f"mixlab {row['mixlab_weight_grad_ms']:7.2f} ms ({row['mixlab_method']}) "
                      f"[{row['speedup_vs_aten']:5.1f}x, rel err {row['mixlab_max_rel_err']:.1e}]", flush=True)
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        out = dict(command="python benchmarks/bench_depthwise.py " + (f"--json {args.json}"), commit=commit,
                   cpu=cpu_model_name(), threads=torch.get_num_threads(), torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d"), rows=rows)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
