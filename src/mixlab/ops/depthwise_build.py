"""The C++ depthwise-convolution kernels (``depthwise_kernels.cpp``: the weight gradient, and the
channels-last forward that also serves the input gradient), built and loaded by
:mod:`mixlab.ops.kernel_build`.

``MIXLAB_FAST_DEPTHWISE_BUILD=0`` skips the build (the op then uses its pure-aten fallback).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

from .kernel_build import KernelLibrary

SOURCE = Path(__file__).with_name("depthwise_kernels.cpp")
ABI_VERSION = 4
_WGRAD = ("mixlab_dw_wgrad_nhwc_f32", "mixlab_dw_wgrad_nhwc_bf16", "mixlab_dw_wgrad_nchw_f32",
          "mixlab_dw_wgrad_nchw_bf16")
_FWD = ("mixlab_dw_fwd_nhwc_f32", "mixlab_dw_fwd_nhwc_bf16")
# weight gradient: (x, g, out, bias_out, N, C, H, W, Ho, Wo, KH, KW, ph, pw, dh, dw, threads);
# forward: (x, weights, bias, add, y, ...the same)
_SIGNATURES = {name: (ctypes.c_int, [ctypes.c_void_p] * (5 if name in _FWD else 4) + [ctypes.c_long] * 12
                      + [ctypes.c_int]) for name in _WGRAD + _FWD}
_SIGNATURES["mixlab_dw_fwd_max_kw"] = (ctypes.c_long, [])

LIBRARY = KernelLibrary(
    SOURCE, "mixlab_depthwise", "fast depthwise-conv", ("mixlab_dw_abi_version", ABI_VERSION), _SIGNATURES,
    "MIXLAB_FAST_DEPTHWISE_BUILD",
    "depthwise weight gradients use aten in fp32 (correct, slower in bf16), forwards aten")


def load_kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None where it cannot be built
    (the reason is printed once and kept in :func:`unavailable_reason`)."""
    return LIBRARY.load()


def unavailable_reason() -> str | None:
    """None when the kernel is loaded, else why not (after :func:`load_kernel` was tried)."""
    return LIBRARY.unavailable_reason()


def _reset_for_tests() -> None:
    LIBRARY.reset()
