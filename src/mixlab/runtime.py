"""Process-level settings that make CPU training fast.

Subnormal floats (|x| < 1.2e-38 in fp32 and bf16) are computed by a slow path on x86 CPUs.
Training makes them: ConvMixer's GELU comes before its BatchNorm, so it sees the raw
convolution outputs, which grow as the network learns, and its erf/exp of large inputs
underflows into the subnormal range. In the public 25-epoch ConvMixer CIFAR-10 recipe the
training speed fell epoch by epoch, from 304 to 189 images/s by epoch 9 (2-core AMD EPYC);
timing the step with that run's epoch-9 weights gave 2,381-2,688 ms without flushing and
1,814-1,893 ms with it (untrained weights: 1,521-1,812 ms either way). :func:`flush_denormals` sets the
CPU's flush-to-zero and denormals-are-zero modes. Measured in
benchmarks/results/cpu-flush-denormals-2026-11-29/.

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


_flushed: bool | None = None


def flush_denormals() -> bool:
    """Treat subnormal floats as zero on the CPU (``torch.set_flush_denormal``), once per
    process. Returns True when set.

    The mode is a per-thread CPU register: torch sets it on the calling thread, and OpenMP's
    worker threads copy it from that thread when they are created. Call this before torch runs
    its first parallel operation (the CLI does so at start, beside :func:`tune_malloc`); set
    later, torch's existing worker threads keep computing subnormals. Skipped when
    ``MIXLAB_FLUSH_DENORMALS=0``. The numbers change only where a value would have been
    subnormal (it becomes 0), as on GPUs, whose fast math flushes them too.
    """
    global _flushed
    if _flushed is not None:
        return _flushed
    _flushed = False
    if os.environ.get("MIXLAB_FLUSH_DENORMALS", "1") == "0":
        return False
    import torch

    _flushed = bool(torch.set_flush_denormal(True))  # False where the CPU has no such mode
    return _flushed


def denormals_flushed() -> bool:
    return bool(_flushed)
