"""A 3x3 stride-1 convolution by Winograd's F(4x4, 3x3) on the CPU: forward, input gradient and
weight gradient, for fp32 channels-last maps.

Each 4x4 block of the output is computed from the 6x6 block of the input around it with 36
multiplications per channel pair instead of 144 (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", CVPR 2016). The tile transforms are mixlab's kernel
(``winograd_kernels.cpp``); the 36 matrix products between them are ``torch.bmm`` (MKL):

* forward: ``V = B^T d B`` for every input tile, ``M[k] = V[k] @ U[k]`` with ``U = G w G^T``,
  ``y = A^T m A``;
* backward: ``Mg = A dy A^T`` (the output transform's adjoint), ``dV[k] = Mg[k] @ U[k]^T`` then
  ``dx = B dv B^T`` summed over the overlapping tiles, and ``dU[k] = V[k]^T @ Mg[k]`` then
  ``dw = G^T du G`` (``V`` recomputed from the input rather than kept from the forward: 2.25x
  the input's size).

Why: a convolution's multiplications, not its memory traffic, bound a 3x3 layer with many
channels, and oneDNN already runs them near the CPU's peak; a quarter of them is the way to go
faster. The transforms walk the map a block of tile rows at a time (each block's matrices about
4 MB), so that the transformed tiles and the products between them stay in the cache. On 2 AMD
EPYC (Zen 3, AVX2) cores, ConvMLP-S's layers at batch 32 (fp32, channels_last): 128 -> 128
channels on 56x56, forward 68 against aten's 155 ms, backward 158 against 384 (aten's input
gradient and the im2col weight gradient: 154 + 229); 32 -> 64 channels on 112x112, forward 55
against 79, backward 106 against 217 (``benchmarks/bench_dense_conv.py``).

Accuracy: the transforms' constants (up to 8 and 1/24) cost some fp32 precision: the outputs
and gradients are within about 1e-5 of an fp64 reference relative to their largest entry, against
about 1e-6 for aten's outputs and input gradients (its weight gradients: 2e-6-2e-5). :mod:`mixlab.ops.dense_conv` offers this method beside
aten's and times them per shape.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .kernel_build import KernelLibrary

__all__ = ["winograd_available", "winograd_applies", "winograd_conv3x3", "winograd_conv3x3_backward"]

_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
LIBRARY = KernelLibrary(
    Path(__file__).with_name("winograd_kernels.cpp"), "mixlab_winograd", "Winograd 3x3 convolution",
    ("mixlab_winograd_abi_version", 2),
    {"mixlab_winograd_input_tf": (_I, [_P, _P, _L, _L, _L, _L, _L, _L, _L, _I]),
     "mixlab_winograd_output_tf": (_I, [_P, _P, _P, _L, _L, _L, _L, _L, _L, _L, _I]),
     "mixlab_winograd_grad_tf": (_I, [_P, _P, _L, _L, _L, _L, _L, _L, _L, _I]),
     "mixlab_winograd_input_grad_tf": (_I, [_P, _P, _L, _L, _L, _L, _L, _L, _L, _I])},
    "MIXLAB_FAST_WINOGRAD_BUILD", "3x3 convolutions run as aten's (and the im2col weight gradient)")

_F64 = torch.float64
_G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=_F64)


def winograd_available() -> bool:
    """Whether the transform kernel is loaded (building it on first call)."""
    return LIBRARY.load() is not None


def winograd_applies(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> bool:
    """Whether :func:`winograd_conv3x3` computes this convolution: fp32 CPU tensors, a 3x3 kernel
    of one group, stride 1, dilation 1, the same padding on every side, a batch and an output of at
    least 1x1."""
    p = tuple(padding)
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() == 4 and x.shape[0] > 0
            and tuple(weight.shape[2:]) == (3, 3) and weight.shape[1] == x.shape[1] and tuple(stride) == (1, 1)
            and tuple(dilation) == (1, 1) and p[0] == p[1] and x.shape[2] + 2 * p[0] >= 3
            and x.shape[3] + 2 * p[0] >= 3)


# Bytes of one block's [36][tiles][channels] matrix: the transforms and the products of a block
# then work within the last-level cache (whole-map matrices of 115 MB for a 128-channel 56x56
# layer at batch 32 went through memory between each step).
_BLOCK_BYTES = 4 << 20


def _blocks(x: torch.Tensor, p: int, channels: int):
    """(t0, t1) ranges of whole tile rows covering the map's N * TH * TW tiles, each block's
    matrices at most about ``_BLOCK_BYTES`` (at least one tile row)."""
    n, _, h, w = x.shape
    th, tw = (h + 2 * p - 2 + 3) // 4, (w + 2 * p - 2 + 3) // 4
    rows = max(1, _BLOCK_BYTES // (36 * 4 * channels * tw))
    total = n * th
    for r0 in range(0, total, rows):
        yield r0 * tw, min(total, r0 + rows) * tw


def _buffer(blocks: list, channels: int) -> torch.Tensor:
    return torch.empty(36 * max(t1 - t0 for t0, t1 in blocks) * channels, dtype=torch.float32)


def _block(buffer: torch.Tensor, t0: int, t1: int, channels: int) -> torch.Tensor:
    """A contiguous (36, t1 - t0, channels) view of the front of ``buffer`` (the last block may be shorter)."""
    return buffer[:36 * (t1 - t0) * channels].view(36, t1 - t0, channels)


def _call(fn, *args) -> None:
    rc = fn(*args)
    if rc != 0:
        raise RuntimeError(f"the Winograd kernel refused its arguments (code {rc})")


def _weight_tf(weight: torch.Tensor) -> torch.Tensor:
    """U[k] (C_in, C_out) for the 36 positions k = 6a + b: (G w G^T)[a, b], computed in fp64."""
    co, ci = weight.shape[:2]
    u = torch.einsum("ai,ocij,bj->abco", _G, weight.double(), _G)
    return u.reshape(36, ci, co).float()


def _lib():
    lib = LIBRARY.load()
    if lib is None:
        raise RuntimeError(f"the Winograd kernel is unavailable: {LIBRARY.unavailable_reason()}")
    return lib


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int
                     ) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, 1, padding)`` for fp32 CPU tensors and a 3x3 kernel (see
    :func:`winograd_applies`), channels_last out."""
    lib = _lib()
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    co, p, threads = weight.shape[0], padding, torch.get_num_threads()
    u = _weight_tf(weight)
    y = torch.empty(n, co, h + 2 * p - 2, w + 2 * p - 2, dtype=torch.float32, memory_format=torch.channels_last)
    b = bias.float().contiguous() if bias is not None else None
    blocks = list(_blocks(x, p, max(c, co)))
    v, m = _buffer(blocks, c), _buffer(blocks, co)
    for t0, t1 in blocks:
        vb, mb = _block(v, t0, t1, c), _block(m, t0, t1, co)
        _call(lib.mixlab_winograd_input_tf, x.data_ptr(), vb.data_ptr(), n, h, w, c, p, t0, t1, threads)
        torch.bmm(vb, u, out=mb)
        _call(lib.mixlab_winograd_output_tf, mb.data_ptr(), y.data_ptr(), b.data_ptr() if b is not None else None,
              n, h, w, co, p, t0, t1, threads)
    return y


