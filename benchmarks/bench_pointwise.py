"""The weight (and bias) gradient of a 1x1 convolution on the CPU: aten's convolution backward,
a matrix product (``torch.mm``) and mixlab's kernel (where this CPU has AVX512-BF16), as
mixlab.ops.pointwise times them, for the 1x1 layers of the seed models (bf16, channels_last),
with each one's largest difference from an fp64 reference and its rate in GFLOP/s.

    python benchmarks/bench_pointwise.py [--rounds 5] [--json out.json]
"""
from __future__ import annotations

import argparse

import torch

from mixlab.ops import pointwise as pw
from mixlab.ops.kernel_build import time_each
from mixlab.runtime import flush_denormals, tune_malloc
from text_report import provenance_fields  # benchmarks/text_report.py (run as python benchmarks/...)

# (name, N, C_in, C_out, H=W)
LAYERS = [
    ("conv2former_n_cifar stage 1 (batch 256)", 256, 64, 64, 32),
    ("conv2former_n_cifar stage 1 fc1 (batch 256)", 256, 64, 128, 32),
    ("conv2former_n_cifar stage 1 fc2 (batch 256)", 256, 128, 64, 32),
    ("conv2former_n_cifar stage 2 (batch 256)", 256, 128, 128, 16),
    ("conv2former_n_cifar stage 3 (batch 256)", 256, 256, 256, 8),
    ("conv2former_n_cifar stage 3 fc1 (batch 256)", 256, 256, 512, 8),
    ("conv2former_n_cifar stage 4 (batch 256)", 256, 512, 512, 4),
    ("conv2former_n_cifar stage 4 fc1 (batch 256)", 256, 512, 1024, 4),
    ("conv2former_n_cifar stage 4 fc2 (batch 256)", 256, 1024, 512, 4),
    ("convmixer_256_8 (batch 128)", 128, 256, 256, 16),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    tune_malloc()
    flush_denormals()
    methods = [m for m in pw.METHODS if m != "kernel" or pw.fast_pointwise_available()]
    head = provenance_fields()
    print(", ".join(f"{k} {v}" for k, v in head.items()))
    print(f"{'layer':44s} " + " ".join(f"{m:>10s}" for m in methods) + "   (ms, weight + bias gradient; "
          "largest |error| of dW against fp64, relative to its largest entry)")
    rows = []
    for name, n, ci, co, hw in LAYERS:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, ci, hw, hw, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
        dy = torch.randn(n, co, hw, hw, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
        w = (torch.randn(co, ci, 1, 1, generator=g) / ci ** 0.5).bfloat16()
        times = time_each({m: (lambda m=m: pw._weight_grad(m, x, dy, w, True)) for m in methods}, args.rounds)
        ref = torch.einsum("nohw,nihw->oi", dy.double(), x.double())
        errs = {m: ((pw._weight_grad(m, x, dy, w, True)[0].double().view(co, ci) - ref).abs().max()
                    / ref.abs().max()).item() for m in methods}
        gflop = 2 * n * hw * hw * ci * co / 1e9
        r = dict(layer=name, n=n, c_in=ci, c_out=co, hw=hw, ms={m: 1000 * t for m, t in times.items()},
                 gflops={m: gflop / t for m, t in times.items()}, rel_err=errs, fastest=min(times, key=times.get))
        rows.append(r)
        print(f"{name:44s} " + " ".join(f"{1000 * times[m]:10.2f}" for m in methods)
              + f"   fastest {r['fastest']} ({r['gflops'][r['fastest']]:.0f} GFLOP/s); errors "
              + " / ".join(f"{errs[m]:.1e}" for m in methods), flush=True)
    if args.json:
        from mixlab.io import atomic_write_json

        atomic_write_json(args.json, dict(head, rows=rows))


if __name__ == "__main__":
    main()
