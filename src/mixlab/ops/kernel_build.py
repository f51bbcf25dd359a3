"""Build (once per machine) and load mixlab's small C++ CPU kernels.

Each kernel file beside this one (``depthwise_kernels.cpp``, ``gelu_kernels.cpp``, ...) includes
no torch headers, so the machine's C++ compiler builds it in about a second, where a
``torch.utils.cpp_extension`` build takes a minute; it is called through ``ctypes`` on the
tensors' data pointers. The shared library is cached under ``$MIXLAB_KERNEL_CACHE`` (default
``~/.cache/mixlab/kernels``) by a hash of its source (with the headers it includes by name, e.g.
``bf16_scalar.h``), the compiler, the flags and the CPU
(``-march=native`` code must not run on another processor that shares the home folder), and
written atomically, so parallel ranks that build it at once do not corrupt it.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno"]


def cache_dir() -> Path:
    return Path(os.environ.get("MIXLAB_KERNEL_CACHE") or Path.home() / ".cache" / "mixlab" / "kernels")


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cpu_identity() -> str:
    """Model name and feature flags: what -march=native compiles for."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.split(":")[0].strip() in ("model name", "flags")]
    return "\n".join(dict.fromkeys(keep))  # one copy of each distinct line


def say(msg: str) -> None:
    print(f"mixlab: {msg}", file=sys.stderr, flush=True)


def dtype_suffix(x) -> str:
    """The kernels' name suffix for a tensor's dtype: 'bf16' or 'f32' (the only two they take)."""
    import torch

    return "bf16" if x.dtype == torch.bfloat16 else "f32"


class KernelLibrary:
    """One kernel source, built at first use and loaded once per process.

    ``what``: the kernel's name in messages; ``stem``: the cached library's file-name stem;
    ``abi``: (symbol, version) checked after loading; ``signatures``: {function: (restype,
    argtypes)}; ``disable_env``: a variable that, set to 0, skips the build; ``fallback``: what
    runs instead, said once when the library is unavailable.
    """

    def __init__(self, source: Path, stem: str, what: str, abi: tuple[str, int], signatures: dict,
                 disable_env: str, fallback: str, extra_flags: tuple[str, ...] = ()):
        self.source, self.stem, self.what, self.abi = source, stem, what, abi
        self.signatures, self.disable_env, self.fallback = signatures, disable_env, fallback
        self.flags = [*FLAGS, *extra_flags]
        self._lib: ctypes.CDLL | None = None
        self._status: str | None = None  # None: not tried yet; "": loaded; else why not

    def source_text(self) -> str:
        """The kernel's source followed by each header it includes by name (``#include "x.h"``,
        from its own folder): what a build depends on, so what the library's file name and the
        per-shape plans' identity hash."""
        text = self.source.read_text()
        for name in re.findall(r'^\s*#include\s+"([^"]+)"', text, re.M):
            text += "\0" + (self.source.parent / name).read_text()
        return text

    def _build(self, cxx: str) -> Path:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
        key = hashlib.sha256("\0".join([self.source_text(), cxx, version, " ".join(self.flags),
                                        cpu_identity(), str(self.abi[1])]).encode()).hexdigest()[:16]
        target = cache_dir() / f"{self.stem}_{key}.so"
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.stem}_", suffix=".so.tmp", dir=target.parent)
        os.close(fd)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([cxx, *self.flags, str(self.source), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"{Path(cxx).name} failed: {proc.stderr.strip()[-800:]}")
            from ..io import _UMASK

            os.chmod(tmp, 0o777 & ~_UMASK)  # mkstemp made it 0600: the mode a compiler gives a library
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        say(f"compiled the {self.what} kernel in {time.perf_counter() - t0:.1f} s "
            f"({Path(cxx).name} {' '.join(self.flags[:3])}) -> {target} (built once per machine)")
        return target

    def load(self) -> ctypes.CDLL | None:
        """The loaded library, building it on first use; None where it cannot be built (the
        reason is printed once and kept in :meth:`unavailable_reason`)."""
        if self._status is not None:
            return self._lib
        self._status = ""
        if os.environ.get(self.disable_env, "1") == "0":
            self._status = f"{self.disable_env}=0"
        elif not sys.platform.startswith("linux"):
            self._status = f"the kernel is built for Linux only (this is {sys.platform})"
        elif (cxx := compiler()) is None:
            self._status = "no C++ compiler found (install g++ or set CXX)"
        else:
            try:
                import torch  # noqa: F401  (its libgomp must be loaded first so the kernel shares it)

                lib = ctypes.CDLL(str(self._build(cxx)))
                if getattr(lib, self.abi[0])() != self.abi[1]:
                    raise RuntimeError("stale kernel library (ABI version)")
                for name, (restype, argtypes) in self.signatures.items():
                    fn = getattr(lib, name)
                    fn.restype, fn.argtypes = restype, argtypes
                self._lib = lib
            except Exception as e:  # any failure leaves the aten fallback, said once
                self._status = f"building it failed ({type(e).__name__}: {e})"
        if self._status:
            say(f"{self.what} kernel unavailable: {self._status}; {self.fallback}")
        return self._lib

    def check(self, rc: int) -> None:
        """Raise MemoryError where a kernel call returned nonzero: the kernels return 1 only when
        they could not allocate their working memory (per-thread sums, buffers, accumulators)."""
        if rc != 0:
            raise MemoryError(f"the {self.what} kernel could not allocate its working memory")

    def unavailable_reason(self) -> str | None:
        """None when the kernel is loaded, else why not (after :meth:`load` was tried)."""
        self.load()
        return self._status or None

    def reset(self) -> None:
        """Forget the loaded library (tests rebuild it under other settings)."""
        self._lib, self._status = None, None


# ----------------------------------------------------------------------------- which computation, per shape
#
# Which computation is fastest (a kernel or aten's, and which of aten's) depends on the CPU, the
# shape, the dtype and the layout. As cuDNN's benchmark mode does, the ops time the candidates on
# the first call of each new shape and keep the fastest; the choice is stored in the kernel cache
# folder, so later processes on the machine, a resumed run among them, make the same choice
# without timing again and compute the same numbers.

def time_each(runs: dict, rounds: int = 3) -> dict[str, float]:
    """Seconds of each of ``runs`` ({name: callable}): one untimed call each (first-call set-up),
    then the best of ``rounds`` calls, taken in interleaved rounds (A B A B ...) so that a moment
    of slowness on the machine falls on every candidate alike. (Timed in two back-to-back calls
    each, a slow moment once made aten's GELU + BatchNorm look faster than the kernel, which is
    30% faster, and the choice was kept on disk.)"""
    for run in runs.values():
        run()
    times = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name] = min(times[name], time.perf_counter() - t0)
    return times


