"""A 1x1 convolution whose weight gradient is mixlab's kernel or a matrix product on the CPU.

The weight gradient of a 1x1 convolution on a channels_last map is one matrix product: the
output gradient (N*H*W, C_out) transposed times the input (N*H*W, C_in), summed over the long
dimension. aten computes it (with the bias gradient) through oneDNN's convolution backward at
well below the speed of the layer's forward: bf16, 2 EPYC cores, Conv2Former-N's layers at
490-820 GFLOP/s where their forwards run at 820-930. Three methods, the first backward of each
shape timing them and keeping the fastest (stored per CPU, torch version and threads in the
kernel cache folder, as the other ops' choices are):

* ``aten``: oneDNN's convolution backward;
* ``mm``: ``torch.mm`` (and the bias gradient as a matrix-vector product): faster than aten's on
  4x4 maps (Conv2Former-N's last stage);
* ``kernel``: ``pointwise_kernels.cpp`` (bf16 with AVX512-BF16, channel counts multiples of 16):
  both operands packed a chunk of rows at a time into the layout of the CPU's bf16 dot-product
  instruction while the next chunk is prefetched, the bias gradient summed from the packed rows,
  fp32 accumulation and an fp32 result (aten's and ``mm``'s are rounded to bf16): 1.2-1.4x
  aten's speed on Conv2Former-N's layers (``benchmarks/bench_pointwise.py``). Built at first use
  as the other kernels are; where it cannot be built or run, the other two remain.

The forward and the input gradient are aten's, unchanged.

:func:`use_fast_pointwise` switches a model's 1x1 ``nn.Conv2d`` layers (stride 1, no padding,
one group, zero padding mode, no hooks) to :class:`PointwiseConv2d` in place (same parameters
and state_dict keys); :func:`restore_pointwise` switches them back. Anything but a CPU tensor in
channels_last of fp32 or bf16 that needs a gradient runs ``F.conv2d`` unchanged.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .depthwise import _is_nhwc
from .kernel_build import KernelLibrary, Plan, time_each
from .module_swap import by_exact_type, swap_classes

__all__ = ["PointwiseConv2d", "use_fast_pointwise", "restore_pointwise", "set_pointwise_method",
           "pointwise_weight_grad", "fast_pointwise_available"]

_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
LIBRARY = KernelLibrary(
    Path(__file__).with_name("pointwise_kernels.cpp"), "mixlab_pointwise", "1x1 convolution weight-gradient",
    ("mixlab_pointwise_abi_version", 1),
    {"mixlab_pointwise_has_dot": (_I, []),
     "mixlab_pointwise_weight_grad_bf16": (_I, [_P, _P, _P, _P, _L, _L, _L, _I])},
    "MIXLAB_FAST_POINTWISE_BUILD", "the 1x1 convolutions' weight gradients run as aten's or torch.mm's products")

_DTYPES = (torch.float32, torch.bfloat16)
PLAN = Plan("pointwise_plan", identity=lambda: LIBRARY.source_text())
_method_override: str | None = None
METHODS = ("aten", "mm", "kernel")


def fast_pointwise_available() -> bool:
    """Whether the compiled weight-gradient kernel is loaded (building it on first call) and this
    CPU runs it (AVX512-BF16)."""
    lib = LIBRARY.load()
    return lib is not None and bool(lib.mixlab_pointwise_has_dot())


def _kernel_applies(x: torch.Tensor, g: torch.Tensor) -> bool:
    return (x.device.type == g.device.type == "cpu" and x.dtype == g.dtype == torch.bfloat16
            and x.shape[1] % 16 == 0 and g.shape[1] % 16 == 0 and fast_pointwise_available())


def pointwise_weight_grad(x_rows: torch.Tensor, g_rows: torch.Tensor, with_bias: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel's ``(g_rows^T @ x_rows, g_rows.sum(0))`` in fp32 for bf16 rows ``x_rows`` (M, C_in) and
    ``g_rows`` (M, C_out), channel counts multiples of 16, on a CPU with AVX512-BF16 (see
    :func:`fast_pointwise_available`)."""
    if x_rows.dim() != 2 or g_rows.dim() != 2 or x_rows.shape[0] != g_rows.shape[0]:
        raise ValueError(f"pointwise_weight_grad wants (M, C_in) and (M, C_out) rows, got "
                         f"{tuple(x_rows.shape)} and {tuple(g_rows.shape)}")
    if not _kernel_applies(x_rows, g_rows):
        raise ValueError("pointwise_weight_grad runs bf16 CPU rows with channel counts that are multiples of 16 on "
                         "a CPU with AVX512-BF16 and a built kernel; got "
                         f"{x_rows.dtype} {tuple(x_rows.shape)} on {x_rows.device} and {g_rows.dtype} "
                         f"{tuple(g_rows.shape)} on {g_rows.device} "
                         f"(kernel: {LIBRARY.unavailable_reason() or 'built'})")
    x_rows, g_rows = x_rows.contiguous(), g_rows.contiguous()
    m, ci = x_rows.shape
    co = g_rows.shape[1]
    gw = torch.empty(co, ci, dtype=torch.float32)
    gb = torch.empty(co, dtype=torch.float32) if with_bias else None
    rc = LIBRARY.load().mixlab_pointwise_weight_grad_bf16(
        x_rows.data_ptr(), g_rows.data_ptr(), gw.data_ptr(), gb.data_ptr() if with_bias else None, m, ci, co,
        torch.get_num_threads())
    if rc not in (0, 1):
        raise RuntimeError(f"the 1x1 weight-gradient kernel refused its arguments (code {rc})")
    LIBRARY.check(rc)
    return gw, gb


def set_pointwise_method(method: str | None) -> None:
    """Force one weight-gradient method ('aten', 'mm' or 'kernel') for every call; None
    (default) times them per shape. 'kernel' where the kernel does not apply (see
    :func:`pointwise_weight_grad`) runs 'aten'."""
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
    if method == "kernel":
        gw, gb = pointwise_weight_grad(x2, g2, with_bias)
        return gw.view(w.shape), gb
    gw = g2.t() @ x2
    gb = torch.mv(g2.t(), g2.new_ones(g2.shape[0])) if with_bias else None
    return gw.view(w.shape), gb


def _choose(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, with_bias: bool) -> str:
    if torch.compiler.is_compiling():
        return "aten"
    if _method_override is not None:
        return "aten" if _method_override == "kernel" and not _kernel_applies(x, g) else _method_override
    kernel_ok = _kernel_applies(x, g)
    # whether the kernel could run is part of the key: a choice made without it is timed again where it can
    key = (f"{tuple(x.shape)}|{tuple(w.shape)}|{str(x.dtype)[6:]}|bias{int(with_bias)}|"
           f"t{torch.get_num_threads()}|k{int(kernel_ok)}")
    candidates = [m for m in METHODS if m != "kernel" or kernel_ok]
    return PLAN.fastest(key, candidates, lambda: time_each(
        {m: (lambda m=m: _weight_grad(m, x, g, w, with_bias)) for m in candidates}))


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
