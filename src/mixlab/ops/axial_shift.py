"""Axial shift (AS-MLP): move each channel group by a different offset along one spatial axis.

The official AS-MLP code shifts with a cupy CUDA kernel (so it cannot run on a CPU) and keeps
an equivalent roll-based version in a comment: pad the map, ``torch.chunk`` the channels into
``shift_size`` groups, ``torch.roll`` group ``i`` by ``i - shift_size // 2`` along the axis,
crop back. :func:`axial_shift` computes exactly that result (the tests compare it with such a
pad/chunk/roll/crop reference for every option) without the roll loop.

Semantics, for an input of C channels and an axis of length L:

* channel ``c`` belongs to group ``g = c // ceil(C / shift_size)`` (``torch.chunk``'s split,
  which is also the CUDA kernel's); when C is not a multiple of ``shift_size`` the last group is
  smaller, and for C < shift_size some offsets go unused, exactly as in the official code;
* group ``g`` moves by ``k = (g - shift_size // 2) * dilation`` positions: ``out[..., h] =
  in[..., h - k]`` along the axis (so the first group moves towards index 0);
* positions that come from outside the map take the value of the padding: zeros (the paper's
  default), or what ``F.pad`` with ``reflect``/``replicate``/``circular`` would put there, the
  map being padded by ``(shift_size // 2) * dilation`` on both sides of the axis before the
  shift (the paper's padding ablation; dilation spaces the offsets as in its dilation ablation).

Why this formulation (timed once each on a shared 2-core CPU, torch 2.15, forward + backward of
one W shift of a (32, 96, 56, 56) fp32 tensor; ``benchmarks/bench_axial_shift.py`` measures
the current figures): pad/chunk/roll/cat/crop 700 ms; one pad + one narrow per group + cat
170 ms; one pad + one ``torch.gather`` with a per-channel index 100 ms; one pad (channels padded
to whole groups too) + one ``as_strided`` view + copy 111 ms (and impossible for channels_last,
whose strides would have to be negative); the custom autograd function below 58 ms (NCHW) /
74 ms (channels_last). It wins because it touches each element once per direction: per group
one slice copy from the source into an uninitialised output plus one fill of the strip that
comes from outside, with no padded intermediate and no index tensor; its backward is the same
operation with the offsets negated (the adjoint of a zero-filled shift is the opposite shift),
so it is also twice differentiable. The loop runs over the ``shift_size`` groups (5 by default),
not over channels: each iteration is one large strided copy plus a thin fill, on CPU and CUDA
alike. (Viewing H*W as one axis so that a W shift becomes one contiguous copy per group, then
zeroing the wrapped columns, measured no faster.) For the non-zero padding modes the map is
padded once with ``F.pad`` (whose backward folds the gradient of the padded border back) and
the same function crops each group out of the padded map at its offset.
"""
# (no `from __future__ import annotations`: TorchScript compiles axial_shift, and FX copies string
# annotations into traced code)
import math
from typing import List

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

__all__ = ["axial_shift", "PADDING_MODES", "shift_groups"]

PADDING_MODES = ("zero", "reflect", "replicate", "circular")


def shift_groups(channels: int, shift_size: int, dilation: int = 1) -> tuple[tuple[int, int, int], ...]:
    """``(first_channel, end_channel, offset)`` of every channel group, official grouping."""
    per_group = math.ceil(channels / shift_size)
    half = shift_size // 2
    return tuple(
        (start, min(channels, start + per_group), (g - half) * dilation)
        for g, start in enumerate(range(0, channels, per_group))
    )


def _layout(t: torch.Tensor) -> torch.memory_format:
    # keep channels_last inputs channels_last so the 1x1 convolutions after the shift stay fast
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _group_shift(src: torch.Tensor, groups, dim: int, base: int, out_len: int, fmt) -> torch.Tensor:
    """``out[:, c, .., h, ..] = src[:, c, .., h + base - k_c, ..]`` along ``dim``, zero outside ``src``."""
    in_len = src.shape[dim]
    shape = list(src.shape)
    shape[dim] = out_len
    out = torch.empty(shape, dtype=src.dtype, device=src.device, memory_format=fmt)
    for c0, c1, k in groups:
        o = out[:, c0:c1]
        s = src[:, c0:c1]
        first = base - k  # source index of output position 0
        lo = max(0, -first)  # output range [lo, hi) reads inside the source
        hi = min(out_len, in_len - first)
        if hi <= lo:
            o.zero_()
            continue
        o.narrow(dim, lo, hi - lo).copy_(s.narrow(dim, first + lo, hi - lo))
        if lo > 0:
            o.narrow(dim, 0, lo).zero_()
        if hi < out_len:
            o.narrow(dim, hi, out_len - hi).zero_()
    return out


