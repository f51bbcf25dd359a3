"""The fast depthwise convolution equals F.conv2d (forward, input and weight gradients) against an
fp64 reference, with the compiled kernel and with its pure-aten fallback."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixlab.ops import depthwise as dwmod
from mixlab.ops import depthwise_build
from mixlab.ops.depthwise import (DepthwiseConv2d, depthwise_conv2d, depthwise_weight_grad, restore_depthwise,
                                  use_fast_depthwise)

# bf16 inputs carry 8 bits of mantissa: compare against the fp64 result of the same bf16-rounded
# inputs, relative to the gradient's scale (sums of up to N*H*W products, accumulated in fp32).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(params=["kernel", "fallback"])
def path(request, monkeypatch):
    """Run a test once with the compiled kernel and once with the aten fallback."""
    depthwise_build._reset_for_tests()
    if request.param == "fallback":
        monkeypatch.setenv("MIXLAB_FAST_DEPTHWISE_BUILD", "0")
        dwmod.set_weight_grad_method(None)  # the best pure-aten path, chosen by timing
    elif not dwmod.fast_depthwise_available():
        pytest.skip(f"kernel not built here: {depthwise_build.unavailable_reason()}")
    else:
        dwmod.set_weight_grad_method("kernel")  # the kernel even where aten would be faster
    yield request.param
    dwmod.set_weight_grad_method(None)
    depthwise_build._reset_for_tests()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def _case(n, c, h, w, k, dil, padding, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    weight = torch.randn(c, 1, k, k, generator=g).to(dtype) * 0.2
    bias = torch.randn(c, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pad = padding if padding != "int" else dil * (k - 1) // 2 + 1  # a symmetric pad that is not 'same'
    return x, weight, bias, pad


def _grads(fn, x, weight, bias, pad, dil, upstream):
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    bias = bias.detach().requires_grad_()
    out = fn(x, weight, bias, 1, pad, dil)
    out.backward(upstream(out))
    return out.detach(), x.grad, weight.grad, bias.grad


def _reference(x, weight, bias, pad, dil):
    upstream = None

    def ref(x_, w_, b_, s, p, d):
        return F.conv2d(x_, w_, b_, s, p, d, x_.shape[1])

    x64, w64, b64 = x.double(), weight.double(), bias.double()
    g = torch.Generator().manual_seed(1)
    out = F.conv2d(x64, w64, b64, 1, pad, dil, x.shape[1])
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    return _grads(ref, x64, w64, b64, pad, dil, lambda o: upstream), upstream


@pytest.mark.parametrize("k", [3, 5, 7, 9, 11])
@pytest.mark.parametrize("dil", [1, 2])
@pytest.mark.parametrize("padding", ["same", "valid", "int"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_conv2d_fp64_reference(path, k, dil, padding, channels_last, dtype):
    # 67 channels: in the channels_last kernel two whole 32-channel blocks of the register-blocked form
    # (rows of up to 7 taps) and a 3-channel tail in the general form
    n, c, h, w = (1, 67, 23, 19) if k <= 7 else (2, 5, 25, 24)
    if (h - dil * (k - 1) <= 0 or w - dil * (k - 1) <= 0) and padding == "valid":
        pytest.skip("kernel larger than the image with valid padding")
    x, weight, bias, pad = _case(n, c, h, w, k, dil, padding, dtype, channels_last)
    (ref_out, ref_gx, ref_gw, ref_gb), upstream = _reference(x, weight, bias, pad, dil)
    out, gx, gw, gb = _grads(depthwise_conv2d, x, weight, bias, pad, dil, lambda o: upstream.to(o.dtype))
    tol = TOL[dtype]
    assert out.dtype == dtype and gw.dtype == dtype and gx.dtype == dtype
    assert _rel_err(out, ref_out) < tol
    assert _rel_err(gx, ref_gx) < tol
    assert _rel_err(gw, ref_gw) < tol
    assert _rel_err(gb, ref_gb) < tol


@pytest.mark.parametrize("channels_last", [False, True])
def test_weight_grad_fp32_sums_for_bf16(path, channels_last):
    """bf16 inputs, fp32 result: the kernel equals the fp64 sum of the same bf16 values to fp32
    rounding; the fallback may pick aten's bf16 path, which rounds its result to bf16."""
    x = torch.randn(8, 64, 16, 16).bfloat16()
    g = torch.randn(8, 64, 16, 16).bfloat16()
    if channels_last:
        x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    gw = depthwise_weight_grad(x, g, 5, "same", 1)
    assert gw.dtype == torch.float32 and gw.shape == (64, 1, 5, 5)
    ref = torch.ops.aten.convolution_backward(g.double(), x.double(), torch.empty(64, 1, 5, 5, dtype=torch.float64),
                                              None, [1, 1], [2, 2], [1, 1], False, [0, 0], 64,
                                              [False, True, False])[1]
    assert _rel_err(gw, ref) < (1e-5 if path == "kernel" else 1e-2)


def test_autocast_matches_plain_conv_and_returns_fp32_weight_grad(path):
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 5, padding="same", groups=32)
    fast = copy.deepcopy(conv)
    assert use_fast_depthwise(fast) == 1
    x = torch.randn(4, 32, 12, 12).contiguous(memory_format=torch.channels_last)
    outs = []
    for m in (conv, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        outs.append((y.float(), m.weight.grad, m.bias.grad))
    assert outs[1][1].dtype == torch.float32
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)  # forward: the same aten kernel
    assert _rel_err(outs[1][1], outs[0][1]) < 2e-2
    assert _rel_err(outs[1][2], outs[0][2]) < 2e-2


