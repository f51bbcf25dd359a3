"""Fixtures shared by the CPU-kernel tests."""
import pytest

from mixlab.ops import gelu as gb
from mixlab.ops import layernorm as ln


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")  # built once for the whole session


def _kernel_for_every_call(monkeypatch, kernel_cache, library, set_method, runs=None):
    """Build ``library`` in the session's kernel cache (skip where it cannot be built, or where
    ``runs()`` says this CPU cannot run it) and force its kernel for every call (also where aten
    would be timed faster), until the test ends."""
    monkeypatch.setenv("MIXLAB_KERNEL_CACHE", str(kernel_cache))
    library.reset()
    if library.load() is None:
        pytest.skip(f"kernel not built here: {library.unavailable_reason()}")
    if runs is not None and not runs():
        pytest.skip("kernel not run here: this CPU lacks the instructions it needs")
    set_method("kernel")
    yield
    set_method(None)
    library.reset()


@pytest.fixture
def gelu_kernel(monkeypatch, kernel_cache):
    """mixlab's compiled GELU kernels for every call."""
    yield from _kernel_for_every_call(monkeypatch, kernel_cache, gb.LIBRARY, gb.set_gelu_method)


@pytest.fixture
def layernorm_kernel(monkeypatch, kernel_cache):
    """mixlab's compiled LayerNorm kernel for every call."""
    yield from _kernel_for_every_call(monkeypatch, kernel_cache, ln.LIBRARY, ln.set_layernorm_method)


@pytest.fixture
def resample_kernel(monkeypatch, kernel_cache):
    """mixlab's compiled resampling kernels for every call."""
    from mixlab.ops import resample as rs

    yield from _kernel_for_every_call(monkeypatch, kernel_cache, rs.LIBRARY, rs.set_resample_method)


@pytest.fixture
def bn_relu_kernel(monkeypatch, kernel_cache):
    """mixlab's compiled BatchNorm + ReLU kernel for every call."""
    from mixlab.ops import bn_relu as br

    yield from _kernel_for_every_call(monkeypatch, kernel_cache, br.LIBRARY, br.set_bn_relu_method)


@pytest.fixture
def pointwise_kernel(monkeypatch, kernel_cache):
    """mixlab's compiled 1x1 weight-gradient kernel for every call where it applies (skipped on a CPU
    without AVX512-BF16)."""
    from mixlab.ops import pointwise as pw

    yield from _kernel_for_every_call(monkeypatch, kernel_cache, pw.LIBRARY, pw.set_pointwise_method,
                                      pw.fast_pointwise_available)


@pytest.fixture
def seg_loss_kernel(monkeypatch, kernel_cache):
    """mixlab's compiled BCE + Dice loss kernel for every call."""
    from mixlab.ops import seg_loss as sl

    yield from _kernel_for_every_call(monkeypatch, kernel_cache, sl.LIBRARY, sl.set_seg_loss_method)
