"""mixlab.ops.axial_shift against the official roll formulation, for every option."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixlab.ops import axial_shift

TORCH_PAD = {"zero": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def naive_shift(x, shift_size, dim, dilation=1, padding="zero"):
    """The roll version kept in svip-lab/AS-MLP, with the paper's dilation and padding ablations.

    Pad both spatial axes by (shift_size // 2) * dilation, torch.chunk the channels into
    shift_size groups, torch.roll group i by (i - shift_size // 2) * dilation, concatenate, crop.
    """
    _, _, h, w = x.shape
    half = shift_size // 2
    pad = half * dilation
    x = F.pad(x, (pad, pad, pad, pad), mode=TORCH_PAD[padding])
    chunks = torch.chunk(x, shift_size, 1)
    rolled = [torch.roll(c, (i - half) * dilation, dim) for c, i in zip(chunks, range(shift_size))]
    x = torch.cat(rolled, 1)
    return x[:, :, pad:pad + h, pad:pad + w]


def _compare(x, shift_size, dim, dilation, padding):
    x_ref = x.detach().clone().requires_grad_()
    x_new = x.detach().clone().requires_grad_()
    ref = naive_shift(x_ref, shift_size, dim, dilation, padding)
    out = axial_shift(x_new, shift_size, dim, dilation, padding)
    assert out.shape == ref.shape
    assert torch.equal(out, ref)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(x_new.grad, x_ref.grad, rtol=0, atol=1e-12)
    return out


@pytest.mark.parametrize("padding", ["zero", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("shift_size", [1, 3, 5, 7])
@pytest.mark.parametrize("channels", [2, 7, 12, 13])
def test_matches_roll_reference(channels, shift_size, dilation, padding):
    # 2 and 7 channels leave fewer groups than shift_size for some sizes (torch.chunk), 12 and 13
    # give a smaller last group; 11x10 is larger than the largest padding (7 // 2 * 3 = 9), which
    # reflect needs. Doubles so the gradient comparison is exact up to summation order.
    torch.manual_seed(channels * 100 + shift_size * 10 + dilation)
    x = torch.randn(2, channels, 11, 10, dtype=torch.float64)
    for dim in (2, 3):
        _compare(x, shift_size, dim, dilation, padding)


def test_torchscript_compiles_the_slicing_form_with_the_same_values():
    # scripted, axial_shift runs its pad / chunk / crop form (the autograd function is not
    # scriptable): it must move the same values, for every option, and be differentiable
    scripted = torch.jit.script(axial_shift)
    torch.manual_seed(5)
    for channels, shift_size, dilation in ((2, 5, 1), (13, 5, 2), (12, 7, 1), (9, 3, 3), (6, 1, 1)):
        x = torch.randn(2, channels, 11, 10, dtype=torch.float64, requires_grad=True)
        for padding in ("zero", "reflect", "replicate", "circular"):
            for dim in (2, 3, -1):
                out = scripted(x, shift_size, dim, dilation, padding)
                assert torch.equal(out, naive_shift(x, shift_size, dim, dilation, padding))
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("padding", ["zero", "reflect", "replicate", "circular"])
def test_even_shift_size_and_negative_dims(padding):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 8, 9, dtype=torch.float64)
    for shift_size in (2, 4):
        for dim in (2, 3):
            out = _compare(x, shift_size, dim, 1, padding)
            assert torch.equal(out, axial_shift(x, shift_size, dim - 4, 1, padding))


def test_offsets_of_each_group_exactly():
    # C=10, shift 5: groups of 2 channels moved by -2, -1, 0, 1, 2 along W (official CUDA kernel:
    # out[w] = in[w + shift_size // 2 - group], zero outside)
    x = torch.arange(10 * 6, dtype=torch.float32).view(1, 10, 1, 6) + 1
    out = axial_shift(x, 5, 3)
    for c in range(10):
        k = c // 2 - 2
        for w in range(6):
            src = w - k
            expected = x[0, c, 0, src] if 0 <= src < 6 else 0.0
            assert out[0, c, 0, w] == expected, (c, w)


def test_large_dilation_zero_padding_moves_groups_out_of_the_map():
    x = torch.randn(1, 5, 4, 4, dtype=torch.float64)
    out = _compare(x, 5, 3, 3, "zero")  # offsets -6, -3, 0, 3, 6 on a 4-wide map
    assert out[:, [0, 4]].abs().sum() == 0
    assert torch.equal(out[:, 2], x[:, 2])


@pytest.mark.parametrize("padding", ["zero", "reflect", "replicate", "circular"])
def test_channels_last_matches_and_keeps_layout(padding):
    torch.manual_seed(1)
    x = torch.randn(2, 12, 9, 8, dtype=torch.float64).to(memory_format=torch.channels_last)
    for dim in (2, 3):
        out = _compare(x, 5, dim, 2, padding)
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_gradcheck_and_second_order():
    # first derivatives are compared with the reference above; this checks the backward is
    # itself differentiable (it is the opposite shift)
    torch.manual_seed(2)
    x = torch.randn(1, 5, 4, 5, dtype=torch.float64, requires_grad=True)
    for padding in ("zero", "reflect"):
        assert torch.autograd.gradcheck(lambda t: axial_shift(t, 3, 3, 2, padding), (x,), fast_mode=True)
        assert torch.autograd.gradgradcheck(lambda t: axial_shift(t, 5, 2, 1, padding), (x,), fast_mode=True)


def test_non_contiguous_input_and_float32():
    torch.manual_seed(3)
    base = torch.randn(2, 10, 12, 9)
    x = base[:, :, ::2]  # strided view
    assert torch.equal(axial_shift(x, 5, 3), naive_shift(x, 5, 3))
    assert torch.equal(axial_shift(x, 5, 2, 2, "reflect"), naive_shift(x, 5, 2, 2, "reflect"))


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="4-D"):
        axial_shift(torch.randn(4, 5, 5), 3, 2)
    with pytest.raises(ValueError, match="dim must be 2"):
        axial_shift(x, 3, 1)
    with pytest.raises(ValueError, match="shift_size"):
        axial_shift(x, 0, 2)
    with pytest.raises(ValueError, match="dilation"):
        axial_shift(x, 3, 2, dilation=0)
    with pytest.raises(ValueError, match="padding must be one of"):
        axial_shift(x, 3, 2, padding="mirror")
    with pytest.raises(ValueError, match="reflect padding needs"):
        axial_shift(x, 7, 3, dilation=2, padding="reflect")  # pads 6 >= 5
    with pytest.raises(ValueError, match="circular padding needs"):
        axial_shift(x, 7, 3, dilation=2, padding="circular")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(4)
    x = torch.randn(2, 13, 9, 10)
    for padding in ("zero", "reflect", "replicate", "circular"):
        for dim in (2, 3):
            xc = x.cuda().requires_grad_()
            out = axial_shift(xc, 5, dim, 1, padding)
            assert torch.equal(out.cpu(), naive_shift(x, 5, dim, 1, padding))
            out.square().sum().backward()
            xr = x.clone().requires_grad_()
            naive_shift(xr, 5, dim, 1, padding).square().sum().backward()
            torch.testing.assert_close(xc.grad.cpu(), xr.grad)
