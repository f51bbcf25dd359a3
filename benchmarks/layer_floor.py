"""How much of a training step its dense convolutions and linear layers alone take: each one
timed by itself at the shape it sees in the step (forward, then backward), bf16 (or
``--precision fp32``) and channels-last as `mixlab train` runs them on the CPU, summed. These
are matrix products that aten (oneDNN, MKL) runs near the CPU's peak; what the step spends beyond their sum is everything else
(depthwise convolutions, normalisation, activations, resampling, losses, the optimizer, copies):
the part that mixlab's kernels and fusions can shrink. Grouped (e.g. depthwise) convolutions are
left out of the sum and counted.

    python benchmarks/layer_floor.py --model convmlp_s --batch-size 32 [--img-size 224] [--precision fp32] [--json out.json]

Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn

import mixlab
from mixlab.runtime import flush_denormals, tune_malloc
from bench_layernorm import best_ms  # benchmarks/ (run as python benchmarks/...)
from text_report import provenance_fields


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def layer_inputs(model: nn.Module, x: torch.Tensor) -> list:
    """(name, module, input shape) of every Conv2d and Linear, in call order (a training-mode
    forward: in evaluation UNeXt folds BatchNorm into its convolutions and calls them functionally)."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.append((n, m, tuple(i[0].shape))))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def model_and_input(name: str, batch_size: int, img_size: int | None) -> tuple[nn.Module, torch.Tensor, int]:
    """The registered model (one output channel for a segmentation model), seeded, a random batch
    of its input, and the side (``img_size`` or the model's own)."""
    info = mixlab.model_info(name)
    size = img_size or info.input_size[1]
    torch.manual_seed(0)
    model = mixlab.create_model(name, **({"num_classes": 1} if info.task == "segmentation" else {}))
    return model, torch.randn(batch_size, getattr(model, "in_chans", 3), size, size), size


def time_layer(m: nn.Module, shape: tuple, first: bool, repeats: int, dt: torch.dtype = torch.bfloat16) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dt)
    w = m.weight.detach().to(dt)
    b = m.bias.detach().to(dt).requires_grad_() if m.bias is not None else None
    if isinstance(m, nn.Conv2d):
        x = x.contiguous(memory_format=torch.channels_last)
        w = w.contiguous(memory_format=torch.channels_last)

        def fwd():
            return F.conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)
        k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
    else:
        def fwd():
            return F.linear(x, w, b)
        k = m.in_features
    x.requires_grad_(not first)  # the first layer's input (the image) needs no gradient
    w.requires_grad_()
    y = fwd()
    dy = torch.randn(y.shape, generator=g).to(dt).contiguous(memory_format=torch.channels_last if y.dim() == 4
                                                              else torch.contiguous_format)
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    flops = 2 * y.numel() * k * (1 + (2 if x.requires_grad else 1))
    return dict(fwd_ms=best_ms(fwd, repeats),
                bwd_ms=best_ms(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True), repeats), gflop=flops / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--img-size", type=int)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                    help="fp32 on a CPU without native bf16 (where `mixlab train` picks fp32)")
    ap.add_argument("--json")
    args = ap.parse_args()
    tune_malloc()
    flush_denormals()
    model, x, size = model_and_input(args.model, args.batch_size, args.img_size)
    head = provenance_fields()
    print(", ".join(f"{k} {v}" for k, v in head.items()))
    rows, grouped = [], 0
    for i, (name, m, shape) in enumerate(layer_inputs(model, x)):
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            grouped += 1
            continue
        r = dict(layer=name, kind=type(m).__name__, input=list(shape), **time_layer(m, shape, i == 0, args.repeats,
                                                                                     DTYPES[args.precision]))
        rows.append(r)
        print(f"  {name:44s} {str(shape):24s} fwd {r['fwd_ms']:6.2f}  bwd {r['bwd_ms']:6.2f} ms", flush=True)
    fwd, bwd, gflop = (sum(r[k] for r in rows) for k in ("fwd_ms", "bwd_ms", "gflop"))
    print(f"{args.model}, batch {args.batch_size}, {size}x{size}, {args.precision} channels_last: {len(rows)} dense conv/linear "
          f"layers ({grouped} grouped convolutions left out) alone take {fwd:.1f} ms forward + {bwd:.1f} ms backward = {fwd + bwd:.1f} ms a step "
          f"({gflop:.1f} GFLOP, {gflop / (fwd + bwd) * 1e3:.0f} GFLOP/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(**head, model=args.model, precision=args.precision, batch_size=args.batch_size, img_size=size, rows=rows,
                           grouped_convs_left_out=grouped,
                           total_fwd_ms=fwd, total_bwd_ms=bwd, gflop=gflop), f, indent=2)


if __name__ == "__main__":
    main()
