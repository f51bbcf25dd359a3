"""A 1x1 convolution whose weight gradient is a matrix product on the CPU.

The weight gradient of a 1x1 convolution on a channels_last map is one matrix product: the
output gradient (N*H*W, C_out) transposed times the input (N*H*W, C_in). aten computes it (with
the bias gradient) through oneDNN's convolution backward, which on small maps runs well below
the product's speed: bf16, 2 EPYC cores, Conv2Former-N's last stage (256 x 512 x 4 x 4) 3.7
against 2.7 ms for 512 -> 512, 7.5 against 5.6 ms for 512 -> 1024 (``torch.mm``, and the bias
gradient as a matrix-vector product); on 8x8 and larger maps aten was faster
(``benchmarks/bench_pointwise.py``). So the first backward of each shape times both and keeps
the faster (stored per CPU, torch version and threads in the kernel cache folder, as the
depthwise op's choices are).

The forward and the input gradient are aten's, unchanged. The product runs in the computation's
dtype (bf16 under autocast) with fp32 accumulation and one rounding, as aten's does (a product
split in two halves was as fast but rounded twice: twice aten's error; not used).

:func:`use_fast_pointwise` switches a model's 1x1 ``nn.Conv2d`` layers (stride 1, no padding,
one group, zero padding mode, no hooks) to :class:`PointwiseConv2d` in place (same parameters
and state_dict keys); :func:`restore_pointwise` switches them back. Anything but a CPU tensor in
channels_last of fp32 or bf16 that needs a gradient runs ``F.conv2d`` unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .depthwise import _is_nhwc
from .kernel_build import Plan, time_each
from .module_swap import by_exact_type, swap_classes

__all__ = ["PointwiseConv2d", "use_fast_pointwise", "restore_pointwise", "set_pointwise_method"]

_DTYPES = (torch.float32, torch.bfloat16)
PLAN = Plan("pointwise_plan")
_method_override: str | None = None
METHODS = ("aten", "mm")


def set_pointwise_method(method: str | None) -> None:
    """Force one weight-gradient method ('aten' or 'mm') for every call; None
    (default) times them per shape."""
    global _method_override
    if method is not None and method not in METHODS:
        raise ValueError(f"pointwise method must be one of {METHODS} or None, got {method!r}")
    _method_override = method


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) channels_last as its (N*H*W, C) matrix (a view)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _weight_grad(method: str, x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, with_bias: bool):
    """(dweight (C_out, C_in, 1, 1), dbias or None) in x's dtype, by ``method``."""
    if method == "aten":
        _, gw, gb = torch.ops.aten.convolution_backward(g, x, w, [w.shape[0]] if with_bias else None, [1, 1], [0, 0],
                                                        [1, 1], False, [0, 0], 1, [False, True, with_bias])
        return gw, gb
    g2, x2 = _rows(g), _rows(x)
    gw = g2.t() @ x2
    gb = torch.mv(g2.t(), g2.new_ones(g2.shape[0])) if with_bias else None
    return gw.view(w.shape), gb


def _choose(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, with_bias: bool) -> str:
    if _method_override is not None:
        return _method_override
    if torch.compiler.is_compiling():
        return "aten"
    key = (f"{tuple(x.shape)}|{tuple(w.shape)}|{str(x.dtype)[6:]}|bias{int(with_bias)}|"
           f"t{torch.get_num_threads()}")
    method = PLAN.get(key)
    if method not in METHODS:
        times = time_each({m: (lambda m=m: _weight_grad(m, x, g, w, with_bias)) for m in METHODS})
        method = min(times, key=times.get)
        PLAN.set(key, method)
    return method


class _PointwiseConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, compute_dtype):
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(compute_dtype), weight.to(compute_dtype)
            out = F.conv2d(xc, wc, bias.to(compute_dtype) if bias is not None else None)
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        xc, wc = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad_out.to(xc.dtype).contiguous(memory_format=torch.channels_last)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(g, xc, wc, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                     [True, False, False])[0].to(x_dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            with_bias = bool(ctx.needs_input_grad[2])
            gw, gb = _weight_grad(_choose(xc, g, wc, with_bias), xc, g, wc, with_bias)
            gw = gw.to(w_dtype) if ctx.needs_input_grad[1] else None
            gb = gb.to(b_dtype) if with_bias else None
        return gx, gw, gb, None


def _applies(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dim() == 4 and _is_nhwc(x)


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` (stride 1, no padding, one group) whose weight gradient is the fastest
    of aten's and a matrix product on this machine; ``isinstance(m, nn.Conv2d)`` holds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if (not torch.is_grad_enabled() or not _applies(x) or dtype not in _DTYPES
                or not (x.requires_grad or self.weight.requires_grad)):
            return super().forward(x)
        return _PointwiseConv2dFn.apply(x, self.weight, self.bias, dtype)


def _eligible(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding in ((0, 0), 0)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"
            and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks))


def use_fast_pointwise(model: nn.Module) -> int:
    """Switch ``model``'s 1x1 convolutions to :class:`PointwiseConv2d` in place; returns how many."""
    return swap_classes(model, lambda m: PointwiseConv2d if _eligible(m) else None)


def restore_pointwise(model: nn.Module) -> int:
    """Undo :func:`use_fast_pointwise`; returns how many modules were switched back."""
    return swap_classes(model, by_exact_type({PointwiseConv2d: nn.Conv2d}))