def winograd_conv3x3_backward(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, padding: int,
                              input_grad: bool = True, weight_grad: bool = True
                              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx channels_last or None, dweight (C_out, C_in, 3, 3) or None) of :func:`winograd_conv3x3`."""
    lib = _lib()
    x = x.contiguous(memory_format=torch.channels_last)
    g = grad_out.float().contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    co, p, threads = weight.shape[0], padding, torch.get_num_threads()
    if tuple(g.shape) != (n, co, h + 2 * p - 2, w + 2 * p - 2):
        raise ValueError(f"an output gradient of shape {tuple(g.shape)} does not fit this 3x3 convolution of a "
                         f"{tuple(x.shape)} input (padding {p}): it wants {(n, co, h + 2 * p - 2, w + 2 * p - 2)}")
    ut = _weight_tf(weight).transpose(1, 2).contiguous() if input_grad else None
    dx = torch.zeros(n, h, w, c, dtype=torch.float32).permute(0, 3, 1, 2) if input_grad else None  # channels_last
    du = torch.zeros(36, c, co, dtype=torch.float32) if weight_grad else None
    blocks = list(_blocks(x, p, max(c, co)))
    mg_buf = _buffer(blocks, co)
    dv_buf = _buffer(blocks, c) if input_grad else None
    v_buf = _buffer(blocks, c) if weight_grad else None
    for t0, t1 in blocks:
        mg = _block(mg_buf, t0, t1, co)
        _call(lib.mixlab_winograd_grad_tf, g.data_ptr(), mg.data_ptr(), n, h, w, co, p, t0, t1, threads)
        if input_grad:
            dv = torch.bmm(mg, ut, out=_block(dv_buf, t0, t1, c))
            _call(lib.mixlab_winograd_input_grad_tf, dv.data_ptr(), dx.data_ptr(), n, h, w, c, p, t0, t1, threads)
        if weight_grad:
            v = _block(v_buf, t0, t1, c)
            _call(lib.mixlab_winograd_input_tf, x.data_ptr(), v.data_ptr(), n, h, w, c, p, t0, t1, threads)
            du.baddbmm_(v.transpose(1, 2), mg)
    dw = None
    if weight_grad:
        dw = torch.einsum("ai,abco,bj->ocij", _G, du.view(6, 6, c, co).double(), _G).float()
    return dx, dw
