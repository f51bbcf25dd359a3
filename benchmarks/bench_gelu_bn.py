"""GELU then training-mode BatchNorm on the CPU: aten's two operations against mixlab's fused kernel.

For ConvMixer-256/8's activation (batch 128, 256 channels, 16x16, channels_last) and
ConvMixer-768/32's at ImageNet size (batch 8, 768 x 32 x 32), in bf16 and fp32: the median time of
the forward alone and of forward + backward, each path in the same process, alternating, and the
largest difference of the fused result from aten's.

    python benchmarks/bench_gelu_bn.py [--repeats 15] [--out FILE.txt]

Run it alone on the machine (other processes' threads distort every figure).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from mixlab.ops import gelu as gelu_ops
from mixlab.runtime import flush_denormals, tune_malloc
from text_report import emit, provenance  # benchmarks/text_report.py (run as python benchmarks/...)

SHAPES = [("convmixer_256_8 (batch 128)", (128, 256, 16, 16)), ("convmixer_768_32 (batch 8, 224 px)", (8, 768, 32, 32))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", help="also write the report there")
    args = ap.parse_args()
    tune_malloc()
    flush_denormals()  # as the CLI does, before torch's first parallel operation
    if not gelu_ops.fast_gelu_available():
        sys.exit(f"the fused kernel is not available here: {gelu_ops.LIBRARY.unavailable_reason()}")
    gelu_ops.set_gelu_method("kernel")
    lines = [*provenance(),
             f"{'shape':<36} {'dtype':<9} {'aten fwd':>9} {'fused fwd':>10} {'aten f+b':>9} {'fused f+b':>10} "
             f"{'f+b ratio':>9} {'max |fused - aten| / max |aten| (y, dx)':>40}"]
    torch.manual_seed(0)
    for name, shape in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            x = (torch.randn(shape) * 2).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
            w = (torch.rand(shape[1]) + 0.5).requires_grad_()
            b = torch.randn(shape[1]).requires_grad_()
            dy = torch.randn_like(x)

            def aten(backward):
                y = F.batch_norm(F.gelu(x), None, None, w, b, True, 0.1, 1e-5)
                if backward:
                    y.backward(dy)
                return y

            def fused(backward):
                y = gelu_ops.gelu_batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
                if backward:
                    y.backward(dy)
                return y

            errs = []
            for fn in (aten, fused):
                x.grad = None
                errs.append((fn(True).detach(), x.grad.clone()))
            err = [float((f.double() - a.double()).abs().max() / a.double().abs().max()) for a, f in zip(*errs)]
            times = {k: [] for k in ("aten0", "fused0", "aten1", "fused1")}
            for _ in range(args.repeats):
                for backward in (0, 1):
                    for label, fn in (("aten", aten), ("fused", fused)):
                        with torch.set_grad_enabled(bool(backward)):
                            t0 = time.perf_counter()
                            fn(backward)
                            times[f"{label}{backward}"].append(time.perf_counter() - t0)
            med = {k: 1000 * statistics.median(v) for k, v in times.items()}
            lines.append(f"{name:<36} {str(dtype)[6:]:<9} {med['aten0']:8.2f}ms {med['fused0']:9.2f}ms "
                         f"{med['aten1']:8.2f}ms {med['fused1']:9.2f}ms {med['aten1'] / med['fused1']:8.2f}x "
                         f"{err[0]:19.1e} {err[1]:9.1e}")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
