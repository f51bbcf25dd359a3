"""A depthwise convolution whose backward on the CPU is as fast as its forward.

aten computes a depthwise convolution's forward and input gradient quickly on the CPU, but its
weight gradient is slow: for one ConvMixer-256/8 layer (128x256x16x16, 5x5, bf16, channels_last)
it took 179 ms on a 2-core Intel Xeon and 54 ms on a 2-core AMD EPYC, where the forward takes
2-3.5 ms (benchmarks/bench_depthwise.py), and it was half or more of a ConvMixer training step.
:func:`depthwise_conv2d` computes the weight gradient with a small C++ kernel built at first use
(:mod:`mixlab.ops.depthwise_build`), summing bf16 products in fp32. The forward and the input
gradient (a forward with the flipped kernel) run through aten or through the same library's
channels-last forward kernel (AVX-512 CPUs; about twice aten's speed on Conv2Former's 11x11
layers, slower than aten on small kernels over large maps), whichever the first call of each
shape times faster. Where no compiler is found, it falls back to aten's weight gradient in fp32
(the faster of aten's two on bf16 inputs) and aten's forward, and says so once.

Scope: stride 1, one output channel per input channel (``groups == in_channels ==
out_channels``), zero padding (any symmetric amount, ``'same'`` for an odd dilated extent,
``'valid'``), any kernel size and dilation, fp32 or bf16 (or autocast to bf16), on the CPU.
Anything else runs through ``F.conv2d`` unchanged (CUDA keeps cuDNN).

:func:`use_fast_depthwise` switches every eligible ``nn.Conv2d`` of a model to
:class:`DepthwiseConv2d` in place (same parameters, same state_dict keys).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .depthwise_build import LIBRARY, load_kernel
from .kernel_build import Plan, dtype_suffix, time_each
from .module_swap import by_exact_type, swap_classes

__all__ = ["depthwise_conv2d", "depthwise_weight_grad", "DepthwiseConv2d", "use_fast_depthwise",
           "restore_depthwise", "fast_depthwise_available", "ineligible_reason"]

_FAST_DTYPES = (torch.float32, torch.bfloat16)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _resolve_padding(padding, kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int] | None:
    """Symmetric (ph, pw) for ``padding``, or None where it is not symmetric ('same' with an even
    dilated extent pads one side more: aten handles that, the fast path does not)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            ext = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return None if any(e % 2 for e in ext) else (ext[0] // 2, ext[1] // 2)
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = _pair(padding)
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must not be negative, got {padding!r}")
    return (ph, pw)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


# ----------------------------------------------------------------------------- weight gradient
#
# Which computation is fastest depends on the CPU, the shape, the dtype and the layout: the
# kernel wins by 5-10x on ConvMixer's 5x5 and Conv2Former's 11x11 layers in channels_last, but
# oneDNN has a fast 3x3 path that beats it on small maps (benchmarks/bench_depthwise.py). So the
# first backward of each new shape times every candidate and keeps the fastest in PLAN
# (:class:`mixlab.ops.kernel_build.Plan`, per CPU, torch version and thread count).

METHODS = ("kernel", "kernel_nhwc", "aten", "aten_fp32")
_method_override: str | None = None  # set_weight_grad_method(); None = time and choose
# keyed by the kernel source and the forward kernel's margin too: a changed kernel or rule is timed again
PLAN = Plan("depthwise_plan", identity=lambda: f"{LIBRARY.source_text()}|margin {FORWARD_KERNEL_MARGIN}")


def set_weight_grad_method(method: str | None) -> None:
    """Force one weight-gradient computation: 'kernel' (the compiled kernel in the input's own
    layout), 'kernel_nhwc' (converted to channels_last first), 'aten' (aten in the input's
    dtype), 'aten_fp32' (aten on fp32 copies); None (default) times them per shape and keeps
    the fastest."""
    global _method_override
    if method is not None and method not in METHODS:
        raise ValueError(f"weight-gradient method must be one of {', '.join(METHODS)} or None, got {method!r}")
    _method_override = method


def _aten_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel, padding, dilation,
                      with_bias: bool = False, fp32: bool = True):
    """aten's depthwise weight (and bias) gradient; ``fp32`` on fp32 copies (on bf16 inputs often
    faster than aten's bf16 path, and summed in fp32)."""
    c = x.shape[1]
    if fp32:
        x, grad_out = x.float(), grad_out.float()
    w = torch.empty((c, 1, *kernel), dtype=x.dtype, device=x.device)
    _, gw, gb = torch.ops.aten.convolution_backward(
        grad_out, x, w, [c] if with_bias else None, [1, 1], list(padding), list(dilation), False, [0, 0], c,
        [False, True, with_bias])
    return gw.float(), (gb.float() if with_bias else None)


