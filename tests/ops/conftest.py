"""Fixtures shared by the CPU-kernel tests."""
import pytest

from mixlab.ops import gelu as gb


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")  # built once for the whole session


@pytest.fixture
def gelu_kernel(monkeypatch, kernel_cache):
    """mixlab's compiled GELU kernels for every call (also where aten would be timed faster)."""
    monkeypatch.setenv("MIXLAB_KERNEL_CACHE", str(kernel_cache))
    gb.LIBRARY.reset()
    if not gb.fast_gelu_available():
        pytest.skip(f"kernel not built here: {gb.LIBRARY.unavailable_reason()}")
    gb.set_gelu_method("kernel")
    yield
    gb.set_gelu_method(None)
    gb.LIBRARY.reset()


@pytest.fixture
def layernorm_kernel(monkeypatch, kernel_cache):
    """mixlab's compiled LayerNorm kernel for every call (also where aten would be timed faster)."""
    from mixlab.ops import layernorm as ln

    monkeypatch.setenv("MIXLAB_KERNEL_CACHE", str(kernel_cache))
    ln.LIBRARY.reset()
    if not ln.fast_layernorm_available():
        pytest.skip(f"kernel not built here: {ln.LIBRARY.unavailable_reason()}")
    ln.set_layernorm_method("kernel")
    yield
    ln.set_layernorm_method(None)
    ln.LIBRARY.reset()
