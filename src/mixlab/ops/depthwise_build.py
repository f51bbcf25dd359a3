"""Build (once per machine) and load the C++ depthwise weight-gradient kernel.

The kernel (``depthwise_kernels.cpp`` beside this file) includes no torch headers, so the
machine's C++ compiler builds it in about a second, where a ``torch.utils.cpp_extension``
build takes a minute; it is called through ``ctypes`` on the tensors' data pointers. The
shared library is cached under ``$MIXLAB_KERNEL_CACHE`` (default ``~/.cache/mixlab/kernels``)
by a hash of its source, the compiler, the flags and the CPU (``-march=native`` code must not
run on another processor that shares the home folder), and written atomically, so parallel
ranks that build it at once do not corrupt it.

``MIXLAB_FAST_DEPTHWISE_BUILD=0`` skips the build (the op then uses its pure-aten fallback).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCE = Path(__file__).with_name("depthwise_kernels.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno"]
ABI_VERSION = 2
_FUNCS = ("mixlab_dw_wgrad_nhwc_f32", "mixlab_dw_wgrad_nhwc_bf16", "mixlab_dw_wgrad_nchw_f32",
          "mixlab_dw_wgrad_nchw_bf16")

_lib: ctypes.CDLL | None = None
_status: str | None = None  # why the kernel is not available (None: not tried yet, "" : loaded)


def cache_dir() -> Path:
    return Path(os.environ.get("MIXLAB_KERNEL_CACHE") or Path.home() / ".cache" / "mixlab" / "kernels")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    """Model name and feature flags: what -march=native compiles for."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.split(":")[0].strip() in ("model name", "flags")]
    return "\n".join(dict.fromkeys(keep))  # one copy of each distinct line


def _say(msg: str) -> None:
    print(f"mixlab: {msg}", file=sys.stderr, flush=True)


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, " ".join(FLAGS), _cpu_identity(),
                                    str(ABI_VERSION)]).encode()).hexdigest()[:16]
    target = cache_dir() / f"mixlab_depthwise_{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".mixlab_depthwise_", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(compiler).name} failed: {proc.stderr.strip()[-800:]}")
        from ..io import _UMASK

        os.chmod(tmp, 0o777 & ~_UMASK)  # mkstemp made it 0600: the mode a compiler gives a library
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _say(f"compiled the fast depthwise-conv weight-gradient kernel in {time.perf_counter() - t0:.1f} s "
         f"({Path(compiler).name} {' '.join(FLAGS[:3])}) -> {target} (built once per machine)")
    return target


def load_kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None where it cannot be built
    (the reason is printed once and kept in :func:`unavailable_reason`)."""
    global _lib, _status
    if _status is not None:
        return _lib
    _status = ""
    if os.environ.get("MIXLAB_FAST_DEPTHWISE_BUILD", "1") == "0":
        _status = "MIXLAB_FAST_DEPTHWISE_BUILD=0"
    elif not sys.platform.startswith("linux"):
        _status = f"the kernel is built for Linux only (this is {sys.platform})"
    elif (compiler := _compiler()) is None:
        _status = "no C++ compiler found (install g++ or set CXX)"
    else:
        try:
            import torch  # noqa: F401  (its libgomp must be loaded first so the kernel shares it)

            lib = ctypes.CDLL(str(_build(compiler)))
            if lib.mixlab_dw_abi_version() != ABI_VERSION:
                raise RuntimeError("stale kernel library (ABI version)")
            for name in _FUNCS:
                fn = getattr(lib, name)
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 12 + [ctypes.c_int]
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _status = f"building it failed ({e})"
    if _status:
        _say(f"fast depthwise-conv kernel unavailable: {_status}; depthwise weight gradients use aten in fp32 "
             "(correct, slower in bf16)")
    return _lib


def unavailable_reason() -> str | None:
    """None when the kernel is loaded, else why not (after :func:`load_kernel` was tried)."""
    load_kernel()
    return _status or None


def _reset_for_tests() -> None:
    global _lib, _status
    _lib, _status = None, None
