"""The weight (and bias) gradient of a model's dense KxK convolutions on the CPU: aten's
convolution backward against mixlab.ops.dense_conv's gathered matrix product (``im2col``), timed
as that op times them (interleaved rounds, best of each), at the shapes the layers see in a
training step, with each one's largest difference from an fp64 reference, the forward and the
input gradient for scale, and the totals.

    python benchmarks/bench_dense_conv.py --model convmlp_s --batch-size 32 [--img-size 224] \
        [--precision fp32] [--rounds 3] [--json out.json]

Run it alone on the machine.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import mixlab
from mixlab.ops import dense_conv as dc
from mixlab.ops.kernel_build import time_each
from mixlab.runtime import flush_denormals, tune_malloc
from layer_floor import DTYPES, layer_inputs  # benchmarks/ (run as python benchmarks/...)
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
    info = mixlab.model_info(args.model)
    size = args.img_size or info.input_size[1]
    torch.manual_seed(0)
    model = mixlab.create_model(args.model, **({"num_classes": 1} if info.task == "segmentation" else {}))
    x0 = torch.randn(args.batch_size, getattr(model, "in_chans", 3), size, size)
    dt = DTYPES[args.precision]
    head = provenance_fields()
    print(", ".join(f"{k} {v}" for k, v in head.items()))
    print(f"{'layer':36s} {'input':22s} {'fwd':>7s} {'dgrad':>7s} {'aten':>7s} {'im2col':>7s}  ms (weight + bias "
          "gradient); speed-up; largest |error| of dW against fp64 relative to its largest entry (aten / im2col)")
    rows = []
    for name, m, shape in layer_inputs(model, x0):
        if not (isinstance(m, nn.Conv2d) and dc._eligible(m)):
            continue
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(dt).contiguous(memory_format=torch.channels_last)
        w = m.weight.detach().to(dt).contiguous(memory_format=torch.channels_last)
        conv = (list(m.stride), list(m.padding), list(m.dilation))
        y = F.conv2d(x, w, None, *conv)
        dy = torch.randn(y.shape, generator=g).to(dt).contiguous(memory_format=torch.channels_last)
        bias = m.bias is not None
        runs = {meth: (lambda meth=meth: dc._weight_grad(meth, x, dy, w, *conv, bias)) for meth in dc.METHODS}
        times = time_each(runs, args.rounds)
        scale = time_each({"fwd": lambda: F.conv2d(x, w, None, *conv),
                           "dgrad": lambda: torch.ops.aten.convolution_backward(
                               dy, x, w, None, *conv, False, [0, 0], 1, [True, False, False])}, args.rounds)
        ref = torch.ops.aten.convolution_backward(dy.double(), x.double(), w.double(), None, *conv, False, [0, 0], 1,
                                                  [False, True, False])[1]
        errs = {meth: ((run()[0].double() - ref).abs().max() / ref.abs().max()).item() for meth, run in runs.items()}
        r = dict(layer=name, input=list(shape), weight=list(w.shape), stride=conv[0], padding=conv[1],
                 dilation=conv[2], ms={k: 1000 * v for k, v in {**times, **scale}.items()}, rel_err=errs,
                 fastest=min(times, key=times.get))
        rows.append(r)
        print(f"{name:36s} {str(tuple(shape)):22s} " + " ".join(f"{r['ms'][k]:7.1f}" for k in ("fwd", "dgrad", "aten", "im2col"))
              + f"  x{times['aten'] / times['im2col']:.2f}; " + " / ".join(f"{errs[k]:.1e}" for k in dc.METHODS),
              flush=True)
    tot = {k: sum(r["ms"][k] for r in rows) for k in ("fwd", "dgrad", "aten", "im2col")}
    best = sum(min(r["ms"]["aten"], r["ms"]["im2col"]) for r in rows)
    print(f"{args.model}, batch {args.batch_size}, {size}x{size}, {args.precision} channels_last, {len(rows)} dense "
          f"KxK convolutions: weight gradients {tot['aten']:.1f} ms (aten) against {best:.1f} ms (the faster of the two "
          f"for each layer, as mixlab.ops.dense_conv picks); forwards {tot['fwd']:.1f} ms, input gradients "
          f"{tot['dgrad']:.1f} ms")
    if args.json:
        from mixlab.io import atomic_write_json

        atomic_write_json(args.json, dict(head, model=args.model, batch_size=args.batch_size, img_size=size,
                                          precision=args.precision, rows=rows, total_ms=tot, picked_weight_grad_ms=best))


if __name__ == "__main__":
    main()
