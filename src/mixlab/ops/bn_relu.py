"""mixlab's BatchNorm + ReLU kernel for the CPU (``bn_relu_kernels.cpp``): a training-mode
``BatchNorm2d`` and the ``ReLU`` after it as one op.

ConvMLP's convolutional tokenizer and stage (nine conv-BN-ReLU units in ConvMLP-S, on 112x112 and
56x56 maps) and the VGG-BN baselines apply ReLU to every BatchNorm's output. In aten the pair is
five passes over the map each step (BatchNorm's two forward, ReLU's, and in the backward ReLU's
mask and BatchNorm's two besides): 84.9 ms of a ConvMLP-S step at batch 32, bf16, on 2 EPYC
cores (each pair timed alone). Fused, the forward normalises and applies ReLU in one pass after
the statistics, and the backward applies ReLU's mask inside BatchNorm's two passes.

Scope: fp32 or bf16 channels-last CPU tensors in training mode (batch statistics; the running
statistics are updated as ``nn.BatchNorm2d`` updates them). Anything else (evaluation, NCHW,
other dtypes, CUDA, ``torch.compile``) runs aten's operations unchanged; the module is a leaf for
timm's FX tracers. Plain ``torch.fx.symbolic_trace``, TorchScript and converters that replace
BatchNorm modules by type (``nn.SyncBatchNorm.convert_sync_batchnorm``, timm's
``freeze_batch_norm_2d``) want the unswitched model: call :func:`restore_bn_relu` first. The first
call of each new shape times the kernel against aten (forward and backward) and keeps the faster,
once per machine, as the other kernels do.

:func:`use_fast_bn_relu` switches a model in place: every ``nn.BatchNorm2d`` directly followed by
an ``nn.ReLU`` in an ``nn.Sequential`` becomes a :class:`BatchNormReLU2d` (same parameters,
buffers and state_dict keys) and the ReLU an ``nn.Identity``; :func:`restore_bn_relu` undoes it.
The switch assumes the Sequential runs as a whole: a slice of it that ends at the BatchNorm, or
code that walks its children one by one, sees the ReLU's output there.
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
from .module_swap import fx_tracing, hooked
from .resample import _affine, _batch_stats, _bn_grad_terms

__all__ = ["batch_norm_relu", "BatchNormReLU2d", "use_fast_bn_relu", "restore_bn_relu", "fast_bn_relu_available",
           "set_bn_relu_method"]

_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
_SIGS = {}
for _t in ("f32", "bf16"):
    _SIGS[f"mixlab_bn_relu_stats_{_t}"] = (_I, [_P, _P, _L, _L, _P, _P, _I])
    _SIGS[f"mixlab_bn_relu_fwd_{_t}"] = (_I, [_P, _P, _P, _P, _P, _L, _L, _I])
    _SIGS[f"mixlab_bn_relu_bwd_stats_{_t}"] = (_I, [_P, _P, _P, _P, _P, _L, _L, _P, _P, _I])
    _SIGS[f"mixlab_bn_relu_bwd_apply_{_t}"] = (_I, [_P, _P, _P, _P, _P, _P, _L, _L, _P, _P, _P, _I])

LIBRARY = KernelLibrary(
    Path(__file__).with_name("bn_relu_kernels.cpp"), "mixlab_bn_relu", "BatchNorm + ReLU",
    ("mixlab_bn_relu_abi_version", 1), _SIGS, "MIXLAB_FAST_BN_RELU_BUILD",
    "BatchNorm and ReLU run as aten's operations (correct, slower)")


def fast_bn_relu_available() -> bool:
    """Whether the compiled kernel is loaded (building it on first call)."""
    return LIBRARY.load() is not None




def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("mixlab::bn_relu_forward", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """relu(batch_norm(x)) with batch statistics; y and the mean and biased variance (fp64)."""
    lib = LIBRARY.load()
    n, c, h, w = x.shape
    mean, var, (center, scale, beta) = _batch_stats(lib, x, weight, bias, eps, stats="mixlab_bn_relu_stats")
    y = torch.empty_like(x, memory_format=torch.channels_last)
    LIBRARY.check(getattr(lib, f"mixlab_bn_relu_fwd_{dtype_suffix(x)}")(x.data_ptr(), y.data_ptr(), center.data_ptr(),
                                                         scale.data_ptr(), beta.data_ptr(), n * h * w, c,
                                                         torch.get_num_threads()))
    return y, mean, var


@_forward_op.register_fake
def _(x, weight, bias, eps):
    c = x.shape[1]
    return (torch.empty_like(x, memory_format=torch.channels_last), x.new_empty(c, dtype=torch.float64),
            x.new_empty(c, dtype=torch.float64))


@torch.library.custom_op("mixlab::bn_relu_backward", mutates_args=())
def _backward_op(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 mean: torch.Tensor, var: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dweight, dbias (fp32) of :func:`_forward_op` (ReLU's mask recomputed from x with the
    forward's map, bit for bit)."""
    lib = LIBRARY.load()
    n, c, h, w = x.shape
    m, threads = n * h * w, torch.get_num_threads()
    dy = _cl(grad_out.to(x.dtype))
    center, scale, beta = _affine(mean, var, weight, bias, eps)
    sd = torch.empty(c, dtype=torch.float64)
    sdx = torch.empty(c, dtype=torch.float64)
    LIBRARY.check(getattr(lib, f"mixlab_bn_relu_bwd_stats_{dtype_suffix(x)}")(x.data_ptr(), dy.data_ptr(), center.data_ptr(),
                                                               scale.data_ptr(), beta.data_ptr(), m, c, sd.data_ptr(),
                                                               sdx.data_ptr(), threads))
    (k1, k2, k3), dw, db = _bn_grad_terms(mean, var, weight, eps, sd, sdx, m)
    dx = torch.empty_like(x, memory_format=torch.channels_last)
    LIBRARY.check(getattr(lib, f"mixlab_bn_relu_bwd_apply_{dtype_suffix(x)}")(x.data_ptr(), dy.data_ptr(), dx.data_ptr(),
                                                               center.data_ptr(), scale.data_ptr(), beta.data_ptr(), m,
                                                               c, k1.data_ptr(), k2.data_ptr(), k3.data_ptr(), threads))
    return dx, dw, db


