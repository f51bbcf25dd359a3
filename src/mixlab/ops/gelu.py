"""mixlab's GELU kernels for the CPU (``gelu_kernels.cpp``): GELU fused with the BatchNorm that
follows it, and GELU alone.

ConvMixer (and timm's) applies ``GELU`` then ``BatchNorm2d`` to every convolution's output: 17
pairs in a ConvMixer-256/8 step. In aten each pair is five passes over a 16.8 MB activation
(GELU; BatchNorm's statistics and normalisation; BatchNorm's two backward passes) plus GELU's
backward, about 10 ms a pair on 2 EPYC cores in bf16; the fused kernel does the forward in two
passes and the backward in two, and evaluates GELU twice instead of three times
(benchmarks/bench_gelu_bn.py). GELU alone (Conv2Former's and the MLP blocks') is one pass each
way, with the same vectorised arithmetic, where aten's bf16 GELU and its backward are slower.

Scope: fp32 or bf16 on the CPU; the pair on a 4-D channels-last tensor in training mode (batch
statistics; the running statistics are updated as ``nn.BatchNorm2d`` updates them), GELU alone
on any tensor dense in memory. Anything else (evaluation of the pair, NCHW pairs, other dtypes,
CUDA, the tanh approximation, anything under ``torch.compile``, whose inductor fuses them
itself) runs aten's operations unchanged. The first call of each new shape
times the kernel against aten (forward and backward) and keeps the faster, stored per CPU, torch
version and thread count in the kernel cache folder.

:func:`use_fast_gelu` switches a model in place: every exact ``nn.GELU`` directly followed by an
``nn.BatchNorm2d`` in an ``nn.Sequential`` becomes an ``nn.Identity`` and the BatchNorm a
:class:`GeluBatchNorm2d` (same parameters, buffers and state_dict keys); every other exact
``nn.GELU`` becomes a :class:`FastGELU`. :func:`restore_gelu` undoes both.
"""
from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .kernel_build import KernelLibrary, Plan, dtype_suffix, time_training_calls
from .module_swap import by_exact_type, swap_classes

__all__ = ["gelu", "gelu_batch_norm", "FastGELU", "GeluBatchNorm2d", "use_fast_gelu", "restore_gelu",
           "fast_gelu_available"]

_P, _L, _I, _D = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_void_p
_SIGS = {}
for _t in ("f32", "bf16"):
    _SIGS[f"mixlab_gelu_bn_fwd_stats_{_t}"] = (_I, [_P, _P, _P, _L, _L, _D, _D, _I])
    _SIGS[f"mixlab_gelu_bn_fwd_apply_{_t}"] = (_I, [_P, _P, _P, _P, _L, _L, _P, _P, _I])
    _SIGS[f"mixlab_gelu_bn_bwd_stats_{_t}"] = (_I, [_P, _P, _P, _L, _L, _D, _D, _I])
    _SIGS[f"mixlab_gelu_bn_bwd_apply_{_t}"] = (_I, [_P, _P, _P, _P, _P, _L, _L, _P, _P, _P, _I])
    _SIGS[f"mixlab_gelu_fwd_{_t}"] = (_I, [_P, _P, _L, _I])
    _SIGS[f"mixlab_gelu_bwd_{_t}"] = (_I, [_P, _P, _P, _L, _I])