def _kernel_weight_grad(lib, x, grad_out, kernel, padding, dilation, with_bias: bool, nhwc: bool):
    n, c, h, w = x.shape
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    xs = x.contiguous(memory_format=fmt)
    gs = grad_out.to(x.dtype).contiguous(memory_format=fmt)
    gw = torch.empty((c, 1, *kernel), dtype=torch.float32)
    gb = torch.empty((c,), dtype=torch.float32) if with_bias else None
    name = f"mixlab_dw_wgrad_{'nhwc' if nhwc else 'nchw'}_{dtype_suffix(x)}"
    rc = getattr(lib, name)(xs.data_ptr(), gs.data_ptr(), gw.data_ptr(), gb.data_ptr() if with_bias else None,
                            n, c, h, w, ho, wo, *kernel, *padding, *dilation, torch.get_num_threads())
    LIBRARY.check(rc)
    return gw, gb


def _is_nhwc(x: torch.Tensor) -> bool:
    # a 1x1 map or one channel is both layouts at once: call that NCHW
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _candidates(x: torch.Tensor, lib) -> list[str]:
    out = []
    if lib is not None and x.device.type == "cpu" and x.dtype in _FAST_DTYPES:
        out += ["kernel"] if _is_nhwc(x) else ["kernel", "kernel_nhwc"]
    out.append("aten")
    if x.dtype != torch.float32:
        out.append("aten_fp32")
    return out


def _run_method(method, lib, x, grad_out, kernel, padding, dilation, with_bias):
    if method.startswith("kernel"):
        return _kernel_weight_grad(lib, x, grad_out, kernel, padding, dilation, with_bias,
                                   nhwc=_is_nhwc(x) or method == "kernel_nhwc")
    return _aten_weight_grad(x, grad_out.to(x.dtype), kernel, padding, dilation, with_bias, fp32=method == "aten_fp32")


def _choose(key: str, cands: list[str], run, kernel_margin: float = 1.0) -> str:
    """The fastest of ``cands`` timed alone, stored under ``key``. With ``kernel_margin`` < 1 a
    candidate named ``*kernel`` must take under that fraction of the best other's time."""
    times = time_each({m: (lambda m=m: run(m)) for m in cands})
    choice = min(times, key=times.get)
    others = {m: t for m, t in times.items() if not m.endswith("kernel")}
    if choice.endswith("kernel") and others and times[choice] > kernel_margin * min(others.values()):
        choice = min(others, key=others.get)
    PLAN.set(key, choice)
    return choice


# The forward kernel timed alone overstates its gain inside a training step: on ConvMixer-256/8's
# 5x5 layer it was 2% faster than aten alone (11% with cold caches) but the step with it 3% slower
# (316 against 307 ms, forced alternately in one process; Conv2Former-N's 11x11 layers: 2.2x alone,
# and the step 2.4% faster). So it must beat aten by this much to be chosen.
FORWARD_KERNEL_MARGIN = 0.8