def test_batch_one_and_one_by_one_maps(path):
    for shape in [(1, 16, 9, 9), (3, 7, 1, 1), (2, 1, 6, 6)]:
        x, weight, bias, _ = _case(*shape, 3, 1, "same", torch.float32, False)
        (ref_out, ref_gx, ref_gw, ref_gb), up = _reference(x, weight, bias, 1, 1)
        out, gx, gw, gb = _grads(depthwise_conv2d, x, weight, bias, 1, 1, lambda o: up.float())
        for a, b in ((out, ref_out), (gx, ref_gx), (gw, ref_gw), (gb, ref_gb)):
            assert _rel_err(a, b) < 1e-5


def test_out_of_scope_runs_plain_conv2d():
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    w = torch.randn(8, 1, 3, 3, requires_grad=True)
    # stride 2 and a channel multiplier: exactly F.conv2d (no custom autograd node)
    y = depthwise_conv2d(x, w, None, 2, 1, 1)
    assert "Convolution" in type(y.grad_fn).__name__
    w2 = torch.randn(16, 1, 3, 3, requires_grad=True)
    y2 = depthwise_conv2d(x, w2, None, 1, 1, 1)
    assert y2.shape == (2, 16, 10, 10) and "Convolution" in type(y2.grad_fn).__name__
    y3 = depthwise_conv2d(x, w, None, 1, 1, 1)
    assert "DepthwiseConv2dFn" in type(y3.grad_fn).__name__


def test_non_depthwise_input_is_refused_with_the_constraint():
    x = torch.randn(2, 8, 10, 10)
    with pytest.raises(ValueError, match=r"\(C\*m, 1, kh, kw\).*C=8"):
        depthwise_conv2d(x, torch.randn(8, 2, 3, 3))
    with pytest.raises(ValueError, match="4-D input"):
        depthwise_conv2d(torch.randn(8, 10, 10), torch.randn(8, 1, 3, 3))
    assert "not depthwise" in dwmod.ineligible_reason(nn.Conv2d(8, 8, 3))
    assert "stride" in dwmod.ineligible_reason(nn.Conv2d(8, 8, 3, stride=2, groups=8))
    with pytest.raises(ValueError, match="asymmetric"):
        DepthwiseConv2d(8, 4, padding="same")
    with pytest.raises(ValueError, match="grad_out is"):
        depthwise_weight_grad(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 7, 7), 3, 1)


def test_swap_keeps_parameters_and_state_dict_and_skips_ineligible():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),  # dense: kept
        nn.Conv2d(16, 16, 5, padding="same", groups=16),  # swapped
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16),  # stride 2: kept
        nn.Conv2d(16, 16, 3, padding=1, groups=16, padding_mode="reflect"),  # reflect: kept
        nn.Conv2d(16, 32, 3, padding=1, groups=16),  # multiplier 2: kept
        nn.Conv2d(32, 32, 3, padding=2, dilation=2, groups=32, bias=False),  # swapped
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    assert use_fast_depthwise(model) == 2
    assert [type(m).__name__ for m in model] == ["Conv2d", "DepthwiseConv2d", "Conv2d", "Conv2d", "Conv2d",
                                                 "DepthwiseConv2d"]
    assert [id(p) for p in model.parameters()] == params
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert restore_depthwise(model) == 2 and all(type(m) is nn.Conv2d for m in model)


def test_swapped_model_trains_like_the_original_fp32(path):
    import timm

    torch.manual_seed(0)
    a = timm.models.convmixer.ConvMixer(dim=32, depth=2, kernel_size=5, patch_size=2, num_classes=10)
    b = copy.deepcopy(a)
    assert use_fast_depthwise(b) == 2
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    losses = []
    for m in (a, b):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        run = []
        for _ in range(4):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert max(abs(p - q) for p, q in zip(*losses)) < 1e-5


@pytest.mark.parametrize("k, dil, pad", [(5, 1, 2), (3, 2, 2), (5, 1, 0), (3, 1, 2), (3, 1, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_gradient_by_either_method_equals_the_reference(k, dil, pad, dtype, monkeypatch):
    # (3, 1, 3) pads more than the kernel reaches: only aten's own input gradient can do that
    g = torch.Generator().manual_seed(1)
    c = 5
    x = torch.randn(2, c, 9, 8, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c, 1, k, k, generator=g) * 0.3).to(dtype)
    out = F.conv2d(x, w, None, 1, pad, dil, c)
    up = torch.randn(out.shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    ref = torch.ops.aten.convolution_backward(up.double(), x.double(), w.double(), None, [1, 1], [pad, pad],
                                              [dil, dil], False, [0, 0], c, [True, False, False])[0]
    assert (dwmod._flipped_padding((pad, pad), (k, k), (dil, dil)) is None) == (pad > dil * (k - 1))
    for method in ("aten", "flipped_forward"):
        monkeypatch.setattr(dwmod.PLAN, "_choices", {})
        monkeypatch.setattr(dwmod, "_choose", lambda key, cands, run, m=method: m if m in cands else cands[0])
        gx = dwmod._input_grad(up, x, w, (pad, pad), (dil, dil))
        assert gx.shape == x.shape
        assert _rel_err(gx, ref) < TOL[dtype], (method, _rel_err(gx, ref))
