"""A model's dense KxK convolutions on the CPU, forward and backward, by each method of
mixlab.ops.dense_conv: aten's; aten's forward and input gradient with the gathered weight gradient
(``im2col``); Winograd's F(4x4, 3x3) for fp32 3x3 stride-1 layers (mixlab.ops.winograd). Timed as
that op times them (interleaved rounds, best of each), at the shapes the layers see in a training
step, with each result's largest difference from an fp64 reference, and the totals.

    python benchmarks/bench_dense_conv.py --model convmlp_s --batch-size 32 [--img-size 224] \
        [--precision fp32] [--rounds 3] [--json out.json]

Run it alone on the machine.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from mixlab.ops import dense_conv as dc
from mixlab.ops.kernel_build import time_each
from mixlab.runtime import flush_denormals, tune_malloc
from layer_floor import DTYPES, layer_inputs, model_and_input  # benchmarks/ (run as python benchmarks/...)
from text_report import provenance_fields


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--img-size", type=int)
    ap.add_argument("--precision", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    tune_malloc()
    flush_denormals()
    model, x0, size = model_and_input(args.model, args.batch_size, args.img_size)
    dt = DTYPES[args.precision]
    head = provenance_fields()
    print(", ".join(f"{k} {v}" for k, v in head.items()))
    print(f"{'layer':36s} {'input':22s} | forward: {'aten':>7s} {'wino':>7s} | backward: {'aten':>7s} {'im2col':>7s} "
          f"{'wino':>7s} | ms; then the largest |error| of the output, dx, dW against fp64, relative to each one's "
          "largest entry, for aten / im2col / winograd")
    rows = []
    for i, (name, m, shape) in enumerate(layer_inputs(model, x0)):
        if not (isinstance(m, nn.Conv2d) and dc._eligible(m)):
            continue
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(dt).contiguous(memory_format=torch.channels_last)
        w = m.weight.detach().to(dt).contiguous(memory_format=torch.channels_last)
        b = m.bias.detach().to(dt) if m.bias is not None else None
        conv = (list(m.stride), list(m.padding), list(m.dilation))
        dy = torch.randn(F.conv2d(x, w, b, *conv).shape, generator=g).to(dt).contiguous(memory_format=torch.channels_last)
        input_grad = i > 0  # the image needs no gradient
        wino = dc._winograd_ok(x, w, *conv)
        fwd = {meth: (lambda meth=meth: dc._forward(meth, x, w, b, *conv)) for meth in dc.FORWARD_METHODS
               if meth != "winograd" or wino}
        bwd = {meth: (lambda meth=meth: dc._backward(meth, x, dy, w, *conv, input_grad, True, b is not None))
               for meth in dc.METHODS if meth != "winograd" or wino}
        t_fwd, t_bwd = time_each(fwd, args.rounds), time_each(bwd, args.rounds)
        xr, wr = x.double().requires_grad_(input_grad), w.double().requires_grad_()
        y64 = F.conv2d(xr, wr, b.double() if b is not None else None, *conv)
        y64.backward(dy.double())

        def rel(a, ref):
            return None if a is None else ((a.double() - ref).abs().max() / ref.abs().max()).item()

        errs = {meth: dict(y=rel(fwd.get(meth, fwd["aten"])(), y64.detach()) if meth != "im2col" else None,
                           dx=rel(out[0], xr.grad) if input_grad else None, dw=rel(out[1], wr.grad))
                for meth, run in bwd.items() for out in [run()]}
        r = dict(layer=name, input=list(shape), weight=list(w.shape), stride=conv[0], padding=conv[1],
                 dilation=conv[2], input_grad=input_grad, forward_ms={k: 1000 * v for k, v in t_fwd.items()},
                 backward_ms={k: 1000 * v for k, v in t_bwd.items()}, rel_err=errs,
                 forward_fastest=min(t_fwd, key=t_fwd.get), backward_fastest=min(t_bwd, key=t_bwd.get))
        rows.append(r)

        def ms(d, k):
            return f"{1000 * d[k]:7.1f}" if k in d else f"{'-':>7s}"

        print(f"{name:36s} {str(tuple(shape)):22s} |          {ms(t_fwd, 'aten')} {ms(t_fwd, 'winograd')} |           "
              f"{ms(t_bwd, 'aten')} {ms(t_bwd, 'im2col')} {ms(t_bwd, 'winograd')} | "
              + "; ".join(f"{k} " + "/".join("-" if errs[meth][k] is None else f"{errs[meth][k]:.0e}" for meth in errs)
                          for k in ("y", "dx", "dw")), flush=True)
    aten = sum(r["forward_ms"]["aten"] + r["backward_ms"]["aten"] for r in rows)
    picked = sum(min(r["forward_ms"].values()) + min(r["backward_ms"].values()) for r in rows)
    print(f"{args.model}, batch {args.batch_size}, {size}x{size}, {args.precision} channels_last, {len(rows)} dense "
          f"KxK convolutions, forward + backward: {aten:.1f} ms with aten's, {picked:.1f} ms with the fastest method "
          f"for each (as mixlab.ops.dense_conv picks): {aten / picked:.2f}x")
    if args.json:
        from mixlab.io import atomic_write_json

        atomic_write_json(args.json, dict(head, model=args.model, batch_size=args.batch_size, img_size=size,
                                          precision=args.precision, rows=rows, aten_ms=aten, picked_ms=picked))


if __name__ == "__main__":
    main()