@torch.library.custom_op("mixlab::depthwise_weight_grad", mutates_args=())
def _weight_grad_op(x: torch.Tensor, grad_out: torch.Tensor, kh: int, kw: int, ph: int, pw: int, dh: int,
                    dw: int, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # A registered op (not a bare Python call) so torch.compile treats it as one opaque node.
    lib = load_kernel() if x.device.type == "cpu" else None
    kernel, padding, dilation = (kh, kw), (ph, pw), (dh, dw)
    cands = _candidates(x, lib)
    if _method_override is not None:
        method = _method_override if _method_override in cands else "aten_fp32" if "aten_fp32" in cands else "aten"
    elif len(cands) == 1:
        method = cands[0]
    else:
        key = (f"{tuple(x.shape)}|k{kh}x{kw}|p{ph},{pw}|d{dh},{dw}|{str(x.dtype)[6:]}|"
               f"{'nhwc' if _is_nhwc(x) else 'nchw'}|bias{int(with_bias)}|t{torch.get_num_threads()}|"
               # the candidates in the key: a choice made while the kernel could not be built (no
               # compiler yet, a stale build) is not kept once it can
               f"{','.join(cands)}")
        method = PLAN.get(key)
        if method not in cands:
            method = _choose(key, cands, lambda m: _run_method(m, lib, x, grad_out, kernel, padding, dilation,
                                                               with_bias))
    gw, gb = _run_method(method, lib, x, grad_out, kernel, padding, dilation, with_bias)
    return gw, (gb if gb is not None else gw.new_empty(0))


@_weight_grad_op.register_fake
def _(x, grad_out, kh, kw, ph, pw, dh, dw, with_bias):
    return (x.new_empty((x.shape[1], 1, kh, kw), dtype=torch.float32),
            x.new_empty((x.shape[1],) if with_bias else (0,), dtype=torch.float32))


def depthwise_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel_size, padding=0,
                          dilation=1) -> torch.Tensor:
    """The weight gradient (C, 1, KH, KW), fp32, of a stride-1 depthwise convolution of ``x``
    (N, C, H, W) whose output gradient is ``grad_out`` (N, C, Ho, Wo)."""
    kernel, dil = _pair(kernel_size), _pair(dilation)
    pad = _resolve_padding(padding, kernel, dil)
    if pad is None:
        raise ValueError(f"padding {padding!r} is asymmetric for kernel {kernel} and dilation {dil}")
    if x.dim() != 4 or grad_out.dim() != 4 or x.shape[:2] != grad_out.shape[:2]:
        raise ValueError(f"x must be (N, C, H, W) and grad_out (N, C, Ho, Wo) with the same N and C; got "
                         f"{tuple(x.shape)} and {tuple(grad_out.shape)}")
    expect = [x.shape[i + 2] + 2 * pad[i] - dil[i] * (kernel[i] - 1) for i in range(2)]
    if list(grad_out.shape[2:]) != expect:
        raise ValueError(f"grad_out is {tuple(grad_out.shape[2:])} spatially, but a stride-1 convolution of "
                         f"{tuple(x.shape[2:])} with kernel {kernel}, padding {pad}, dilation {dil} gives {tuple(expect)}")
    return _weight_grad_op(x, grad_out, *kernel, *pad, *dil, False)[0]


# ----------------------------------------------------------------------------- forward
#
# aten's channels-last depthwise forward is fast for small kernels but ran at about half the
# kernel's speed on Conv2Former's 11x11 layers (benchmarks/bench_depthwise.py), so where the
# kernel can run (a CPU with AVX-512, channels_last, column dilation 1) the first call of each
# shape times both and keeps the faster, in the same plan.

def _kernel_forward_ok(lib, x: torch.Tensor, kernel, dilation) -> bool:
    return (lib is not None and x.device.type == "cpu" and x.dtype in _FAST_DTYPES and _is_nhwc(x)
            and dilation[1] == 1 and 1 <= kernel[1] <= lib.mixlab_dw_fwd_max_kw())


