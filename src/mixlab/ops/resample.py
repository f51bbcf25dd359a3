"""mixlab's resampling kernels for the CPU (``resample_kernels.cpp``): a training-mode BatchNorm
fused with the 2x2 max-pool and ReLU after it, a training-mode BatchNorm fused with the 2x bilinear
upsampling, ReLU and residual sum after it, and a 2x bilinear upsampling fused with the ReLU and
1x1 convolution after it.

UNeXt (:mod:`mixlab.models.unext`) runs ``relu(maxpool2(bn(conv(x))))`` in its three
convolutional encoder stages, ``relu(upsample2(bn(conv(x)))) + skip`` in its decoder stages and
ends with ``conv1x1(relu(upsample2(x)))`` at full resolution. In aten these are memory passes
over the model's largest maps (16 channels at 256x256 for a 256-pixel input): BatchNorm's two
passes each way, the pool and its int64 indices, the pool's scatter into a zeroed gradient,
ReLU's mask, the upsampled maps written and read back, and the 1x1 convolution's backward over
one. For UNeXt at batch 8, bf16, on 2 EPYC cores the seven layers take 31.8 ms forward and
backward in aten and 18.3 ms fused (``benchmarks/bench_resample.py``); the pooled stages'
backward reads only quarter-size arrays besides the input, and no upsampled map is written
where a 1x1 head follows.

Scope: fp32 or bf16 channels-last CPU tensors in training mode; even heights and widths for the
pool; a residual of the output's dtype and shape; a 1x1 convolution with stride 1, no padding
and groups 1 for the head. Anything else (NCHW, other dtypes, CUDA, evaluation,
``torch.compile``, whose inductor fuses aten's operations itself) runs aten's operations
unchanged. Each new shape is timed against aten once per machine (forward and backward) and the
faster kept, as the other kernels are.

:func:`use_fast_resample` switches the modules a model names in its ``resample_fusions``
attribute (UNeXt: the encoders' and decoders' BatchNorms and the head's 1x1 conv) to
:class:`PoolingBatchNorm2d`, :class:`UpsamplingBatchNorm2d` and :class:`UpsamplingConv2d`, which
behave exactly as ``nn.BatchNorm2d`` / ``nn.Conv2d`` when called and add the fused form as a
method the model calls; same parameters and state_dict. :func:`restore_resample` switches them back.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn
from torch.autograd.function import once_differentiable

from .gelu import batch_norm_args, update_running_stats
from .kernel_build import KernelLibrary, Plan, dtype_suffix, time_training_calls
from .module_swap import by_exact_type, fx_tracing, global_hooks, hooked, swap_classes

__all__ = ["fast_resample_available", "batch_norm_max_pool_relu", "batch_norm_upsample_relu_add", "upsample_relu_conv1x1",
           "PoolingBatchNorm2d", "UpsamplingBatchNorm2d", "UpsamplingConv2d",
           "use_fast_resample", "restore_resample", "set_resample_method"]

_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
_SIGS = {}
for _t in ("f32", "bf16"):
    _SIGS[f"mixlab_bn_stats_{_t}"] = (_I, [_P, _P, _L, _L, _P, _P, _I])
    _SIGS[f"mixlab_bn_pool_fwd_{_t}"] = (_I, [_P, _P, _P, _P, _P, _L, _L, _L, _L, _P, _P, _I])
    _SIGS[f"mixlab_bn_pool_bwd_stats_{_t}"] = (_I, [_P, _P, _P, _P, _L, _L, _P, _P, _I])
    _SIGS[f"mixlab_bn_pool_bwd_apply_{_t}"] = (_I, [_P, _P, _P, _P, _P, _L, _L, _L, _L, _P, _P, _P, _I])
    _SIGS[f"mixlab_up_conv_fwd_{_t}"] = (_I, [_P, _P, _P, _P, _L, _L, _L, _L, _L, _I])
    _SIGS[f"mixlab_up_conv_bwd_{_t}"] = (_I, [_P, _P, _P, _P, _P, _P, _L, _L, _L, _L, _L, _I])
    _SIGS[f"mixlab_bn_up_add_fwd_{_t}"] = (_I, [_P, _P, _P, _P, _P, _P, _L, _L, _L, _L, _I])
    _SIGS[f"mixlab_bn_up_add_bwd_{_t}"] = (_I, [_P, _P, _P, _P, _P, _P, _L, _L, _L, _L, _P, _P, _I])
    _SIGS[f"mixlab_bn_bwd_apply_{_t}"] = (_I, [_P, _P, _P, _P, _L, _L, _P, _P, _P, _I])

LIBRARY = KernelLibrary(
    Path(__file__).with_name("resample_kernels.cpp"), "mixlab_resample",
    "resampling (BatchNorm + max-pool + ReLU, BatchNorm + upsample + ReLU + residual, upsample + ReLU + 1x1 conv)",
    ("mixlab_resample_abi_version", 2), _SIGS, "MIXLAB_FAST_RESAMPLE_BUILD",
    "these layers run as aten's operations (correct, slower)")


def fast_resample_available() -> bool:
    """Whether the compiled kernel is loaded (building it on first call)."""
    return LIBRARY.load() is not None




def _sel_dtype(x: torch.Tensor) -> torch.dtype:
    # the kernel keeps window positions as wide as the data (its loops vectorise better so)
    return torch.int16 if x.dtype == torch.bfloat16 else torch.int32


def _is_nhwc(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- BatchNorm + max-pool + ReLU
# Registered ops: one opaque node each for a tracer that reaches them (under torch.compile the
# functions below run aten's operations instead).

def _batch_stats(lib, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                 stats: str = "mixlab_bn_stats"):
    """mean and biased variance per channel (fp64) of an NHWC ``x``, and BatchNorm's affine map
    about the mean as fp32 (center, scale, shift); ``stats``: the library's statistics function
    (without its dtype suffix)."""
    n, c, h, w = x.shape
    s = torch.empty(c, dtype=torch.float64)
    ss = torch.empty(c, dtype=torch.float64)
    # sums about a pivot near each channel's mean (its first value), as the GELU + BatchNorm kernel
    pivot = x[0, :, 0, 0].float().contiguous()
    LIBRARY.check(getattr(lib, f"{stats}_{dtype_suffix(x)}")(x.data_ptr(), pivot.data_ptr(), n * h * w, c, s.data_ptr(),
                                                      ss.data_ptr(), torch.get_num_threads()))
    shift_mean = s / (n * h * w)
    mean = pivot.double() + shift_mean
    var = (ss / (n * h * w) - shift_mean * shift_mean).clamp_min(0.0)
    return mean, var, _affine(mean, var, weight, bias, eps)


def _affine(mean, var, weight, bias, eps):
    scale = ((var + eps).rsqrt() * weight.double()).float().contiguous()
    return mean.float().contiguous(), scale, bias.float().contiguous()


def _bn_grad_terms(mean, var, weight, eps, sd, sdx, m):
    """BatchNorm's backward from the sums, over its m values per channel, of dy and of
    dy * (x - center) (center = mean as fp32): (k1, k2, k3) with dx = k1*dy + k2*(x - center) + k3,
    and dweight, dbias (fp32)."""
    center = mean.float()
    off = mean - center.double()  # what the rounding to fp32 left: xhat = ((x - center) - off) * rstd
    rstd = (var + eps).rsqrt()
    sum_dy_xhat = rstd * (sdx - off * sd)
    a = weight.double() * rstd
    # dx = a * (dy - sum_dy / m - xhat * sum_dy_xhat / m)
    k1 = a.float().contiguous()
    k2 = (-a * rstd * sum_dy_xhat / m).float().contiguous()
    k3 = (-a * sd / m + a * rstd * off * sum_dy_xhat / m).float().contiguous()
    return (k1, k2, k3), sum_dy_xhat.float(), sd.float()


@torch.library.custom_op("mixlab::bn_pool_relu_forward", mutates_args=())
def _pool_forward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """relu(max_pool2d(batch_norm(x), 2, 2)) with batch statistics; returns y, the window position
    of each maximum (0-3; 4 where ReLU passes no gradient), the input value there, and the
    mean and biased variance per channel (fp64)."""
    lib = LIBRARY.load()
    n, c, h, w = x.shape
    mean, var, (center, scale, beta) = _batch_stats(lib, x, weight, bias, eps)
    y = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    sel = torch.empty_like(y, dtype=_sel_dtype(x))
    xsel = torch.empty_like(y)
    LIBRARY.check(getattr(lib, f"mixlab_bn_pool_fwd_{dtype_suffix(x)}")(x.data_ptr(), y.data_ptr(), sel.data_ptr(), xsel.data_ptr(),
                                                         center.data_ptr(), n, h, w, c, scale.data_ptr(),
                                                         beta.data_ptr(), torch.get_num_threads()))
    return y, sel, xsel, mean, var


@_pool_forward_op.register_fake
def _(x, weight, bias, eps):
    n, c, h, w = x.shape
    y = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    return (y, torch.empty_like(y, dtype=_sel_dtype(x)), torch.empty_like(y), x.new_empty(c, dtype=torch.float64),
            x.new_empty(c, dtype=torch.float64))


@torch.library.custom_op("mixlab::bn_pool_relu_backward", mutates_args=())
def _pool_backward_op(x: torch.Tensor, sel: torch.Tensor, xsel: torch.Tensor, grad_out: torch.Tensor,
                      weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dweight, dbias (fp32) of :func:`_pool_forward_op`."""
    lib = LIBRARY.load()
    n, c, h, w = x.shape
    threads = torch.get_num_threads()
    g = _cl(grad_out.to(x.dtype))
    sd = torch.empty(c, dtype=torch.float64)
    sdx = torch.empty(c, dtype=torch.float64)
    center = mean.float().contiguous()
    LIBRARY.check(getattr(lib, f"mixlab_bn_pool_bwd_stats_{dtype_suffix(x)}")(g.data_ptr(), sel.data_ptr(), xsel.data_ptr(),
                                                               center.data_ptr(), g.numel() // c, c, sd.data_ptr(),
                                                               sdx.data_ptr(), threads))
    (k1, k2, k3), dw, db = _bn_grad_terms(mean, var, weight, eps, sd, sdx, n * h * w)
    dx = torch.empty_like(x, memory_format=torch.channels_last)
    LIBRARY.check(getattr(lib, f"mixlab_bn_pool_bwd_apply_{dtype_suffix(x)}")(x.data_ptr(), g.data_ptr(), sel.data_ptr(),
                                                               dx.data_ptr(), center.data_ptr(), n, h, w, c,
                                                               k1.data_ptr(), k2.data_ptr(), k3.data_ptr(), threads))
    return dx, dw, db