class _GroupShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, groups, dim, base, out_len, fmt):
        ctx.groups, ctx.dim, ctx.base, ctx.in_len, ctx.in_fmt = groups, dim, base, src.shape[dim], _layout(src)
        return _group_shift(src, groups, dim, base, out_len, fmt)

    @staticmethod
    def backward(ctx, grad):
        # the adjoint reads grad[j - base + k]: the same shift with base and offsets negated
        neg = tuple((c0, c1, -k) for c0, c1, k in ctx.groups)
        grad_src = _GroupShift.apply(grad, neg, ctx.dim, -ctx.base, ctx.in_len, ctx.in_fmt)
        return grad_src, None, None, None, None, None


def _shift_by_slicing(x: torch.Tensor, shift_size: int, dim: int, dilation: int, padding: str) -> torch.Tensor:
    """The same shift as pad, ``torch.chunk``, one crop per group and cat (TorchScript can compile
    this; the autograd function below it cannot). About 3x slower, equal to the last bit: both
    only move values."""
    dim = dim % 4
    if shift_size == 1:
        return x
    pad = (shift_size // 2) * dilation
    length = x.shape[dim]
    pads: List[int] = [pad, pad, 0, 0] if dim == 3 else [0, 0, pad, pad]
    padded = F.pad(x, pads, mode="constant" if padding == "zero" else padding)
    half = shift_size // 2
    out = [g.narrow(dim, pad - (i - half) * dilation, length) for i, g in enumerate(torch.chunk(padded, shift_size, 1))]
    return torch.cat(out, 1)


# A leaf for FX (its loop and checks read the input's shape): traced models call it as one function.
@register_notrace_function
def axial_shift(x: torch.Tensor, shift_size: int, dim: int, dilation: int = 1, padding: str = "zero") -> torch.Tensor:
    """Shift channel group ``g`` of ``x`` (N, C, H, W) by ``(g - shift_size // 2) * dilation`` along ``dim``.

    Args:
        x: a 4-D tensor in NCHW order (contiguous or channels_last memory).
        shift_size: number of channel groups (the official models use 5; 1 is the identity).
        dim: 2 (or -2) shifts along H, 3 (or -1) along W, as in the official ``Shift(size, dim)``.
        dilation: spacing of the offsets (1 = neighbouring positions).
        padding: what enters from outside the map: ``zero``, ``reflect``, ``replicate`` or ``circular``.

    Returns a tensor of the same shape, memory format and dtype (``x`` itself when
    ``shift_size`` is 1); differentiable, twice. In a TorchScript model, the pad / chunk / crop
    formulation (same values, slower).
    """
    if torch.jit.is_scripting():
        return _shift_by_slicing(x, shift_size, dim, dilation, padding)
    return _axial_shift(x, shift_size, dim, dilation, padding)


def _axial_shift(x: torch.Tensor, shift_size: int, dim: int, dilation: int, padding: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"axial_shift expects a 4-D (N, C, H, W) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    if isinstance(shift_size, bool) or not isinstance(shift_size, int) or shift_size < 1:
        raise ValueError(f"shift_size must be a positive integer, got {shift_size!r}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be a positive integer, got {dilation!r}")
    if dim not in (2, 3, -2, -1):
        raise ValueError(f"dim must be 2 (H) or 3 (W) (or -2/-1), got {dim!r}")
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {', '.join(PADDING_MODES)}, got {padding!r}")
    dim = dim % 4
    if shift_size == 1:
        return x  # one group with offset 0, as the official Shift module does
    groups = shift_groups(x.shape[1], shift_size, dilation)
    length = x.shape[dim]
    if padding == "zero":
        return _GroupShift.apply(x, groups, dim, 0, length, _layout(x))
    pad = (shift_size // 2) * dilation
    if padding == "reflect" and pad >= length:
        raise ValueError(
            f"reflect padding needs (shift_size // 2) * dilation < the size of the shifted axis: "
            f"{shift_size} // 2 * {dilation} = {pad} >= {length}"
        )
    if padding == "circular" and pad > length:
        raise ValueError(
            f"circular padding needs (shift_size // 2) * dilation <= the size of the shifted axis: "
            f"{shift_size} // 2 * {dilation} = {pad} > {length}"
        )
    # only the shifted axis needs padding: the official code pads both, then crops the other away
    padded = F.pad(x, (pad, pad, 0, 0) if dim == 3 else (0, 0, pad, pad), mode=padding)
    return _GroupShift.apply(padded, groups, dim, pad, length, _layout(x))