def time_training_calls(make_runs) -> dict[str, float]:
    """:func:`time_each` of ``make_runs()``: forward + backward calls that draw their own random
    gradient. The run's random stream must not see that draw (a run that times would draw other
    dropout masks than one that reads the stored choice), and the calls time with gradients on and
    autocast off whatever the caller's mode."""
    import torch

    with torch.random.fork_rng(devices=[]), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        torch.manual_seed(0)
        return time_each(make_runs())


class Plan:
    """Choices by key (shape, dtype, layout, threads...), kept per CPU and torch version (and
    ``identity()``, e.g. a kernel's source, so that a changed kernel is timed again) in
    ``<kernel cache>/<stem>_<hash>.json``. A read-only cache folder keeps them for this process."""

    def __init__(self, stem: str, identity=None):
        self.stem, self.identity = stem, identity
        self._choices: dict[str, str] | None = None
        self.forced: str | None = None  # force(): every kernel_or_aten answers this, nothing timed or stored

    def force(self, method: str | None, what: str) -> None:
        """Make :meth:`kernel_or_aten` answer ``method`` ('kernel' or 'aten') for every key; None
        (default) times both per key. ``what``: the op's name in the error message."""
        if method not in (None, "kernel", "aten"):
            raise ValueError(f"{what} method must be 'kernel', 'aten' or None, got {method!r}")
        self.forced = method

    def path(self) -> Path:
        import torch

        parts = [cpu_identity(), torch.__version__] + ([self.identity()] if self.identity else [])
        return cache_dir() / f"{self.stem}_{hashlib.sha256('|'.join(parts).encode()).hexdigest()[:12]}.json"

    def choices(self) -> dict[str, str]:
        if self._choices is None:
            try:
                self._choices = json.loads(self.path().read_text())
            except (OSError, ValueError):
                self._choices = {}
        return self._choices

    def get(self, key: str) -> str | None:
        return self.choices().get(key)

    def kernel_or_aten(self, key: str, make_runs, time_methods=time_training_calls) -> str:
        """'kernel' or 'aten' for ``key``: the stored choice, else the faster of ``make_runs()``'s
        two calls, timed now by ``time_methods`` and stored. Under inference mode (no backward to
        time) 'kernel', until a training call times it. A method set by :meth:`force` wins."""
        import torch

        if self.forced is not None:
            return self.forced
        if self.get(key) not in ("kernel", "aten") and torch.is_inference_mode_enabled():
            return "kernel"
        return self.fastest(key, ("kernel", "aten"), lambda: time_methods(make_runs))

    def fastest(self, key: str, candidates, time_candidates) -> str:
        """The stored choice for ``key`` where it is one of ``candidates``, else the fastest of
        ``time_candidates()`` ({name: seconds}, timed now), stored."""
        method = self.get(key)
        if method not in candidates:
            times = time_candidates()
            method = min(times, key=times.get)
            self.set(key, method)
        return method

    def set(self, key: str, choice: str) -> None:
        from ..io import atomic_write_json

        self.choices()[key] = choice
        try:
            atomic_write_json(self.path(), self._choices)
        except OSError:
            pass  # a read-only home folder: the choice is kept for this process only