@_pool_backward_op.register_fake
def _(x, sel, xsel, grad_out, weight, mean, var, eps):
    c = x.shape[1]
    return (torch.empty_like(x, memory_format=torch.channels_last), x.new_empty(c, dtype=torch.float32),
            x.new_empty(c, dtype=torch.float32))


class _BatchNormPoolReluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, sel, xsel, mean, var = _pool_forward_op(x, weight, bias, eps)
        ctx.save_for_backward(x, sel, xsel, weight, mean, var)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, sel, xsel, weight, mean, var = ctx.saved_tensors
        dx, dw, db = _pool_backward_op(x, sel, xsel, grad_y, weight, mean, var, ctx.eps)
        return (dx if ctx.needs_input_grad[0] else None, dw.to(weight.dtype) if ctx.needs_input_grad[1] else None,
                db.to(weight.dtype) if ctx.needs_input_grad[2] else None, None)


# ----------------------------------------------------------------------------- BatchNorm + upsample + ReLU + residual

@torch.library.custom_op("mixlab::bn_upsample_relu_add_forward", mutates_args=())
def _up_add_forward_op(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """relu(upsample2x_bilinear(batch_norm(x))) + skip with batch statistics; returns y and the
    mean and biased variance per channel (fp64). ``skip``: (N, C, 2H, 2W), x's dtype."""
    lib = LIBRARY.load()
    n, c, h, w = x.shape
    mean, var, (center, scale, beta) = _batch_stats(lib, x, weight, bias, eps)
    skip = _cl(skip)
    y = torch.empty_like(skip, memory_format=torch.channels_last)
    LIBRARY.check(getattr(lib, f"mixlab_bn_up_add_fwd_{dtype_suffix(x)}")(x.data_ptr(), skip.data_ptr(), y.data_ptr(),
                                                           center.data_ptr(), scale.data_ptr(), beta.data_ptr(), n, h,
                                                           w, c, torch.get_num_threads()))
    return y, mean, var


@_up_add_forward_op.register_fake
def _(x, skip, weight, bias, eps):
    c = x.shape[1]
    return (torch.empty_like(skip, memory_format=torch.channels_last), x.new_empty(c, dtype=torch.float64),
            x.new_empty(c, dtype=torch.float64))


@torch.library.custom_op("mixlab::bn_upsample_relu_add_backward", mutates_args=())
def _up_add_backward_op(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        mean: torch.Tensor, var: torch.Tensor, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dweight, dbias (fp32) of :func:`_up_add_forward_op` (the residual's gradient is grad_out)."""
    lib = LIBRARY.load()
    n, c, h, w = x.shape
    threads = torch.get_num_threads()
    g = _cl(grad_out.to(x.dtype))
    center, scale, beta = _affine(mean, var, weight, bias, eps)  # the forward's map, recomputed bit for bit
    dz = torch.empty((n, h, w, c), dtype=torch.float32)
    sd = torch.empty(c, dtype=torch.float64)
    sdx = torch.empty(c, dtype=torch.float64)
    LIBRARY.check(getattr(lib, f"mixlab_bn_up_add_bwd_{dtype_suffix(x)}")(x.data_ptr(), g.data_ptr(), dz.data_ptr(),
                                                           center.data_ptr(), scale.data_ptr(), beta.data_ptr(), n, h,
                                                           w, c, sd.data_ptr(), sdx.data_ptr(), threads))
    (k1, k2, k3), dw, db = _bn_grad_terms(mean, var, weight, eps, sd, sdx, n * h * w)
    dx = torch.empty_like(x, memory_format=torch.channels_last)
    LIBRARY.check(getattr(lib, f"mixlab_bn_bwd_apply_{dtype_suffix(x)}")(x.data_ptr(), dz.data_ptr(), dx.data_ptr(),
                                                          center.data_ptr(), n * h * w, c, k1.data_ptr(),
                                                          k2.data_ptr(), k3.data_ptr(), threads))
    return dx, dw, db


@_up_add_backward_op.register_fake
def _(x, grad_out, weight, bias, mean, var, eps):
    c = x.shape[1]
    return (torch.empty_like(x, memory_format=torch.channels_last), x.new_empty(c, dtype=torch.float32),
            x.new_empty(c, dtype=torch.float32))


class _BatchNormUpsampleReluAddFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, skip, weight, bias, eps):
        y, mean, var = _up_add_forward_op(x, skip, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, bias, mean, var = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx = dw = db = None
        if need[0] or need[2] or need[3]:
            dx, dw, db = _up_add_backward_op(x, grad_y, weight, bias, mean, var, ctx.eps)
        return (dx if need[0] else None, grad_y if need[1] else None,
                dw.to(weight.dtype) if need[2] else None, db.to(bias.dtype) if need[3] else None, None)


# ----------------------------------------------------------------------------- upsample + ReLU + 1x1 conv

@torch.library.custom_op("mixlab::upsample_relu_conv1x1_forward", mutates_args=())
def _up_forward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv1x1(relu(upsample2x_bilinear(x))); ``weight`` (K, C) and ``bias`` (K) fp32 holding the
    values the computation's dtype keeps."""
    n, c, h, w = x.shape
    k = weight.shape[0]
    y = torch.empty((n, k, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    LIBRARY.check(getattr(LIBRARY.load(), f"mixlab_up_conv_fwd_{dtype_suffix(x)}")(
        x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None, y.data_ptr(), n, h, w, c, k,
        torch.get_num_threads()))
    return y


@_up_forward_op.register_fake
def _(x, weight, bias):
    n, _, h, w = x.shape
    return torch.empty((n, weight.shape[0], 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


@torch.library.custom_op("mixlab::upsample_relu_conv1x1_backward", mutates_args=())
def _up_backward_op(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dweight (K, C) and dbias (K) (fp32) of :func:`_up_forward_op`."""
    n, c, h, w = x.shape
    k = weight.shape[0]
    g = _cl(grad_out.to(x.dtype))
    dx = torch.empty_like(x, memory_format=torch.channels_last)
    dw = torch.empty((k, c), dtype=torch.float64)
    db = torch.empty(k, dtype=torch.float64)
    LIBRARY.check(getattr(LIBRARY.load(), f"mixlab_up_conv_bwd_{dtype_suffix(x)}")(
        x.data_ptr(), g.data_ptr(), weight.data_ptr(), dx.data_ptr(), dw.data_ptr(), db.data_ptr(), n, h, w, c, k,
        torch.get_num_threads()))
    return dx, dw.float(), db.float()


@_up_backward_op.register_fake
def _(x, grad_out, weight):
    k, c = weight.shape
    return (torch.empty_like(x, memory_format=torch.channels_last), x.new_empty((k, c), dtype=torch.float32),
            x.new_empty(k, dtype=torch.float32))


class _UpsampleReluConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        # the values the computation's dtype (x's) keeps, widened: what aten's conv multiplies by
        wc = weight.reshape(weight.shape[0], -1).to(x.dtype).float().contiguous()
        bc = bias.to(x.dtype).float().contiguous() if bias is not None else None
        ctx.save_for_backward(x, wc)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype, weight.shape)
        return _up_forward_op(x, wc, bc)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, wc = ctx.saved_tensors
        w_dtype, b_dtype, w_shape = ctx.dtypes
        dx, dw, db = _up_backward_op(x, grad_y, wc)
        return (dx if ctx.needs_input_grad[0] else None,
                dw.reshape(w_shape).to(w_dtype) if ctx.needs_input_grad[1] else None,
                db.to(b_dtype) if b_dtype is not None and ctx.needs_input_grad[2] else None)


# ----------------------------------------------------------------------------- kernel or aten, per shape

PLAN = Plan("resample_plan", identity=lambda: LIBRARY.source_text())
_time_methods = time_training_calls  # (a module global: tests replace it)


def set_resample_method(method: str | None) -> None:
    """Force 'kernel' or 'aten' for every call; None (default) times both per shape."""
    PLAN.force(method, "resample")


def _method(kind: str, x: torch.Tensor, extra: str, make_runs) -> str:
    key = f"{kind}|{tuple(x.shape)}|{str(x.dtype)[6:]}|{extra}|t{torch.get_num_threads()}"
    return PLAN.kernel_or_aten(key, make_runs, _time_methods)


def _aten_pool(x, running_mean, running_var, weight, bias, training, momentum, eps):
    return F.relu(F.max_pool2d(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps), 2, 2))


def _aten_up(x, weight, bias):
    return F.conv2d(F.relu(F.interpolate(x, scale_factor=2.0, mode="bilinear")), weight, bias)


def _usable(x: torch.Tensor) -> bool:
    return (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and _is_nhwc(x) and x.numel() > 0 and LIBRARY.load() is not None)


def batch_norm_max_pool_relu(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                             weight: torch.Tensor | None, bias: torch.Tensor | None, training: bool, momentum: float,
                             eps: float) -> torch.Tensor:
    """``relu(max_pool2d(batch_norm(x, ...), 2, 2))``, fused on the CPU where :mod:`this module
    <mixlab.ops.resample>` says it can be (training mode, channels-last, even height and width)."""
    args = (running_mean, running_var, weight, bias, training, momentum, eps)
    if not training or not _usable(x) or x.shape[2] % 2 or x.shape[3] % 2 or x.shape[0] * x.shape[2] * x.shape[3] < 2:
        return _aten_pool(x, *args)
    c = x.shape[1]
    w = weight if weight is not None else x.new_ones(c, dtype=torch.float32)
    b = bias if bias is not None else x.new_zeros(c, dtype=torch.float32)

    def runs():
        xs, ws, bs = x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()
        out = _aten_pool(xs, None, None, ws, bs, True, 0.0, eps)
        dy = torch.randn_like(out)
        return {"kernel": lambda: _BatchNormPoolReluFn.apply(xs, ws, bs, eps)[0].backward(dy),
                "aten": lambda: _aten_pool(xs, None, None, ws, bs, True, 0.0, eps).backward(dy)}

    if _method("bn_pool_relu", x, "", runs) != "kernel":
        return _aten_pool(x, *args)
    y, mean, var = _BatchNormPoolReluFn.apply(x, w, b, eps)
    update_running_stats(running_mean, running_var, mean, var, x.numel() // c, momentum)
    return y


def _aten_up_add(x, skip, running_mean, running_var, weight, bias, training, momentum, eps):
    z = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return F.relu(F.interpolate(z, scale_factor=2.0, mode="bilinear")) + skip


def batch_norm_upsample_relu_add(x: torch.Tensor, skip: torch.Tensor, running_mean: torch.Tensor | None,
                                 running_var: torch.Tensor | None, weight: torch.Tensor | None,
                                 bias: torch.Tensor | None, training: bool, momentum: float,
                                 eps: float) -> torch.Tensor:
    """``relu(interpolate(batch_norm(x, ...), scale_factor=2, mode='bilinear')) + skip``, fused on the
    CPU where :mod:`this module <mixlab.ops.resample>` says it can be (training mode, channels-last,
    ``skip`` of x's dtype and of the upsampled shape)."""
    args = (running_mean, running_var, weight, bias, training, momentum, eps)
    n, c, h, w = x.shape if x.dim() == 4 else (0, 0, 0, 0)
    if (not training or not _usable(x) or skip.dtype != x.dtype or tuple(skip.shape) != (n, c, 2 * h, 2 * w)
            or n * h * w < 2):
        return _aten_up_add(x, skip, *args)
    wt = weight if weight is not None else x.new_ones(c, dtype=torch.float32)
    bs = bias if bias is not None else x.new_zeros(c, dtype=torch.float32)

    def runs():
        xs, ss = x.detach().requires_grad_(), skip.detach().requires_grad_()
        ws, bb = wt.detach().requires_grad_(), bs.detach().requires_grad_()
        dy = torch.randn_like(ss)
        return {"kernel": lambda: _BatchNormUpsampleReluAddFn.apply(xs, ss, ws, bb, eps)[0].backward(dy),
                "aten": lambda: _aten_up_add(xs, ss, None, None, ws, bb, True, 0.0, eps).backward(dy)}

    if _method("bn_upsample_relu_add", x, "", runs) != "kernel":
        return _aten_up_add(x, skip, *args)
    y, mean, var = _BatchNormUpsampleReluAddFn.apply(x, skip, wt, bs, eps)
    update_running_stats(running_mean, running_var, mean, var, n * h * w, momentum)
    return y


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def upsample_relu_conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(relu(interpolate(x, scale_factor=2, mode='bilinear')), weight, bias)`` for a 1x1
    ``weight`` (K, C, 1, 1), fused on the CPU where :mod:`this module <mixlab.ops.resample>` says
    it can be (under autocast in its dtype, as aten's convolution would be)."""
    compute = _compute_dtype(x)
    if (not _usable(x) or x.dtype != compute or weight.dim() != 4 or weight.shape[2:] != (1, 1)
            or weight.shape[1] != x.shape[1] or not torch.is_grad_enabled()
            or (not torch.is_autocast_enabled("cpu") and (weight.dtype != x.dtype
                                                           or (bias is not None and bias.dtype != x.dtype)))):
        return _aten_up(x, weight, bias)

    def runs():
        xs, ws = x.detach().requires_grad_(), weight.detach().requires_grad_()
        bs = bias.detach().requires_grad_() if bias is not None else None
        wa, ba = ws.to(x.dtype), bs.to(x.dtype) if bs is not None else None
        dy = torch.randn_like(_aten_up(xs, wa, ba))
        return {"kernel": lambda: _UpsampleReluConvFn.apply(xs, ws, bs).backward(dy),
                "aten": lambda: _aten_up(xs, ws.to(x.dtype), bs.to(x.dtype) if bs is not None else None).backward(dy)}

    if _method("upsample_relu_conv1x1", x, f"k{weight.shape[0]}|b{bias is not None}", runs) != "kernel":
        return _aten_up(x, weight, bias)
    return _UpsampleReluConvFn.apply(x, weight, bias)


# ----------------------------------------------------------------------------- modules

# The modules are leaves for timm's FX tracers (as nn.BatchNorm2d / nn.Conv2d are for FX's own), and
# their fused forms take the unfused path while FX traces: a traced graph has aten's operations.

@register_notrace_module
class PoolingBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (called, it is exactly that) with :meth:`forward_pool_relu`, the fused
    ``relu(max_pool2d(self(x), 2, 2))`` a model calls where that is what it computes."""

    def forward_pool_relu(self, x: torch.Tensor) -> torch.Tensor:
        if hooked(self) or global_hooks() or fx_tracing():  # hooks see the BatchNorm's own output
            return F.relu(F.max_pool2d(self(x), 2, 2))
        self._check_input_dim(x)
        running_mean, running_var, batch_stats, factor = batch_norm_args(self)
        return batch_norm_max_pool_relu(x, running_mean, running_var, self.weight, self.bias, batch_stats, factor,
                                        self.eps)


@register_notrace_module
class UpsamplingBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (called, it is exactly that) with :meth:`forward_upsample_relu_add`, the
    fused ``relu(interpolate(self(x), scale_factor=2, mode='bilinear')) + skip`` a model calls
    where that is what it computes."""

    def forward_upsample_relu_add(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if hooked(self) or global_hooks() or fx_tracing():
            return F.relu(F.interpolate(self(x), scale_factor=2.0, mode="bilinear")) + skip
        self._check_input_dim(x)
        running_mean, running_var, batch_stats, factor = batch_norm_args(self)
        return batch_norm_upsample_relu_add(x, skip, running_mean, running_var, self.weight, self.bias, batch_stats,
                                            factor, self.eps)


@register_notrace_module
class UpsamplingConv2d(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` (called, it is exactly that) with :meth:`forward_upsampled`, the fused
    ``self(relu(interpolate(x, scale_factor=2, mode='bilinear')))`` a model calls where that is
    what it computes."""

    def forward_upsampled(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or hooked(self) or global_hooks() or fx_tracing():
            return self(F.relu(F.interpolate(x, scale_factor=2.0, mode="bilinear")))
        return upsample_relu_conv1x1(x, self.weight, self.bias)


def _is_pointwise(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros")


def use_fast_resample(model: nn.Module) -> int:
    """Switch the modules that ``model`` (or any module in it) names in a ``resample_fusions``
    attribute, ``{"pool_relu": (BatchNorm names...), "upsample_relu_add": (BatchNorm names...),
    "upsample_relu": (1x1 conv names...)}``, to :class:`PoolingBatchNorm2d` /
    :class:`UpsamplingBatchNorm2d` / :class:`UpsamplingConv2d`, in place (same parameters and
    state_dict); only exact ``nn.BatchNorm2d`` and plain 1x1 ``nn.Conv2d`` modules. Returns how many."""
    n = 0
    for owner in model.modules():
        fusions = getattr(owner, "resample_fusions", None)
        if not isinstance(fusions, dict):
            continue
        for kind, names in fusions.items():
            for name in names:
                m = getattr(owner, name, None)
                if kind == "pool_relu" and type(m) is nn.BatchNorm2d:
                    m.__class__ = PoolingBatchNorm2d
                elif kind == "upsample_relu_add" and type(m) is nn.BatchNorm2d:
                    m.__class__ = UpsamplingBatchNorm2d
                elif kind == "upsample_relu" and _is_pointwise(m):
                    m.__class__ = UpsamplingConv2d
                else:
                    continue
                n += 1
    return n


def restore_resample(model: nn.Module) -> int:
    """Undo :func:`use_fast_resample`; returns how many modules were switched back."""
    return swap_classes(model, by_exact_type({PoolingBatchNorm2d: nn.BatchNorm2d, UpsamplingBatchNorm2d: nn.BatchNorm2d,
                                              UpsamplingConv2d: nn.Conv2d}))