@_backward_op.register_fake
def _(x, grad_out, weight, bias, mean, var, eps):
    c = x.shape[1]
    return (torch.empty_like(x, memory_format=torch.channels_last), x.new_empty(c, dtype=torch.float32),
            x.new_empty(c, dtype=torch.float32))


class _BatchNormReluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, var = _forward_op(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, bias, mean, var = ctx.saved_tensors
        dx, dw, db = _backward_op(x, grad_y, weight, bias, mean, var, ctx.eps)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dw.to(weight.dtype) if need[1] else None,
                db.to(weight.dtype) if need[2] else None, None)


# ----------------------------------------------------------------------------- kernel or aten, per shape

PLAN = Plan("bn_relu_plan", identity=lambda: LIBRARY.source_text())
_time_methods = time_training_calls  # (a module global: tests replace it)


def set_bn_relu_method(method: str | None) -> None:
    """Force 'kernel' or 'aten' for every call; None (default) times both per shape."""
    PLAN.force(method, "BatchNorm + ReLU")


def _aten(x, running_mean, running_var, weight, bias, training, momentum, eps):
    return F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))


def batch_norm_relu(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, training: bool, momentum: float,
                    eps: float) -> torch.Tensor:
    """``relu(batch_norm(x, ...))``, fused on the CPU where :mod:`this module <mixlab.ops.bn_relu>`
    says it can be (training mode, channels-last fp32/bf16)."""
    args = (running_mean, running_var, weight, bias, training, momentum, eps)
    if (not training or torch.compiler.is_compiling() or fx_tracing() or x.device.type != "cpu"
            or x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 4
            or not x.is_contiguous(memory_format=torch.channels_last) or x.shape[0] * x.shape[2] * x.shape[3] < 2
            or LIBRARY.load() is None):
        return _aten(x, *args)
    c = x.shape[1]
    w = weight if weight is not None else x.new_ones(c, dtype=torch.float32)
    b = bias if bias is not None else x.new_zeros(c, dtype=torch.float32)

    def runs():
        xs, ws, bs = x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()
        dy = torch.randn_like(xs, memory_format=torch.channels_last)
        return {"kernel": lambda: _BatchNormReluFn.apply(xs, ws, bs, eps)[0].backward(dy),
                "aten": lambda: _aten(xs, None, None, ws, bs, True, 0.0, eps).backward(dy)}

    key = f"bn_relu|{tuple(x.shape)}|{str(x.dtype)[6:]}|t{torch.get_num_threads()}"
    if PLAN.kernel_or_aten(key, runs, _time_methods) != "kernel":
        return _aten(x, *args)
    y, mean, var = _BatchNormReluFn.apply(x, w, b, eps)
    update_running_stats(running_mean, running_var, mean, var, x.numel() // c, momentum)
    return y


# ----------------------------------------------------------------------------- modules

@register_notrace_module  # a leaf for timm's FX tracers, as nn.BatchNorm2d is for FX's own
class BatchNormReLU2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that applies ReLU to its output (:func:`batch_norm_relu`). Same
    parameters, buffers and state_dict as ``nn.BatchNorm2d``; ``isinstance(m, nn.BatchNorm2d)`` holds.
    Hooks registered on it after the switch see the ReLU's output (a hooked pair is not switched)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        running_mean, running_var, batch_stats, factor = batch_norm_args(self)
        return batch_norm_relu(x, running_mean, running_var, self.weight, self.bias, batch_stats, factor, self.eps)


class _ReLUFusedAway(nn.Identity):
    """Where a ReLU was before :func:`use_fast_bn_relu` moved it into the BatchNorm before it."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace  # the ReLU's, restored by restore_bn_relu


def use_fast_bn_relu(model: nn.Module) -> int:
    """Fuse every ``nn.BatchNorm2d`` directly followed by an ``nn.ReLU`` in an ``nn.Sequential`` of
    ``model``, in place: the BatchNorm becomes a :class:`BatchNormReLU2d`, the ReLU an
    ``nn.Identity`` (not where either module is used elsewhere too, has hooks, or the Sequential
    has its own forward). Parameters and state_dict keys stay. Returns how many pairs."""
    uses = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    pairs = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            bn, act = seq._modules[a], seq._modules[b]
            if (type(bn) is nn.BatchNorm2d and type(act) is nn.ReLU and uses[id(bn)] == 1 and uses[id(act)] == 1
                    and not hooked(bn, act)):
                seq._modules[b] = _ReLUFusedAway(act.inplace)
                bn.__class__ = BatchNormReLU2d
                pairs += 1
    return pairs


def restore_bn_relu(model: nn.Module) -> int:
    """Undo :func:`use_fast_bn_relu`; returns how many pairs were switched back."""
    n = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            if type(seq._modules[a]) is BatchNormReLU2d and type(seq._modules[b]) is _ReLUFusedAway:
                seq._modules[b] = nn.ReLU(inplace=seq._modules[b].inplace)
                seq._modules[a].__class__ = nn.BatchNorm2d
                n += 1
    return n
