"""mixlab's LayerNorm kernel for the CPU (``layernorm_kernels.cpp``): forward and backward over
the last, contiguous dimension.

Conv2Former normalises every block's input with a channels-first LayerNorm (timm's
``LayerNorm2d``: on a channels_last map the permuted NHWC view is contiguous, so each pixel's
channels are one row), ConvMLP and UNeXt their tokens with ``nn.LayerNorm``. The rows are short
(64-512 values) and aten's CPU LayerNorm is bound by its per-row work: in bf16 on 2 EPYC cores
a 262144 x 64 tensor took 6.9 ms forward and 6.0 ms backward, against 3.7 and 2.7 ms here
(``benchmarks/bench_layernorm.py``). The kernel also sums the weight and bias gradients in fp32
blocks and fp64 totals: aten's bf16 LayerNorm sums them in a way that left them 4e-1 (relative)
from an fp64 reference on that tensor, where these are within 3e-7.

Scope: fp32 or bf16 input on the CPU, normalised over its last dimension only, dense rows;
weight and bias of any float dtype (computed in fp32, gradients returned in their dtype) or
None. Anything else (CUDA, fp16, several normalised dimensions, a strided view, and anything
under ``torch.compile``, whose inductor fuses LayerNorm itself) runs ``F.layer_norm`` unchanged. The first call of each new shape times the kernel against aten
(forward and backward) and keeps the faster, stored per CPU, torch version and thread count in
the kernel cache folder, as the GELU kernels' choice is.

:func:`use_fast_layernorm` switches a model in place: every ``nn.LayerNorm`` (exactly that class)
becomes a :class:`FastLayerNorm` and every timm ``LayerNorm2d`` a :class:`FastLayerNorm2d` (same
parameters and state_dict keys; ``isinstance`` against the original class holds);
:func:`restore_layernorm` undoes it.
"""
from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from .kernel_build import KernelLibrary, Plan, dtype_suffix, time_training_calls
from .module_swap import by_exact_type, swap_classes

__all__ = ["layer_norm", "FastLayerNorm", "FastLayerNorm2d", "use_fast_layernorm", "restore_layernorm",
           "fast_layernorm_available"]

_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
_SIGS = {}
for _t in ("f32", "bf16"):
    _SIGS[f"mixlab_ln_fwd_{_t}"] = (_I, [_P, _P, _P, _P, _P, _P, _L, _L, ctypes.c_float, _I])
    _SIGS[f"mixlab_ln_bwd_{_t}"] = (_I, [_P, _P, _P, _P, _P, _P, _P, _P, _L, _L, _I])

