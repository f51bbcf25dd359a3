"""UNeXt's resampling layers on the CPU: aten's operations against mixlab's fused kernels
(mixlab.ops.resample), forward and forward + backward, bf16 (what a CPU run trains in) and fp32,
at the shapes of one training step (batch 8, 256x256).

    python benchmarks/bench_resample.py [--repeats 15] [--json out.json]

Each figure is the best of ``--repeats`` calls, the candidates taken in turn.
"""
from __future__ import annotations

import argparse
import json

import torch

from mixlab.ops import resample as rs
from mixlab.ops.kernel_build import time_each
from mixlab.runtime import flush_denormals, tune_malloc
from text_report import provenance_fields  # benchmarks/text_report.py (run as python benchmarks/...)

B = 8
# (layer, op, channels, input height = width)
LAYERS = [
    ("encoder1 (ebn1, 256x256 -> 128x128)", "pool", 16, 256),
    ("encoder2 (ebn2, 128x128 -> 64x64)", "pool", 32, 128),
    ("encoder3 (ebn3, 64x64 -> 32x32)", "pool", 128, 64),
    ("decoder2 (dbn2, 16x16 -> 32x32)", "up_add", 128, 16),
    ("decoder3 (dbn3, 32x32 -> 64x64)", "up_add", 32, 32),
    ("decoder4 (dbn4, 64x64 -> 128x128)", "up_add", 16, 64),
    ("head (128x128 -> 256x256, 1 class)", "head", 16, 128),
]


def best_ms(fns: dict, repeats: int) -> dict:
    """Best of ``repeats`` calls of each, in ms, taken in turn (one untimed call each first)."""
    return {k: 1000 * v for k, v in time_each(fns, rounds=repeats).items()}


def calls(op: str, c: int, hw: int, dtype: torch.dtype) -> dict:
    """{'aten': forward, 'kernel': forward} and the same with the backward, on fresh random inputs."""
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = (torch.randn(B, c, hw, hw, generator=g) * 2 + 0.5).to(dtype).contiguous(memory_format=cl).requires_grad_()
    if op == "head":
        w, b = torch.randn(1, c, 1, 1, generator=g).requires_grad_(), torch.randn(1, generator=g).requires_grad_()
        dy = torch.randn(B, 1, 2 * hw, 2 * hw, generator=g).to(dtype)
        wa, ba = w.to(dtype), b.to(dtype)  # aten's conv wants the input's dtype (autocast casts them so)
        fwd = dict(aten=lambda: rs._aten_up(x, wa, ba), kernel=lambda: rs._UpsampleReluConvFn.apply(x, w, b))
    else:
        w, b = (torch.rand(c, generator=g) + 0.5).requires_grad_(), torch.randn(c, generator=g).requires_grad_()
        if op == "pool":
            dy = torch.randn(B, c, hw // 2, hw // 2, generator=g).to(dtype).contiguous(memory_format=cl)
            fwd = dict(aten=lambda: rs._aten_pool(x, None, None, w, b, True, 0.0, 1e-5),
                       kernel=lambda: rs._BatchNormPoolReluFn.apply(x, w, b, 1e-5)[0])
        else:
            skip = torch.randn(B, c, 2 * hw, 2 * hw, generator=g).to(dtype).contiguous(memory_format=cl)
            skip.requires_grad_()
            dy = torch.randn(B, c, 2 * hw, 2 * hw, generator=g).to(dtype).contiguous(memory_format=cl)
            fwd = dict(aten=lambda: rs._aten_up_add(x, skip, None, None, w, b, True, 0.0, 1e-5),
                       kernel=lambda: rs._BatchNormUpsampleReluAddFn.apply(x, skip, w, b, 1e-5)[0])
    both = {k: (lambda f=f: f().backward(dy)) for k, f in fwd.items()}
    return fwd, both


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json")
    args = ap.parse_args()
    tune_malloc()
    flush_denormals()
    if not rs.fast_resample_available():
        raise SystemExit(f"the resampling kernel is not available here: {rs.LIBRARY.unavailable_reason()}")
    head = provenance_fields()
    print(", ".join(f"{k} {v}" for k, v in head.items()))
    print(f"{'layer (batch 8)':40s} {'dtype':9s} {'fwd aten':>9s} {'kernel':>8s} {'f+b aten':>9s} {'kernel':>8s}")
    rows, total = [], {}
    for name, op, c, hw in LAYERS:
        for dtype in (torch.bfloat16, torch.float32):
            fwd, both = calls(op, c, hw, dtype)
            f, fb = best_ms(fwd, args.repeats), best_ms(both, args.repeats)
            r = dict(layer=name, op=op, channels=c, size=hw, dtype=str(dtype)[6:], fwd_aten=f["aten"],
                     fwd_kernel=f["kernel"], fwd_bwd_aten=fb["aten"], fwd_bwd_kernel=fb["kernel"])
            rows.append(r)
            t = total.setdefault(r["dtype"], [0.0, 0.0])
            t[0], t[1] = t[0] + fb["aten"], t[1] + fb["kernel"]
            print(f"{name:40s} {r['dtype']:9s} {f['aten']:8.2f}  {f['kernel']:7.2f}  {fb['aten']:8.2f}  "
                  f"{fb['kernel']:7.2f}", flush=True)
    for dtype, (a, k) in total.items():
        print(f"all seven layers, {dtype}, forward + backward: aten {a:.2f} ms, kernels {k:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(**head, rows=rows,
                           total_fwd_bwd_ms={d: dict(aten=a, kernel=k) for d, (a, k) in total.items()}), f, indent=2)


if __name__ == "__main__":
    main()