LIBRARY = KernelLibrary(
    Path(__file__).with_name("gelu_kernels.cpp"), "mixlab_gelu", "GELU (and GELU + BatchNorm)",
    ("mixlab_gelu_bn_abi_version", 5), _SIGS, "MIXLAB_FAST_GELU_BUILD",
    "GELU and BatchNorm run as aten's operations (correct, slower)",
    # the loops are bound by GELU's arithmetic: full-width AVX-512 where the CPU has it
    extra_flags=("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ())


def fast_gelu_available() -> bool:
    """Whether the compiled kernel is loaded (building it on first call)."""
    return LIBRARY.load() is not None


def _is_nhwc(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)




# ----------------------------------------------------------------------------- the two ops
# Registered ops (not bare Python calls): one opaque node each for a tracer that reaches them (under
# torch.compile the functions below run aten's operations instead, which inductor fuses itself).

@torch.library.custom_op("mixlab::gelu_bn_forward", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = batch_norm(gelu(x)) (+ residual, summed in the same pass) with batch statistics;
    returns y, g = gelu(x) (kept for the backward, as aten keeps BatchNorm's input), and the mean
    and biased variance of g per channel (fp64). ``residual``: x's shape and dtype, channels_last."""
    lib = LIBRARY.load()
    n, c, h, w = x.shape
    m, threads = n * h * w, torch.get_num_threads()
    s = torch.empty(c, dtype=torch.float64)
    ss = torch.empty(c, dtype=torch.float64)
    g = torch.empty_like(x, memory_format=torch.channels_last)
    # sums about a pivot near each channel's mean (its first value), not about 0: a channel whose
    # mean is large next to its spread keeps its variance in fp32
    pivot = F.gelu(x[0, :, 0, 0].float()).contiguous()
    LIBRARY.check(getattr(lib, f"mixlab_gelu_bn_fwd_stats_{dtype_suffix(x)}")(x.data_ptr(), g.data_ptr(), pivot.data_ptr(), m, c,
                                                                 s.data_ptr(), ss.data_ptr(), threads))
    shift_mean = s / m
    mean = pivot.double() + shift_mean
    var = (ss / m - shift_mean * shift_mean).clamp_min(0.0)
    rstd = (var + eps).rsqrt()
    scale = (rstd * weight.double()).float().contiguous()
    center, beta = mean.float().contiguous(), bias.float().contiguous()
    y = torch.empty_like(x, memory_format=torch.channels_last)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        residual = residual.to(x.dtype).contiguous(memory_format=torch.channels_last)
    LIBRARY.check(getattr(lib, f"mixlab_gelu_bn_fwd_apply_{dtype_suffix(x)}")(g.data_ptr(),
                                                                 residual.data_ptr() if residual is not None else None,
                                                                 y.data_ptr(), center.data_ptr(), m, c,
                                                                 scale.data_ptr(), beta.data_ptr(), threads))
    return y, g, mean, var


@_forward_op.register_fake
def _(x, weight, bias, eps, residual=None):
    c = x.shape[1]
    return (torch.empty_like(x, memory_format=torch.channels_last), torch.empty_like(x, memory_format=torch.channels_last),
            x.new_empty(c, dtype=torch.float64), x.new_empty(c, dtype=torch.float64))


@torch.library.custom_op("mixlab::gelu_bn_backward", mutates_args=())
def _backward_op(x: torch.Tensor, g: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                 var: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dweight, dbias of :func:`_forward_op` (dweight, dbias in fp32)."""
    lib = LIBRARY.load()
    n, c, h, w = x.shape
    m, threads = n * h * w, torch.get_num_threads()
    dy = grad_out.to(x.dtype).contiguous(memory_format=torch.channels_last)
    sd = torch.empty(c, dtype=torch.float64)
    sdg = torch.empty(c, dtype=torch.float64)
    center = mean.float().contiguous()  # sums and the map about the mean (as rounded to fp32)
    off = mean - center.double()  # what that rounding left: xhat = ((g - center) - off) * rstd
    LIBRARY.check(getattr(lib, f"mixlab_gelu_bn_bwd_stats_{dtype_suffix(x)}")(g.data_ptr(), dy.data_ptr(), center.data_ptr(), m, c,
                                                                 sd.data_ptr(), sdg.data_ptr(), threads))
    rstd = (var + eps).rsqrt()
    sum_dy_xhat = rstd * (sdg - off * sd)  # sum of dy * (g - mean) * rstd
    a = weight.double() * rstd
    # dg = a * (dy - sum_dy / m - xhat * sum_dy_xhat / m) as k1*dy + k2*(g - center) + k3
    k1 = a.float().contiguous()
    k2 = (-a * rstd * sum_dy_xhat / m).float().contiguous()
    k3 = (-a * sd / m + a * rstd * off * sum_dy_xhat / m).float().contiguous()
    dx = torch.empty_like(x, memory_format=torch.channels_last)
    LIBRARY.check(getattr(lib, f"mixlab_gelu_bn_bwd_apply_{dtype_suffix(x)}")(x.data_ptr(), g.data_ptr(), dy.data_ptr(),
                                                                 dx.data_ptr(), center.data_ptr(), m, c,
                                                                 k1.data_ptr(), k2.data_ptr(), k3.data_ptr(),
                                                                 threads))
    return dx, sum_dy_xhat.float(), sd.float()


@_backward_op.register_fake
def _(x, g, grad_out, weight, mean, var, eps):
    c = x.shape[1]
    return (torch.empty_like(x, memory_format=torch.channels_last), x.new_empty(c, dtype=torch.float32),
            x.new_empty(c, dtype=torch.float32))


class _GeluBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, g, mean, var = _forward_op(x, weight, bias, eps)
        ctx.save_for_backward(x, g, weight, mean, var)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, g, weight, mean, var = ctx.saved_tensors
        dx, dw, db = _backward_op(x, g, grad_y, weight, mean, var, ctx.eps)
        return (dx if ctx.needs_input_grad[0] else None, dw.to(weight.dtype) if ctx.needs_input_grad[1] else None,
                db.to(weight.dtype) if ctx.needs_input_grad[2] else None, None)


@torch.library.custom_op("mixlab::gelu_forward", mutates_args=())
def _gelu_forward_op(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)  # the same strides: the kernel runs over the dense memory of both
    LIBRARY.check(getattr(LIBRARY.load(), f"mixlab_gelu_fwd_{dtype_suffix(x)}")(x.data_ptr(), y.data_ptr(), x.numel(),
                                                                   torch.get_num_threads()))
    return y


@_gelu_forward_op.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("mixlab::gelu_backward", mutates_args=())
def _gelu_backward_op(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    dy = grad_out.to(x.dtype)
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)
    dx = torch.empty_like(x)
    LIBRARY.check(getattr(LIBRARY.load(), f"mixlab_gelu_bwd_{dtype_suffix(x)}")(x.data_ptr(), dy.data_ptr(), dx.data_ptr(),
                                                                   x.numel(), torch.get_num_threads()))
    return dx


@_gelu_backward_op.register_fake
def _(x, grad_out):
    return torch.empty_like(x)


class _GeluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _gelu_forward_op(x)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        return _gelu_backward_op(x, grad_y)


# ----------------------------------------------------------------------------- kernel or aten, per shape
#
# Timed once per (shape, strides, dtype, threads) on first use, as the depthwise op's weight
# gradient is; the verdict is kept in PLAN (per CPU, torch version and kernel source).

PLAN = Plan("gelu_bn_plan", identity=lambda: LIBRARY.source_text())


def set_gelu_method(method: str | None) -> None:
    """Force 'kernel' or 'aten' for every GELU and GELU + BatchNorm call; None (default)
    times both per shape."""
    PLAN.force(method, "GELU")


def _aten(x, weight, bias, eps):
    return F.batch_norm(F.gelu(x), None, None, weight, bias, True, 0.0, eps)


def _pair_runs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> dict:
    xs = x.detach().requires_grad_()
    ws, bs = weight.detach().requires_grad_(), bias.detach().requires_grad_()
    dy = torch.randn_like(xs, memory_format=torch.channels_last)
    return {"kernel": lambda: _GeluBatchNormFn.apply(xs, ws, bs, eps)[0].backward(dy),
            "aten": lambda: _aten(xs, ws, bs, eps).backward(dy)}


def _gelu_runs(x: torch.Tensor) -> dict:
    xs = x.detach().requires_grad_()
    dy = torch.randn_like(xs)
    return {"kernel": lambda: _GeluFn.apply(xs).backward(dy), "aten": lambda: F.gelu(xs).backward(dy)}


_time_methods = time_training_calls  # (a module global: tests replace it)


def _method(kind: str, x: torch.Tensor, make_runs) -> str:
    """'kernel' or 'aten' for ``kind`` ('gelu_bn' or 'gelu') on ``x``'s shape; ``make_runs()``
    gives the two forward + backward calls to time on first use."""
    key = f"{kind}|{tuple(x.shape)}|{list(x.stride())}|{str(x.dtype)[6:]}|t{torch.get_num_threads()}"
    return PLAN.kernel_or_aten(key, make_runs, _time_methods)


# ----------------------------------------------------------------------------- function and module

def _compiling() -> bool:
    # Under torch.compile aten's GELU and BatchNorm go to inductor, which fuses them itself. The
    # kernels' Python-side checks (the library, the per-shape plan) break the graph there, and
    # with dynamic shapes inductor then failed on the broken graph's permuted outputs
    # ("cannot determine truth value of Relational", Conv2Former-N, torch 2.14).
    return torch.compiler.is_compiling()


def _fusable(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and _is_nhwc(x)
            and x.shape[0] * x.shape[2] * x.shape[3] > 1 and LIBRARY.load() is not None)


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def gelu(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x)`` (exact), by the kernel on the CPU where :mod:`this module <mixlab.ops.gelu>`
    says it can be."""
    if (_compiling() or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or not _dense(x)
            or x.numel() == 0 or LIBRARY.load() is None or _method("gelu", x, lambda: _gelu_runs(x)) != "kernel"):
        return F.gelu(x)
    return _GeluFn.apply(x)


def gelu_batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, training: bool, momentum: float,
                    eps: float) -> torch.Tensor:
    """``F.batch_norm(F.gelu(x), running_mean, running_var, weight, bias, training, momentum, eps)``,
    fused on the CPU where :mod:`this module <mixlab.ops.gelu>` says it can be."""
    if _compiling() or not training or not _fusable(x):
        return F.batch_norm(F.gelu(x), running_mean, running_var, weight, bias, training, momentum, eps)
    c = x.shape[1]
    w = weight if weight is not None else x.new_ones(c, dtype=torch.float32)
    b = bias if bias is not None else x.new_zeros(c, dtype=torch.float32)
    if _method("gelu_bn", x, lambda: _pair_runs(x, w, b, eps)) != "kernel":
        return F.batch_norm(F.gelu(x), running_mean, running_var, weight, bias, training, momentum, eps)
    y, mean, var = _GeluBatchNormFn.apply(x, w, b, eps)
    update_running_stats(running_mean, running_var, mean, var, x.numel() // c, momentum)
    return y


def update_running_stats(running_mean, running_var, mean, var, m: int, momentum: float) -> None:
    """Move the running statistics (if any) toward a batch's mean and biased variance over m values
    per channel, as aten does: the unbiased variance goes into the running estimate."""
    if running_mean is None:
        return
    with torch.no_grad():
        running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1.0 - momentum).add_((var * (m / (m - 1))).to(running_var.dtype), alpha=momentum)


def batch_norm_args(bn: nn.BatchNorm2d) -> tuple:
    """(running_mean, running_var, batch_stats, momentum) for one call of ``bn``, exactly as
    nn.BatchNorm2d decides them (counting the batch in ``num_batches_tracked``: once a call)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return (bn.running_mean if track else None, bn.running_var if track else None, batch_stats, factor)


class GeluBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that applies exact GELU to its input first (:func:`gelu_batch_norm`).

    Same parameters, buffers and state_dict as ``nn.BatchNorm2d``; ``isinstance(m,
    nn.BatchNorm2d)`` holds.
    """

    def norm_args(self) -> tuple:
        return batch_norm_args(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        running_mean, running_var, batch_stats, factor = self.norm_args()
        return gelu_batch_norm(x, running_mean, running_var, self.weight, self.bias, batch_stats, factor, self.eps)


class FastGELU(nn.GELU):
    """``nn.GELU`` (exact) computed by :func:`gelu`; ``isinstance(m, nn.GELU)`` holds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x) if self.approximate == "none" else F.gelu(x, approximate=self.approximate)


def _is_exact_gelu(m: nn.Module) -> bool:
    return type(m) is nn.GELU and m.approximate == "none"


class _FusedAway(nn.Identity):
    """Where a GELU was before :func:`use_fast_gelu` moved it into the next BatchNorm."""


def use_fast_gelu(model: nn.Module) -> tuple[int, int]:
    """Switch ``model``'s exact GELUs to mixlab's kernels, in place: each ``nn.GELU`` directly
    followed by an ``nn.BatchNorm2d`` in an ``nn.Sequential`` is fused into it (the GELU becomes
    ``nn.Identity``, the BatchNorm a :class:`GeluBatchNorm2d`; not where either module is used
    elsewhere too, the GELU has hooks, or the Sequential has its own forward), every other one
    becomes a :class:`FastGELU`. Parameters and state_dict keys stay. Returns (pairs fused, GELUs alone)."""
    uses = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    pairs = 0
    for seq in model.modules():
        # only a Sequential that runs its children in order (not a subclass with its own forward)
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            act, bn = seq._modules[a], seq._modules[b]
            # a module used elsewhere too, or a GELU whose output a hook watches, is left as it is
            if (_is_exact_gelu(act) and type(bn) is nn.BatchNorm2d and uses[id(act)] == 1 and uses[id(bn)] == 1
                    and not (act._forward_hooks or act._forward_pre_hooks)):
                seq._modules[a] = _FusedAway()
                bn.__class__ = GeluBatchNorm2d
                pairs += 1
    from .residual import fuse_residual_blocks

    fuse_residual_blocks(model)  # a pair that ends a ConvMixer residual branch also adds the residual
    alone = swap_classes(model, lambda m: FastGELU if _is_exact_gelu(m) else None)
    return pairs, alone


def restore_gelu(model: nn.Module) -> int:
    """Undo :func:`use_fast_gelu` (e.g. before exporting to a format that wants aten ops);
    returns how many modules were switched back."""
    from .residual import unfuse_residual_blocks

    unfuse_residual_blocks(model)
    n = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            if type(seq._modules[a]) is _FusedAway and type(seq._modules[b]) is GeluBatchNorm2d:
                seq._modules[a] = nn.GELU()
                seq._modules[b].__class__ = nn.BatchNorm2d
                n += 1
    return n + swap_classes(model, by_exact_type({FastGELU: nn.GELU}))