LIBRARY = KernelLibrary(
    Path(__file__).with_name("layernorm_kernels.cpp"), "mixlab_layernorm", "LayerNorm",
    ("mixlab_ln_abi_version", 1), _SIGS, "MIXLAB_FAST_LAYERNORM_BUILD",
    "LayerNorm runs as aten's operation (correct, slower)",
    extra_flags=("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ())

_DTYPES = (torch.float32, torch.bfloat16)


def fast_layernorm_available() -> bool:
    """Whether the compiled kernel is loaded (building it on first call)."""
    return LIBRARY.load() is not None



# ----------------------------------------------------------------------------- the two ops
# Registered ops (not bare Python calls): one opaque node each for a tracer that reaches them (under
# torch.compile the functions below run aten's operations instead, which inductor fuses itself).

@torch.library.custom_op("mixlab::layer_norm_forward", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, mean, rstd of a contiguous x normalised over its last dimension; weight and bias fp32
    of that size. mean and rstd: fp32, one per row."""
    c = x.shape[-1]
    m = x.numel() // c
    y = torch.empty_like(x)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32)
    getattr(LIBRARY.load(), f"mixlab_ln_fwd_{dtype_suffix(x)}")(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(),
                                                         mean.data_ptr(), rstd.data_ptr(), m, c, eps,
                                                         torch.get_num_threads())
    return y, mean, rstd


@_forward_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32), x.new_empty(x.shape[:-1],
                                                                                              dtype=torch.float32)


@torch.library.custom_op("mixlab::layer_norm_backward", mutates_args=())
def _backward_op(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (x's dtype), dweight, dbias (fp32) of :func:`_forward_op`."""
    c = x.shape[-1]
    m = x.numel() // c
    dy = grad_out.to(x.dtype).contiguous()
    dx = torch.empty_like(x)
    dw = torch.empty(c, dtype=torch.float32)
    db = torch.empty(c, dtype=torch.float32)
    rc = getattr(LIBRARY.load(), f"mixlab_ln_bwd_{dtype_suffix(x)}")(x.data_ptr(), dy.data_ptr(), weight.data_ptr(),
                                                              mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
                                                              dw.data_ptr(), db.data_ptr(), m, c,
                                                              torch.get_num_threads())
    LIBRARY.check(rc)
    return dx, dw, db


@_backward_op.register_fake
def _(x, grad_out, weight, mean, rstd):
    c = x.shape[-1]
    return torch.empty_like(x), x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32)


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        w = weight.float().contiguous() if weight is not None else x.new_ones(x.shape[-1], dtype=torch.float32)
        b = bias.float().contiguous() if bias is not None else x.new_zeros(x.shape[-1], dtype=torch.float32)
        y, mean, rstd = _forward_op(x, w, b, eps)
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, w, mean, rstd = ctx.saved_tensors
        dx, dw, db = _backward_op(x, grad_y, w, mean, rstd)
        w_dtype, b_dtype = ctx.dtypes
        return (dx if ctx.needs_input_grad[0] else None,
                dw.to(w_dtype) if w_dtype is not None and ctx.needs_input_grad[1] else None,
                db.to(b_dtype) if b_dtype is not None and ctx.needs_input_grad[2] else None, None)


# ----------------------------------------------------------------------------- kernel or aten, per shape

_time_methods = time_training_calls  # (a module global: tests replace it)
PLAN = Plan("layernorm_plan", identity=lambda: LIBRARY.source_text())


def set_layernorm_method(method: str | None) -> None:
    """Force 'kernel' or 'aten' for every call; None (default) times both per shape."""
    PLAN.force(method, "LayerNorm")


def _runs(x: torch.Tensor, weight, bias, eps: float) -> dict:
    xs = x.detach().requires_grad_()
    ws = weight.detach().requires_grad_() if weight is not None else None
    bs = bias.detach().requires_grad_() if bias is not None else None
    dy = torch.randn_like(xs)
    shape = (x.shape[-1],)
    return {"kernel": lambda: _LayerNormFn.apply(xs, ws, bs, eps).backward(dy),
            "aten": lambda: F.layer_norm(xs, shape, ws, bs, eps).backward(dy)}


def _method(x: torch.Tensor, weight, bias, eps: float) -> str:
    wdt = str(weight.dtype)[6:] if weight is not None else "none"
    key = f"ln|{tuple(x.shape)}|{str(x.dtype)[6:]}|w{wdt}|t{torch.get_num_threads()}"
    return PLAN.kernel_or_aten(key, lambda: _runs(x, weight, bias, eps), _time_methods)


def _kernel_applies(x: torch.Tensor, normalized_shape, weight, bias) -> bool:
    c = x.shape[-1] if x.dim() else 0
    return (x.device.type == "cpu" and x.dtype in _DTYPES and len(tuple(normalized_shape)) == 1
            and c > 0 and tuple(normalized_shape)[0] == c and x.numel() > 0 and x.is_contiguous()
            and all(t is None or (t.device.type == "cpu" and t.is_floating_point() and t.shape == (c,))
                    for t in (weight, bias))
            and LIBRARY.load() is not None)


def layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)``, by the kernel on the CPU where
    :mod:`this module <mixlab.ops.layernorm>` says it can be (under autocast too: aten's CPU
    LayerNorm keeps the input's dtype there as well)."""
    # under torch.compile aten's LayerNorm goes to inductor, which fuses it itself (the checks
    # here would break the graph, and with dynamic shapes inductor then failed on the broken
    # graph's permuted outputs: Conv2Former-N, torch 2.14)
    if (torch.compiler.is_compiling() or not _kernel_applies(x, normalized_shape, weight, bias)
            or _method(x, weight, bias, eps) != "kernel"):
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    return _LayerNormFn.apply(x, weight, bias, eps)


# ----------------------------------------------------------------------------- modules

class FastLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed by :func:`layer_norm`; ``isinstance(m, nn.LayerNorm)`` holds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class FastLayerNorm2d(LayerNorm2d):
    """timm's ``LayerNorm2d`` (channels-first) computed by :func:`layer_norm`: on a channels_last
    map the NHWC view is contiguous (one row per pixel) and the output is channels_last too; an
    NCHW map goes to aten as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_fast_norm", False):  # timm's own fast path was asked for: keep it
            return super().forward(x)
        return layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                          self.eps).permute(0, 3, 1, 2)


_SWAPS = {nn.LayerNorm: FastLayerNorm, LayerNorm2d: FastLayerNorm2d}


def use_fast_layernorm(model: nn.Module) -> int:
    """Switch ``model``'s LayerNorms (exactly ``nn.LayerNorm`` or timm's ``LayerNorm2d``, not
    subclasses with their own forward) to the kernel, in place; parameters, buffers and
    state_dict keys stay. Returns how many were switched."""
    return swap_classes(model, by_exact_type(_SWAPS))


def restore_layernorm(model: nn.Module) -> int:
    """Undo :func:`use_fast_layernorm`; returns how many modules were switched back."""
    return swap_classes(model, by_exact_type({new: old for old, new in _SWAPS.items()}))
