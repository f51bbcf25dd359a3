"""A dense (one-group) KxK convolution whose forward and backward are the fastest of aten's
and mixlab's methods on this CPU, chosen per shape.

On CPUs without AVX-512, oneDNN computes the weight gradient of a 3x3 convolution at well under
the speed of its forward: ConvMLP-S's layers at batch 32, fp32, channels_last, on 2 AMD EPYC
(Zen 3, AVX2) cores: 128 -> 128 channels on 56x56 took 155 ms forward, 155 ms for the input
gradient and 310-490 ms for the weight gradient; 32 -> 64 channels on 112x112 took 80, 80 and
260-300 ms. The dense convolutions were two thirds of that model's step there. The methods:

* ``aten``: oneDNN's forward and backward.
* ``im2col`` (backward): aten's input gradient; the weight gradient as one matrix product,
  ``dW[(i, j, c_in), c_out] = sum over (n, y, x) of x_padded[n, s*y + d*i, s*x + d*j, c_in] *
  g[n, y, x, c_out]``: the K*K shifted windows of the input (channels_last rows, so each window
  is a strided slice) gathered into a column buffer a chunk of ~4096 output positions at a time
  (the buffer stays in the last-level cache), ``columns^T @ g_rows`` accumulated over the chunks
  in fp32 by MKL, the bias gradient summed from the same rows while they are in cache. Any
  kernel, stride, padding and dilation; fp32 and bf16 (bf16: each chunk's product accumulates in
  fp32 and is rounded once, the chunks summed in fp32). On the machine above: 220 and 135-150 ms
  for those two layers' weight gradients, 0.6-0.7x aten's time on the 3x3 stride-2 downsampling
  convolutions.
* ``winograd`` (forward and backward, fp32 3x3 stride 1): :mod:`mixlab.ops.winograd`'s F(4x4, 3x3),
  a quarter of the multiplications: forward + backward 226 against 539 ms and 161 against 297 ms
  for those two layers. Its outputs and gradients are within about 1e-5 of an fp64 reference
  relative to their largest entry (aten's outputs and input gradients: about 1e-6, its weight
  gradients 2e-6-2e-5; im2col's weight gradients 3e-7-2e-6).

The first forward of each shape times the forward methods and the first backward the backward
ones (interleaved rounds, the best of each), and each choice is kept (stored per CPU, torch
version and threads in the kernel cache folder, as the other ops' choices are): a CPU where
oneDNN's is faster keeps oneDNN's. ``benchmarks/bench_dense_conv.py`` times them all for a
model's layers.

:func:`use_fast_dense_conv` switches a model's dense ``nn.Conv2d`` layers (one group, a kernel
larger than 1x1, numeric padding, zero padding mode, no hooks) to :class:`DenseConv2d` in place
(same parameters and state_dict keys); :func:`restore_dense_conv` switches them back. Anything
but a CPU tensor in channels_last of fp32 or bf16 that needs a gradient (evaluation and
inference among them), and anything under ``torch.compile``, runs ``F.conv2d`` unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .depthwise import _is_nhwc, _pair
from .kernel_build import Plan, time_each
from .winograd import LIBRARY as WINOGRAD
from .winograd import winograd_applies, winograd_available, winograd_conv3x3, winograd_conv3x3_backward
from .module_swap import by_exact_type, swap_classes

__all__ = ["DenseConv2d", "use_fast_dense_conv", "restore_dense_conv", "set_dense_conv_method",
           "dense_conv_weight_grad"]

_DTYPES = (torch.float32, torch.bfloat16)
METHODS = ("aten", "im2col", "winograd")  # backward
FORWARD_METHODS = ("aten", "winograd")
# the im2col method's version and the Winograd kernel's source: a changed one is timed again
PLAN = Plan("dense_conv_plan", identity=lambda: "im2col-1|" + WINOGRAD.source_text())
_method_override: str | None = None
# Output positions per chunk: enough rows for MKL's product to run at full speed (1024-4096 timed
# within 5% of each other on ConvMLP-S's layers), few enough that the column buffer stays in cache.
_TARGET_ROWS = 4096
_MAX_COLUMN_BYTES = 32 << 20


def set_dense_conv_method(method: str | None) -> None:
    """Force one method for every call; None (default) times them per shape. 'aten': aten's
    forward and backward; 'im2col': aten's forward and input gradient, the gathered weight
    gradient; 'winograd': :mod:`mixlab.ops.winograd` for the forward and both gradients where it
    applies (fp32 3x3 stride 1), 'im2col' elsewhere."""
    global _method_override
    if method is not None and method not in METHODS:
        raise ValueError(f"dense conv method must be one of {METHODS} or None, got {method!r}")
    _method_override = method


def _chunks(n: int, ho: int, wo: int, target: int):
    """(n0, n1, r0, r1) covering every output position once: images n0:n1 and output rows r0:r1,
    whole images grouped while one image has at most ``target`` positions, else bands of rows of
    one image (a chunk's output-gradient rows are then one contiguous block of channels_last rows)."""
    if ho * wo <= target:
        per = max(1, target // (ho * wo))
        for n0 in range(0, n, per):
            yield n0, min(n, n0 + per), 0, ho
    else:
        band = max(1, target // wo)
        for i in range(n):
            for r0 in range(0, ho, band):
                yield i, i + 1, r0, min(ho, r0 + band)


def dense_conv_weight_grad(x: torch.Tensor, g: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1,
                           with_bias: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight gradient (C_out, C_in, KH, KW) and, with ``with_bias``, the bias gradient (C_out)
    of a one-group convolution of ``x`` (N, C_in, H, W) whose output gradient is ``g`` (N, C_out,
    Ho, Wo), both on the CPU, by the ``im2col`` method (see the module's docstring). fp32 results."""
    kh, kw = _pair(kernel_size)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    if x.dim() != 4 or g.dim() != 4 or x.shape[0] != g.shape[0]:
        raise ValueError(f"dense_conv_weight_grad wants (N, C_in, H, W) input and (N, C_out, Ho, Wo) output "
                         f"gradient of one batch, got {tuple(x.shape)} and {tuple(g.shape)}")
    n, c, h, w = x.shape
    co, ho, wo = g.shape[1:]
    want = ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
    if (ho, wo) != want:
        raise ValueError(f"an output gradient of {ho}x{wo} does not fit a {kh}x{kw} convolution (stride {(sh, sw)}, "
                         f"padding {(ph, pw)}, dilation {(dh, dw)}) of a {h}x{w} input, whose output is "
                         f"{want[0]}x{want[1]}")
    xl = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view for channels_last input
    gl = g.permute(0, 2, 3, 1).contiguous()
    k2c = kh * kw * c
    target = max(1, min(_TARGET_ROWS, _MAX_COLUMN_BYTES // (k2c * x.element_size())))
    acc = torch.zeros(k2c, co, dtype=torch.float32)
    acc_b = torch.zeros(co, dtype=torch.float32) if with_bias else None
    in_w = sw * (wo - 1) + dw * (kw - 1) + 1  # padded input columns the windows reach
    col_lo, col_hi = max(0, -pw), min(w, in_w - pw)  # input columns that exist, 0 <= . < w
    columns = None
    for n0, n1, r0, r1 in _chunks(n, ho, wo, target):
        b, rows = n1 - n0, r1 - r0
        top = sh * r0 - ph  # first input row the chunk's windows reach (negative: padding)
        in_h = sh * (rows - 1) + dh * (kh - 1) + 1
        row_lo, row_hi = max(0, top), min(h, top + in_h)
        window = x.new_zeros(b, in_h, in_w, c)  # the chunk's input with its zero padding
        if row_hi > row_lo and col_hi > col_lo:
            window[:, row_lo - top:row_hi - top, col_lo + pw:col_hi + pw].copy_(xl[n0:n1, row_lo:row_hi, col_lo:col_hi])
        if columns is None or columns.shape[0] < b * rows * wo:
            columns = x.new_empty(b * rows * wo, k2c)
        cols = columns[:b * rows * wo].view(b, rows, wo, k2c)
        for i in range(kh):
            for j in range(kw):
                t = (i * kw + j) * c
                cols[..., t:t + c].copy_(window[:, dh * i:dh * i + sh * (rows - 1) + 1:sh,
                                                dw * j:dw * j + sw * (wo - 1) + 1:sw])
        g_rows = gl[n0:n1, r0:r1].reshape(-1, co)
        a = cols.view(-1, k2c).t()
        if x.dtype == torch.float32:
            acc.addmm_(a, g_rows)
        else:  # bf16: the product accumulates in fp32 and is rounded once per chunk
            acc += torch.mm(a, g_rows)
        if with_bias:
            acc_b += g_rows.sum(0, dtype=torch.float32)
    gw = acc.t().contiguous().view(co, kh, kw, c).permute(0, 3, 1, 2)  # channels_last
    return gw, acc_b


def _winograd_ok(x, w, stride, padding, dilation) -> bool:
    return winograd_applies(x, w, stride, padding, dilation) and winograd_available()


def _backward(method: str, x, g, w, stride, padding, dilation, input_grad: bool, weight_grad: bool,
              with_bias: bool):
    """(dx, dweight, dbias), each None where not asked for, dx in ``x``'s dtype (dweight, dbias:
    fp32 from the im2col and Winograd methods), dweight in ``w``'s memory format."""
    fmt = torch.channels_last if _is_nhwc(w) else torch.contiguous_format
    if method == "aten":
        return torch.ops.aten.convolution_backward(g, x, w, [w.shape[0]] if with_bias else None, stride, padding,
                                                   dilation, False, [0, 0], 1, [input_grad, weight_grad, with_bias])
    if method == "winograd":
        gx, gw = winograd_conv3x3_backward(x, w, g, padding[0], input_grad=input_grad, weight_grad=weight_grad)
        gw = gw.contiguous(memory_format=fmt) if weight_grad else None
    else:
        gx = gw = None
        if input_grad:
            gx = torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, dilation, False, [0, 0], 1,
                                                     [True, False, False])[0]
        if weight_grad:  # the bias gradient comes from the same pass over the rows
            gw, gb = dense_conv_weight_grad(x, g, w.shape[2:], stride, padding, dilation, with_bias)
            return gx, gw.contiguous(memory_format=fmt), gb
    return gx, gw, g.sum((0, 2, 3), dtype=torch.float32) if with_bias else None


def _forward(method: str, x, w, b, stride, padding, dilation):
    if method == "winograd":
        return winograd_conv3x3(x, w, b, padding[0])
    return F.conv2d(x, w, b, stride, padding, dilation)


def _key(x, w, stride, padding, dilation, with_bias: bool) -> str:
    return (f"{tuple(x.shape)}|{tuple(w.shape)}|s{tuple(stride)}|p{tuple(padding)}|d{tuple(dilation)}|"
            f"{str(x.dtype)[6:]}|bias{int(with_bias)}|t{torch.get_num_threads()}")


def _choose_forward(x, w, b, stride, padding, dilation) -> str:
    """'aten' or 'winograd' for this forward: the stored choice, else timed now and stored."""
    if not _winograd_ok(x, w, stride, padding, dilation):
        return "aten"
    if _method_override is not None:
        return "winograd" if _method_override == "winograd" else "aten"
    key = "forward|" + _key(x, w, stride, padding, dilation, b is not None)
    # (called from the autograd Function's forward: gradients are off while it times)
    return PLAN.fastest(key, FORWARD_METHODS, lambda: time_each(
        {m: (lambda m=m: _forward(m, x, w, b, stride, padding, dilation)) for m in FORWARD_METHODS}))


def _choose_backward(x, g, w, stride, padding, dilation, input_grad: bool, weight_grad: bool,
                     with_bias: bool) -> str:
    """The backward method: the stored choice, else the candidates (Winograd's where it applies)
    timed now and the fastest stored."""
    winograd_ok = _winograd_ok(x, w, stride, padding, dilation)
    candidates = [m for m in METHODS if m != "winograd" or winograd_ok]
    if _method_override is not None:
        return _method_override if _method_override in candidates else "im2col"
    # whether Winograd's could run is part of the key: a choice made without it (no compiler yet,
    # a failed build) is timed again where it can run
    key = (f"backward|dx{int(input_grad)}|dw{int(weight_grad)}|w{int(winograd_ok)}|"
           + _key(x, w, stride, padding, dilation, with_bias))
    return PLAN.fastest(key, candidates, lambda: time_each(
        {m: (lambda m=m: _backward(m, x, g, w, stride, padding, dilation, input_grad, weight_grad, with_bias))
         for m in candidates}))


class _DenseConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, compute_dtype, stride, padding, dilation):
        stride, padding, dilation = list(stride), list(padding), list(dilation)
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(compute_dtype), weight.to(compute_dtype)
            bc = bias.to(compute_dtype) if bias is not None else None
            out = _forward(_choose_forward(xc, wc, bc, stride, padding, dilation), xc, wc, bc, stride, padding,
                           dilation)
        ctx.save_for_backward(xc, wc)
        ctx.conv = (stride, padding, dilation)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        xc, wc = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad_out.to(xc.dtype).contiguous(memory_format=torch.channels_last)
        input_grad, weight_grad, with_bias = (bool(n) for n in ctx.needs_input_grad[:3])
        if not (input_grad or weight_grad or with_bias):
            return None, None, None, None, None, None, None
        method = _choose_backward(xc, g, wc, stride, padding, dilation, input_grad, weight_grad, with_bias)
        gx, gw, gb = _backward(method, xc, g, wc, stride, padding, dilation, input_grad, weight_grad, with_bias)
        gx = gx.to(x_dtype) if input_grad else None
        gw = gw.to(w_dtype) if weight_grad else None
        gb = gb.to(b_dtype) if with_bias else None
        return gx, gw, gb, None, None, None, None


class DenseConv2d(nn.Conv2d):
    """A one-group KxK ``nn.Conv2d`` computed in training by the fastest of aten's, the gathered
    weight gradient and Winograd's on this machine; ``isinstance(m, nn.Conv2d)`` holds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if (not torch.is_grad_enabled() or torch.compiler.is_compiling() or x.device.type != "cpu" or x.dim() != 4
                or not _is_nhwc(x) or dtype not in _DTYPES or not (x.requires_grad or self.weight.requires_grad)):
            return super().forward(x)
        return _DenseConv2dFn.apply(x, self.weight, self.bias, dtype, self.stride, self.padding, self.dilation)


def _eligible(m: nn.Module) -> bool:
    # (a one-channel conv is also depthwise: mixlab.ops.depthwise takes it)
    return (type(m) is nn.Conv2d and m.groups == 1 and m.kernel_size != (1, 1) and not isinstance(m.padding, str)
            and not m.in_channels == m.out_channels == 1
            and m.padding_mode == "zeros" and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks))


def use_fast_dense_conv(model: nn.Module) -> int:
    """Switch ``model``'s dense KxK convolutions to :class:`DenseConv2d` in place; returns how many."""
    return swap_classes(model, lambda m: DenseConv2d if _eligible(m) else None)


def restore_dense_conv(model: nn.Module) -> int:
    """Undo :func:`use_fast_dense_conv`; returns how many modules were switched back."""
    return swap_classes(model, by_exact_type({DenseConv2d: nn.Conv2d}))