def _kernel_forward(lib, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, padding, dilation,
                    add: torch.Tensor | None = None) -> torch.Tensor:
    """The C++ forward: x (N, C, H, W) channels_last, w (C, 1, KH, KW) in x's dtype, b or None;
    ``add`` (output-shaped, x's dtype, or None) is summed in before the output is rounded."""
    n, c, h, wd = x.shape
    kh, kw = w.shape[2], w.shape[3]
    ho, wo = h + 2 * padding[0] - dilation[0] * (kh - 1), wd + 2 * padding[1] - (kw - 1)
    y = torch.empty((n, ho, wo, c), dtype=x.dtype).permute(0, 3, 1, 2)  # channels_last
    wt = w.detach().float()[:, 0].permute(1, 2, 0).contiguous()  # (KH, KW, C)
    bt = b.detach().float().contiguous() if b is not None else None
    if add is not None:
        if add.shape != y.shape or add.dtype != x.dtype:
            raise ValueError(f"add must be {tuple(y.shape)} {x.dtype}, got {tuple(add.shape)} {add.dtype}")
        add = add.contiguous(memory_format=torch.channels_last)
    name = f"mixlab_dw_fwd_nhwc_{'bf16' if x.dtype == torch.bfloat16 else 'f32'}"
    rc = getattr(lib, name)(x.data_ptr(), wt.data_ptr(), bt.data_ptr() if bt is not None else None,
                            add.data_ptr() if add is not None else None, y.data_ptr(),
                            n, c, h, wd, ho, wo, kh, kw, *padding, *dilation, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"the depthwise forward kernel refused kernel {(kh, kw)}, dilation {dilation} (code {rc})")
    return y


def _choose_forward(kind: str, x: torch.Tensor, runs: dict) -> str:
    """Which of ``runs`` ({name: call}) computes ``kind`` (the call and its shape, e.g. 'fwd|...'
    or 'dgrad|...') on ``x``: the plan's choice, timed on first use (a '*kernel' must beat the
    others by FORWARD_KERNEL_MARGIN)."""
    if len(runs) == 1:
        return next(iter(runs))
    key = f"{kind}|{str(x.dtype)[6:]}|{'nhwc' if _is_nhwc(x) else 'nchw'}|t{torch.get_num_threads()}|{','.join(runs)}"
    method = PLAN.get(key)
    if method not in runs:
        method = _choose(key, list(runs), lambda m: runs[m](), FORWARD_KERNEL_MARGIN)
    return method


def _forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, padding, dilation) -> torch.Tensor:
    """The depthwise convolution of x by w (stride 1, symmetric zero padding), aten's or the
    kernel's, whichever this machine runs faster for the shape."""
    def aten():
        return F.conv2d(x, w, b, 1, padding, dilation, x.shape[1])

    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return aten()  # (nothing is timed or looked up while tracing)
    lib = load_kernel()
    runs = {"aten": aten}
    if _kernel_forward_ok(lib, x, (w.shape[2], w.shape[3]), dilation):
        runs["kernel"] = lambda: _kernel_forward(lib, x, w, b, padding, dilation)
    key_shape = f"{tuple(x.shape)}|k{w.shape[2]}x{w.shape[3]}|p{padding[0]},{padding[1]}|d{dilation[0]},{dilation[1]}"
    return runs[_choose_forward(f"fwd|{key_shape}|bias{int(b is not None)}", x, runs)]()


# ----------------------------------------------------------------------------- input gradient
#
# The input gradient of a stride-1 depthwise convolution is itself a depthwise convolution of the
# output gradient with the spatially flipped kernel and padding d*(k-1) - p. aten's forward path
# for that was faster than its own input-gradient path on every shape measured here (ConvMixer's
# 5x5 layer, bf16: 2.0 against 3.5 ms, 2 EPYC cores), but that is one machine's measurement: the
# first backward of each new shape times both and keeps the faster, in the same plan.

def _aten_dgrad_sums_in_low_precision(g: torch.Tensor) -> bool:
    """Whether aten's depthwise input gradient would sum ``g``'s bf16 / fp16 products in that
    dtype: on a CPU where oneDNN has no bf16 path (no AVX-512, e.g. AMD EPYC Zen 3) aten takes
    its generic backward, which did (relative error 0.011-0.022 against fp64 for 5x5-11x11
    kernels, bf16, where the flipped forward's was 0.002, as on CPUs with oneDNN's path)."""
    return (g.device.type == "cpu" and g.dtype in (torch.bfloat16, torch.float16)
            and not _onednn_low_precision_supported(g.dtype))


