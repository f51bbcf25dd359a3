"""mixlab.ops.winograd: the F(4x4, 3x3) convolution's output and both gradients against an fp64
reference, over map sizes that are and are not multiples of the 4x4 tile, paddings 0-2 and
channel counts on and off the kernel's 16-channel passes."""
import pytest
import torch
import torch.nn.functional as F

from mixlab.ops import winograd as wg


@pytest.fixture(autouse=True)
def built(monkeypatch, kernel_cache):
    monkeypatch.setenv("MIXLAB_KERNEL_CACHE", str(kernel_cache))
    wg.LIBRARY.reset()
    if not wg.winograd_available():
        pytest.skip(f"kernel not built here: {wg.LIBRARY.unavailable_reason()}")
    yield
    wg.LIBRARY.reset()


def _rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


# (N, C_in, C_out, H, W, padding)
@pytest.mark.parametrize("case", [(2, 3, 5, 9, 11, 1), (1, 20, 7, 8, 8, 0), (2, 17, 33, 7, 5, 2), (3, 16, 16, 13, 6, 1),
                                  (1, 32, 48, 4, 4, 1), (1, 5, 3, 1, 1, 1), (2, 4, 4, 3, 3, 0), (1, 8, 8, 30, 2, 1),
                                  (3, 6, 5, 21, 17, 1)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("block_bytes", [4 << 20, 1, 36 * 4 * 48 * 3 * 2])  # whole map; a tile row; ~2 rows
def test_output_and_gradients_equal_fp64_reference(monkeypatch, case, bias, block_bytes):
    monkeypatch.setattr(wg, "_BLOCK_BYTES", block_bytes)
    n, ci, co, h, w, p = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, ci, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(co, ci, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(co, generator=g, dtype=torch.float64) if bias else None
    xr, wr = x.clone().requires_grad_(), wt.clone().requires_grad_()
    y = F.conv2d(xr, wr, b, padding=p)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(dy)
    xs = x.float().contiguous(memory_format=torch.channels_last)
    got = wg.winograd_conv3x3(xs, wt.float(), b.float() if bias else None, p)
    dx, dw = wg.winograd_conv3x3_backward(xs, wt.float(), dy.float(), p)
    assert got.shape == y.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert dx.shape == x.shape and dw.shape == wt.shape
    # fp32 direct convolution: ~1e-6 relative; the transforms' constants cost about one digit more
    assert _rel(got, y.detach()) < 2e-5
    assert _rel(dx, xr.grad) < 2e-5
    assert _rel(dw, wr.grad) < 2e-5
    only_dw = wg.winograd_conv3x3_backward(xs, wt.float(), dy.float(), p, input_grad=False)
    assert only_dw[0] is None and torch.equal(only_dw[1], dw)


def test_applies_only_where_it_computes_the_convolution():
    x, w = torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3)
    assert wg.winograd_applies(x, w, (1, 1), (1, 1), (1, 1))
    assert not wg.winograd_applies(x, w, (2, 2), (1, 1), (1, 1))  # stride
    assert not wg.winograd_applies(x, w, (1, 1), (1, 1), (2, 2))  # dilation
    assert not wg.winograd_applies(x, w, (1, 1), (0, 1), (1, 1))  # unequal padding
    assert not wg.winograd_applies(x.bfloat16(), w.bfloat16(), (1, 1), (1, 1), (1, 1))  # fp32 only
    assert not wg.winograd_applies(x, torch.randn(6, 4, 5, 5), (1, 1), (2, 2), (1, 1))  # 3x3 only
    assert not wg.winograd_applies(x[:0], w, (1, 1), (1, 1), (1, 1))  # an empty batch
    with pytest.raises(ValueError, match="does not fit this 3x3 convolution"):
        wg.winograd_conv3x3_backward(x, w, torch.randn(1, 6, 7, 7), 1)


def test_unavailable_kernel_says_why(monkeypatch):
    monkeypatch.setenv("MIXLAB_FAST_WINOGRAD_BUILD", "0")
    wg.LIBRARY.reset()
    assert not wg.winograd_available()
    with pytest.raises(RuntimeError, match="MIXLAB_FAST_WINOGRAD_BUILD=0"):
        wg.winograd_conv3x3(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), None, 1)
