"""LayerNorm on the CPU over the last dimension: aten's against mixlab's kernel
(mixlab.ops.layernorm), forward and backward, with each one's largest difference from an fp64
reference, for the row shapes of the seed models (one training step's activations).

    python benchmarks/bench_layernorm.py [--repeats 11] [--json out.json]
"""
from __future__ import annotations

import argparse
import time

import torch

from mixlab.ops import layernorm as ln
from mixlab.runtime import flush_denormals, tune_malloc
from text_report import provenance_fields  # benchmarks/text_report.py (run as python benchmarks/...)

# (name, rows, width)
SHAPES = [
    ("conv2former_n_cifar stage 1 (batch 256)", 256 * 32 * 32, 64),
    ("conv2former_n_cifar stage 2 (batch 256)", 256 * 16 * 16, 128),
    ("conv2former_n_cifar stage 3 (batch 256)", 256 * 8 * 8, 256),
    ("conv2former_n_cifar stage 4 (batch 256)", 256 * 4 * 4, 512),
    ("convmlp_s stage 1 tokens (batch 32, 224px)", 32 * 56 * 56, 64),
    ("unext tokens (batch 8, 256px)", 8 * 32 * 32, 160),
]


def best_ms(fn, repeats: int) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1000 * best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--json")
    args = ap.parse_args()
    tune_malloc()
    flush_denormals()
    if not ln.fast_layernorm_available():
        raise SystemExit(f"the LayerNorm kernel is not available here: {ln.LIBRARY.unavailable_reason()}")
    rows = []
    head = provenance_fields()
    print(", ".join(f"{k} {v}" for k, v in head.items()))
    print(f"{'shape':44s} {'dtype':9s} {'fwd aten':>9s} {'kernel':>8s} {'bwd aten':>9s} {'kernel':>8s}  "
          f"dgamma rel. error aten / kernel")
    for name, m, c in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(m, c, generator=g) * 2 + 1).to(dtype)
            dy = torch.randn(m, c, generator=g).to(dtype)
            w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
            _, mean, rstd = torch.ops.aten.native_layer_norm(x, (c,), w, b, 1e-6)
            _, kmean, krstd = ln._forward_op(x, w, b, 1e-6)
            t = dict(
                fwd_aten=best_ms(lambda: torch.ops.aten.native_layer_norm(x, (c,), w, b, 1e-6), args.repeats),
                fwd_kernel=best_ms(lambda: ln._forward_op(x, w, b, 1e-6), args.repeats),
                bwd_aten=best_ms(lambda: torch.ops.aten.native_layer_norm_backward(
                    dy, x, (c,), mean, rstd, w, b, [True, True, True]), args.repeats),
                bwd_kernel=best_ms(lambda: ln._backward_op(x, dy, w, kmean, krstd), args.repeats))
            # dgamma against fp64 (the sum over every row)
            xd = x.double()
            xhat = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-6)
            ref = (dy.double() * xhat).sum(0)
            da = torch.ops.aten.native_layer_norm_backward(dy, x, (c,), mean, rstd, w, b, [True, True, True])[1]
            dk = ln._backward_op(x, dy, w, kmean, krstd)[1]
            rel = lambda v: ((v.double() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
            r = dict(shape=name, rows=m, width=c, dtype=str(dtype)[6:], **t, dgamma_rel_err_aten=rel(da),
                     dgamma_rel_err_kernel=rel(dk))
            rows.append(r)
            print(f"{name:44s} {r['dtype']:9s} {t['fwd_aten']:8.2f}  {t['fwd_kernel']:7.2f}  {t['bwd_aten']:8.2f}  "
                  f"{t['bwd_kernel']:7.2f}   {r['dgamma_rel_err_aten']:.1e} / {r['dgamma_rel_err_kernel']:.1e}",
                  flush=True)
    print("(ms, best of --repeats; the forward and backward ops alone, as one training step calls them)")
    if args.json:
        from mixlab.io import atomic_write_json

        atomic_write_json(args.json, dict(head, rows=rows))


if __name__ == "__main__":
    main()
