"""Process-level settings that make CPU training fast.

glibc's malloc serves large blocks (above a threshold that starts at 128 KiB) with mmap and
hands them back to the kernel on free, and trims the heap top eagerly. A training step
frees and re-allocates the same large activations every iteration, so each step page-faults
them in again: on a 2-core machine about half the CPU time went to the kernel. Raising the
mmap and trim thresholds to 1 GiB keeps those pages in the process. Measured in
benchmarks/results (see README, "CPU speed").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30
_applied: bool | None = None


def tune_malloc() -> bool:
    """Raise glibc's mmap/trim thresholds (once per process). Returns True when applied.

    Skipped when ``MIXLAB_MALLOC_TUNING=0``, when the user already set glibc's own
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` variables, or off glibc.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MIXLAB_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): nothing to tune
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, _THRESHOLD) == 1
    _applied = bool(ok)
    return _applied


def malloc_tuned() -> bool:
    return bool(_applied)