@functools.cache
def _onednn_low_precision_supported(dtype: torch.dtype) -> bool:
    ops = torch.ops.mkldnn
    try:
        return bool(ops._is_mkldnn_bf16_supported() if dtype == torch.bfloat16 else ops._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN: aten's generic path
        return False


def _flipped_padding(padding, kernel, dilation) -> tuple[int, int] | None:
    pad = tuple(d * (k - 1) - p for p, k, d in zip(padding, kernel, dilation))
    return pad if min(pad) >= 0 else None


def _input_grad(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, padding, dilation,
                add: torch.Tensor | None = None) -> torch.Tensor:
    """The input gradient for output gradient ``g``, plus ``add`` (another gradient of the same
    input, e.g. a residual's) where given: summed inside the C++ kernel when that is the method,
    else added after."""
    kernel = (w.shape[2], w.shape[3])
    flipped = _flipped_padding(padding, kernel, dilation)

    low_precision_sums = _aten_dgrad_sums_in_low_precision(g)

    def aten():
        # on fp32 copies where aten would sum in bf16 (only reached there when no flipped form exists:
        # a padding past the kernel's reach)
        gs, xs, ws = (g.float(), x.float(), w.float()) if low_precision_sums else (g, x, w)
        return torch.ops.aten.convolution_backward(gs, xs, ws, None, [1, 1], list(padding), list(dilation), False,
                                                   [0, 0], x.shape[1], [True, False, False])[0].to(g.dtype)

    def via_forward():
        with torch.autocast(g.device.type, enabled=False):  # in g's dtype, as aten's own path computes
            return F.conv2d(g, w.flip(2, 3), None, 1, flipped, dilation, x.shape[1])

    def plus(gx: torch.Tensor) -> torch.Tensor:
        return gx if add is None else gx.add_(add)

    if flipped is None or g.device.type != "cpu" or torch.compiler.is_compiling():
        return plus(aten())  # (nothing is timed or looked up while tracing)
    # with ``add``, each candidate is timed with its sum: inside the kernel it is nearly free, after
    # aten's it is one more pass (ConvMixer's 5x5, bf16: 2.0 against 1.8 + 0.6 ms)
    runs = {} if low_precision_sums else {"aten": lambda: plus(aten())}
    runs["flipped_forward"] = lambda: plus(via_forward())
    lib = load_kernel()
    if _kernel_forward_ok(lib, x, kernel, dilation) and g.dtype == w.dtype == x.dtype:
        runs["flipped_kernel"] = lambda: _kernel_forward(lib, g.contiguous(memory_format=torch.channels_last),
                                                         w.flip(2, 3), None, flipped, dilation,
                                                         add=None if add is None else add.to(g.dtype))
    method = _choose_forward(f"dgrad|{tuple(x.shape)}|k{kernel[0]}x{kernel[1]}|p{padding[0]},{padding[1]}|"
                             f"d{dilation[0]},{dilation[1]}{'|+add' if add is not None else ''}", x, runs)
    return runs[method]()


# ----------------------------------------------------------------------------- autograd

class _DepthwiseConv2dFn(torch.autograd.Function):
    """forward: aten's or the C++ kernel's (:func:`_forward`); input gradient: aten's, or the
    forward with the flipped kernel, aten's or the kernel's (:func:`_input_grad`); weight gradient:
    :func:`_weight_grad_op` (fp32 sums). Each the faster on this machine for the shape.

    Under autocast the casts happen here, so the weight gradient is returned in the weight's
    own dtype straight from the fp32 sums instead of being rounded to bf16 first."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation, compute_dtype):
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(compute_dtype), weight.to(compute_dtype)
            bc = bias.to(compute_dtype) if bias is not None else None
            out = _forward(xc, wc, bc, padding, dilation)
        ctx.save_for_backward(xc, wc)
        ctx.conf = (padding, dilation, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xc, wc = ctx.saved_tensors
        padding, dilation, x_dtype, w_dtype, b_dtype = ctx.conf
        gx = gw = gb = None
        g = grad_out.to(xc.dtype)
        if ctx.needs_input_grad[0]:
            gx = _input_grad(g, xc, wc, padding, dilation).to(x_dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # the bias gradient comes with the weight's (one pass over dY, summed in fp32)
            with_bias = bool(ctx.needs_input_grad[2])
            gw, gb = _weight_grad_op(xc, g, wc.shape[2], wc.shape[3], *padding, *dilation, with_bias)
            gw = gw.to(w_dtype) if ctx.needs_input_grad[1] else None
            gb = gb.to(b_dtype) if with_bias else None
        return gx, gw, gb, None, None, None


def _check_depthwise(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"depthwise_conv2d takes a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    c = x.shape[1]
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[0] % c != 0:
        raise ValueError(f"depthwise_conv2d needs a weight of shape (C*m, 1, kh, kw) for an input of C={c} "
                         f"channels (groups == C), got {tuple(weight.shape)}; for a dense or grouped "
                         "convolution use torch.nn.functional.conv2d")


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
                     padding=0, dilation=1) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)`` with a fast CPU backward.

    ``weight`` is (C, 1, kh, kw). Outside the fast path's scope (stride > 1, a channel
    multiplier, asymmetric 'same' padding, CUDA, fp16/fp64, no gradient needed) this is exactly
    ``F.conv2d``.
    """
    _check_depthwise(x, weight)
    c = x.shape[1]
    kernel, dil = (weight.shape[2], weight.shape[3]), _pair(dilation)
    pad = _resolve_padding(padding, kernel, dil)
    autocast = _autocast_dtype(x.device.type)
    compute = autocast or x.dtype
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if (not needs_grad or pad is None or _pair(stride) != (1, 1) or weight.shape[0] != c
            or x.device.type != "cpu" or compute not in _FAST_DTYPES
            or (autocast is None and weight.dtype != x.dtype)):  # F.conv2d's own dtype error
        return F.conv2d(x, weight, bias, stride, padding, dilation, c)
    return _DepthwiseConv2dFn.apply(x, weight, bias, pad, dil, compute)


# ----------------------------------------------------------------------------- module form

def ineligible_reason(m: nn.Module) -> str | None:
    """None when ``m`` can run as :class:`DepthwiseConv2d`, else why not."""
    if type(m) is not nn.Conv2d and type(m) is not DepthwiseConv2d:
        return f"{type(m).__name__} is not a plain nn.Conv2d"
    if not (m.groups == m.in_channels == m.out_channels):
        return (f"not depthwise: groups={m.groups}, in_channels={m.in_channels}, out_channels={m.out_channels} "
                "(needs all three equal)")
    if m.stride != (1, 1):
        return f"stride {m.stride} (only stride 1 is supported)"
    if m.padding_mode != "zeros":
        return f"padding_mode {m.padding_mode!r} (only zero padding is supported)"
    if _resolve_padding(m.padding, m.kernel_size, m.dilation) is None:
        return f"padding {m.padding!r} is asymmetric for kernel {m.kernel_size}, dilation {m.dilation}"
    return None


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` (depthwise, stride 1, zero padding) computed by :func:`depthwise_conv2d`.

    Same parameters and state_dict as ``nn.Conv2d``; ``isinstance(m, nn.Conv2d)`` holds.
    """

    def __init__(self, channels: int, kernel_size, padding=0, dilation=1, bias: bool = True, device=None,
                 dtype=None):
        super().__init__(channels, channels, kernel_size, 1, padding, dilation, channels, bias, "zeros", device,
                         dtype)
        reason = ineligible_reason(self)
        if reason:
            raise ValueError(f"DepthwiseConv2d: {reason}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


def use_fast_depthwise(model: nn.Module) -> int:
    """Switch every eligible depthwise ``nn.Conv2d`` in ``model`` to :class:`DepthwiseConv2d`, in
    place (the module objects, their parameters, hooks and state_dict keys stay the same; only
    the class changes). Returns how many were switched; others are left as they are."""
    return swap_classes(model, lambda m: DepthwiseConv2d if type(m) is nn.Conv2d and ineligible_reason(m) is None
                        else None)


def restore_depthwise(model: nn.Module) -> int:
    """Undo :func:`use_fast_depthwise` (e.g. before exporting to a format that wants aten ops)."""
    return swap_classes(model, by_exact_type({DepthwiseConv2d: nn.Conv2d}))


def fast_depthwise_available() -> bool:
    """Whether the compiled weight-gradient kernel is loaded (building it on first call)."""
    return load_kernel() is not None
