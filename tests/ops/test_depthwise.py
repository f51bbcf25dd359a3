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
    lib = depthwise_build.load_kernel()
    methods = ["aten", "flipped_forward"]
    if lib is not None and lib.mixlab_dw_fwd_max_kw() > 0 and dil == 1:
        methods.append("flipped_kernel")  # the C++ forward with the flipped kernel
    for method in methods:
        monkeypatch.setattr(dwmod.PLAN, "_choices", {})
        monkeypatch.setattr(dwmod, "_choose", lambda key, cands, run, *margin, m=method: m if m in cands else cands[0])
        gx = dwmod._input_grad(up, x, w, (pad, pad), (dil, dil))
        assert gx.shape == x.shape
        assert _rel_err(gx, ref) < TOL[dtype], (method, _rel_err(gx, ref))


@pytest.mark.parametrize("k, pad", [(11, 5), (9, 4), (3, 3)])
def test_bf16_input_gradient_is_summed_in_fp32_where_aten_would_not(k, pad, monkeypatch):
    """On a CPU without oneDNN's bf16 path aten's depthwise input gradient sums in bf16 (0.011-0.022
    relative error on an AMD EPYC Zen 3 for these kernels): there the op never uses it, not even
    as a timed candidate, and the padding only aten handles (3 past a 3x3) runs on fp32 copies."""
    monkeypatch.setattr(dwmod, "_onednn_low_precision_supported", lambda dtype: False)
    monkeypatch.setattr(dwmod.PLAN, "_choices", {})
    seen = []
    monkeypatch.setattr(dwmod, "_choose", lambda key, cands, run, *margin: seen.append(cands) or cands[-1])
    g = torch.Generator().manual_seed(2)
    c = 6
    x = torch.randn(2, c, 25, 24, generator=g).bfloat16()
    w = (torch.randn(c, 1, k, k, generator=g) * 0.2).bfloat16()
    up = torch.randn(F.conv2d(x, w, None, 1, pad, 1, c).shape, generator=g).bfloat16()
    ref = torch.ops.aten.convolution_backward(up.double(), x.double(), w.double(), None, [1, 1], [pad, pad],
                                              [1, 1], False, [0, 0], c, [True, False, False])[0]
    gx = dwmod._input_grad(up, x, w, (pad, pad), (1, 1))
    assert gx.dtype == torch.bfloat16
    assert _rel_err(gx, ref) < 5e-3, _rel_err(gx, ref)  # bf16 rounding of fp32 sums
    assert all("aten" not in cands for cands in seen)


# ----------------------------------------------------------------------------- the C++ forward

def _forward_kernel_lib():
    depthwise_build._reset_for_tests()
    lib = depthwise_build.load_kernel()
    if lib is None or lib.mixlab_dw_fwd_max_kw() == 0:
        pytest.skip("the forward kernel is not built on this CPU (it needs AVX-512)")
    return lib


@pytest.mark.parametrize("k", [1, 3, 5, 7, 9, 11, 13])
@pytest.mark.parametrize("dh", [1, 2])
@pytest.mark.parametrize("padding", ["same", "valid", "int"])
@pytest.mark.parametrize("shape", [(1, 67, 23, 19), (2, 5, 9, 7), (3, 33, 4, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_kernel_equals_fp64_reference(k, dh, padding, shape, dtype, with_bias):
    # 67 / 33 / 5 channels: two 16-channel blocks a tile (kernels of up to 5 taps) or one, with a
    # partial last block; widths 19 / 7 / 3: 16-, 8- and 4-pixel tiles with a partial last tile;
    # rows dilated (the kernel's columns are not: dilation (dh, 1))
    lib = _forward_kernel_lib()
    n, c, h, w = shape
    pad = {"same": ((dh * (k - 1)) // 2, (k - 1) // 2), "valid": (0, 0), "int": (dh * (k - 1) // 2 + 1, k // 2 + 1)}[padding]
    if padding == "same" and (dh * (k - 1)) % 2:
        pad = (dh * (k - 1) // 2 + 1, pad[1])
    if h + 2 * pad[0] - dh * (k - 1) <= 0 or w + 2 * pad[1] - (k - 1) <= 0:
        pytest.skip("kernel larger than the padded image")
    g = torch.Generator().manual_seed(k * 7 + dh)
    x = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c, 1, k, k, generator=g) * 0.2).to(dtype)
    bias = torch.randn(c, generator=g).to(dtype) if with_bias else None
    got = dwmod._kernel_forward(lib, x, weight, bias, pad, (dh, 1))
    ref = F.conv2d(x.double(), weight.double(), bias.double() if with_bias else None, 1, pad, (dh, 1), c)
    assert got.dtype == dtype and got.shape == ref.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        assert _rel_err(got, ref) < 1e-6
    else:
        # fp32 sums rounded once: within half a bf16 unit of the exact result, plus what summing
        # up to 169 fp32 products can lose where they cancel (bounded by the sum of their sizes)
        size = F.conv2d(x.double().abs(), weight.double().abs(), bias.double().abs() if with_bias else None, 1,
                        pad, (dh, 1), c)
        assert ((got.double() - ref).abs() <= ref.abs() * 2.0 ** -8 + size * 2.0 ** -16).all()


@pytest.mark.parametrize("k", [3, 5, 11])
@pytest.mark.parametrize("shape", [(3, 67, 9, 19), (2, 5, 7, 7), (2, 64, 6, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_kernel_sums_the_added_tensor_in(k, shape, dtype):
    # whole and partial channel blocks (64 / 67 / 5), tiles whole and partial, several images (the
    # next row's summand is fetched ahead, across an image's last row too)
    lib = _forward_kernel_lib()
    n, c, h, w = shape
    pad = (k // 2, k // 2)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c, 1, k, k, generator=g) * 0.2).to(dtype)
    bias = torch.randn(c, generator=g).to(dtype)
    add = (torch.randn(n, c, h, w, generator=g) * 3).to(dtype).contiguous(memory_format=torch.channels_last)
    got = dwmod._kernel_forward(lib, x, weight, bias, pad, (1, 1), add=add)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), 1, pad, 1, c) + add.double()
    if dtype == torch.float32:
        assert _rel_err(got, ref) < 1e-6
    else:  # one rounding of the whole sum
        size = F.conv2d(x.double().abs(), weight.double().abs(), bias.double().abs(), 1, pad, 1, c) + add.double().abs()
        assert ((got.double() - ref).abs() <= ref.abs() * 2.0 ** -8 + size * 2.0 ** -16).all()
    with pytest.raises(ValueError, match="add must be"):
        dwmod._kernel_forward(lib, x, weight, bias, pad, (1, 1), add=add[:, :, :, 1:])


def test_forward_kernel_propagates_nan_and_inf():
    lib = _forward_kernel_lib()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.ones(1, 16, 5, 5, dtype=dtype).contiguous(memory_format=torch.channels_last)
        x[0, 3, 2, 2] = float("nan")
        x[0, 4, 2, 2] = float("inf")
        w = torch.ones(16, 1, 3, 3, dtype=dtype)
        got = dwmod._kernel_forward(lib, x, w, None, (1, 1), (1, 1))
        ref = F.conv2d(x.float(), w.float(), None, 1, 1, 1, 16)
        assert torch.equal(got.float().isnan(), ref.isnan()) and torch.equal(got.float().isinf(), ref.isinf())
        assert got[0, 3].isnan().sum() == 9 and got[0, 4].isinf().sum() == 9


def test_forward_kernel_refuses_what_it_does_not_compute():
    # column dilation and kernel rows wider than it was built for: a clear error, never a wrong result
    lib = _forward_kernel_lib()
    x = torch.randn(1, 16, 20, 20).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="refused kernel"):
        dwmod._kernel_forward(lib, x, torch.randn(16, 1, 3, 3), None, (2, 2), (2, 2))
    wide = lib.mixlab_dw_fwd_max_kw() + 2
    with pytest.raises(RuntimeError, match="refused kernel"):
        dwmod._kernel_forward(lib, torch.randn(1, 16, 40, 40).contiguous(memory_format=torch.channels_last),
                              torch.randn(16, 1, 1, wide), None, (0, 0), (1, 1))
    # and the op never offers it there: column dilation, an NCHW input, fp16, a CPU without the kernel
    assert not dwmod._kernel_forward_ok(lib, x, (3, 3), (1, 2))
    assert not dwmod._kernel_forward_ok(lib, x.contiguous(), (3, 3), (1, 1))
    assert not dwmod._kernel_forward_ok(lib, x.half(), (3, 3), (1, 1))
    assert not dwmod._kernel_forward_ok(lib, x, (1, wide), (1, 1))

    class NoForward:
        @staticmethod
        def mixlab_dw_fwd_max_kw():
            return 0

    assert not dwmod._kernel_forward_ok(NoForward(), x, (3, 3), (1, 1))
    assert dwmod._kernel_forward_ok(lib, x, (3, 3), (1, 1))


@pytest.mark.parametrize("method", ["aten", "kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_forward_and_gradients_by_either_forward(method, dtype, monkeypatch):
    """The op end to end with its forward and input gradient forced to aten or the kernel."""
    _forward_kernel_lib()
    monkeypatch.setattr(dwmod.PLAN, "_choices", {})
    picks = {"kernel": ("kernel", "flipped_kernel"), "aten": ("aten",)}[method]
    chosen = []

    def choose(key, cands, run, *margin):
        m = next(c for c in cands if c in picks) if any(c in picks for c in cands) else cands[0]
        chosen.append((key.split("|")[0], m))
        return m

    monkeypatch.setattr(dwmod, "_choose", choose)
    dwmod.set_weight_grad_method("kernel")
    try:
        x, weight, bias, pad = _case(2, 37, 12, 10, 11, 1, "same", dtype, True)
        (ref_out, ref_gx, ref_gw, ref_gb), upstream = _reference(x, weight, bias, pad, 1)
        out, gx, gw, gb = _grads(depthwise_conv2d, x, weight, bias, pad, 1, lambda o: upstream.to(o.dtype))
    finally:
        dwmod.set_weight_grad_method(None)
    kinds = {kind: m for kind, m in chosen}
    assert kinds.get("fwd") == ("kernel" if method == "kernel" else "aten")
    assert kinds.get("dgrad") == ("flipped_kernel" if method == "kernel" else "aten")
    for got, want in ((out, ref_out), (gx, ref_gx), (gw, ref_gw), (gb, ref_gb)):
        assert _rel_err(got, want) < TOL[dtype]


def test_forward_choice_is_timed_once_and_reused(monkeypatch):
    _forward_kernel_lib()
    monkeypatch.setattr(dwmod.PLAN, "_choices", {})
    monkeypatch.setattr(dwmod.PLAN, "set", lambda key, choice: dwmod.PLAN._choices.__setitem__(key, choice))
    timed = []
    real = dwmod.time_each
    monkeypatch.setattr(dwmod, "time_each", lambda runs: timed.append(sorted(runs)) or real(runs))
    x = torch.randn(2, 32, 9, 9).contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 1, 7, 7)
    for _ in range(3):
        y = dwmod._forward(x, w, None, (3, 3), (1, 1))
    assert timed == [["aten", "kernel"]]
    (key, choice), = dwmod.PLAN._choices.items()
    assert key.startswith("fwd|(2, 32, 9, 9)|k7x7") and key.endswith("|aten,kernel") and choice in ("aten", "kernel")
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 3, 1, 32), rtol=1e-5, atol=1e-5)
    # column dilation: aten only, nothing timed
    dwmod._forward(x, w[:, :, :3, :3], None, (2, 2), (2, 2))
    assert len(timed) == 1


def test_a_choice_made_without_the_kernel_is_not_kept_once_it_builds(monkeypatch):
    """A weight-gradient choice recorded while the kernel could not be built (no compiler yet, a
    stale build) is keyed by its candidates, so the kernel is timed once it is available."""
    monkeypatch.setattr(dwmod.PLAN, "_choices", {})
    monkeypatch.setattr(dwmod.PLAN, "set", lambda key, choice: dwmod.PLAN._choices.__setitem__(key, choice))
    x = torch.randn(2, 16, 8, 8).bfloat16().contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 16, 8, 8).bfloat16().contiguous(memory_format=torch.channels_last)
    depthwise_build._reset_for_tests()
    monkeypatch.setenv("MIXLAB_FAST_DEPTHWISE_BUILD", "0")
    depthwise_weight_grad(x, g, 3, 1)
    without = [k for k in dwmod.PLAN._choices if k.startswith("(2, 16, 8, 8)")]
    assert len(without) == 1 and without[0].endswith("|aten,aten_fp32")
    monkeypatch.delenv("MIXLAB_FAST_DEPTHWISE_BUILD")
    depthwise_build._reset_for_tests()
    if not dwmod.fast_depthwise_available():
        pytest.skip(f"kernel not built here: {depthwise_build.unavailable_reason()}")
    depthwise_weight_grad(x, g, 3, 1)
    keys = [k for k in dwmod.PLAN._choices if k.startswith("(2, 16, 8, 8)")]
    assert len(keys) == 2 and any(k.endswith("|kernel,aten,aten_fp32") for k in keys)
    depthwise_build._reset_for_tests()


@pytest.mark.parametrize("kernel_time, want", [(0.5, "flipped_kernel"), (0.9, "flipped_forward"), (1.2, "flipped_forward")])
def test_the_forward_kernel_must_beat_aten_by_the_margin(kernel_time, want, monkeypatch):
    # timed alone the kernel's gain overstates the step's: it is chosen only when clearly faster
    monkeypatch.setattr(dwmod.PLAN, "_choices", {})
    monkeypatch.setattr(dwmod.PLAN, "set", lambda key, choice: dwmod.PLAN._choices.__setitem__(key, choice))
    times = {"aten": 1.3, "flipped_forward": 1.0, "flipped_kernel": kernel_time}
    monkeypatch.setattr(dwmod, "time_each", lambda runs: {m: times[m] for m in runs})
    got = dwmod._choose("k", list(times), lambda m: None, dwmod.FORWARD_KERNEL_MARGIN)
    assert got == want and dwmod.PLAN._choices == {"k": want}
    # the weight gradient's choice keeps no margin: the fastest wins
    monkeypatch.setattr(dwmod, "time_each", lambda runs: {"kernel": 0.95, "aten": 1.0})
    assert dwmod._choose("w", ["kernel", "aten"], lambda m: None) == "kernel"


@pytest.mark.parametrize("kw", [2, 3, 4, 5, 7, 8, 11, 13])
@pytest.mark.parametrize("w", [4, 5, 8, 12, 16, 21])
@pytest.mark.parametrize("c", [5, 16, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_kernel_forms_equal_the_reference(kw, w, c, dtype, monkeypatch):
    # which form the channels-last kernel uses depends on the row's taps and the map's width (the
    # register-tiled form on AVX-512 CPUs: maps 16+ wide, or 5+ taps on maps 5-15 wide): every one
    # against fp64, with an even row, rows taller than wide (kh != kw), and padding that is not 'same'
    depthwise_build._reset_for_tests()
    if not dwmod.fast_depthwise_available():
        pytest.skip(f"kernel not built here: {depthwise_build.unavailable_reason()}")
    dwmod.set_weight_grad_method("kernel")
    try:
        g = torch.Generator().manual_seed(kw * 100 + w * 10 + c)
        kh, pad = 3, (1, kw // 2)
        x = torch.randn(2, c, 7, w, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        out_w = w + 2 * pad[1] - (kw - 1)
        gy = torch.randn(2, c, 7, out_w, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        got = depthwise_weight_grad(x, gy, (kh, kw), pad)
        ref = torch.ops.aten.convolution_backward(gy.double(), x.double(), torch.empty(c, 1, kh, kw, dtype=torch.float64),
                                                  None, [1, 1], list(pad), [1, 1], False, [0, 0], c,
                                                  [False, True, False])[1]
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert _rel_err(got, ref) < 1e-5  # fp32 sums of the inputs' exact products, bf16 or not
    finally:
        dwmod.set_weight_grad_method(None)
        depthwise_build._reset_for_tests()


@pytest.mark.parametrize("kw, w, pw", [(3, 17, 0), (5, 9, 2), (5, 9, 0), (11, 21, 5)])
def test_weight_grad_keeps_an_inf_input_to_the_taps_that_meet_it(kw, w, pw):
    # an Inf in the input makes only the weight taps it is really multiplied into infinite: the
    # last, partial tile of a row must not multiply it by the zero gradient of a pixel that is not there
    depthwise_build._reset_for_tests()
    if not dwmod.fast_depthwise_available():
        pytest.skip(f"kernel not built here: {depthwise_build.unavailable_reason()}")
    dwmod.set_weight_grad_method("kernel")
    try:
        g = torch.Generator().manual_seed(kw + w)
        x = torch.randn(1, 16, 1, w, generator=g)
        x[:, :, :, -1] = float("inf")
        x = x.contiguous(memory_format=torch.channels_last)
        out_w = w + 2 * pw - (kw - 1)
        gy = torch.rand(1, 16, 1, out_w, generator=g).add_(0.5).contiguous(memory_format=torch.channels_last)
        got = depthwise_weight_grad(x, gy, (1, kw), (0, pw))
        ref = torch.ops.aten.convolution_backward(gy.double(), x.double(), torch.empty(16, 1, 1, kw, dtype=torch.float64),
                                                  None, [1, 1], [0, pw], [1, 1], False, [0, 0], 16,
                                                  [False, True, False])[1]
        assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())
        finite = ref.isfinite()
        assert finite.any() and _rel_err(got[finite], ref[finite]) < 1e-5
    finally:
        dwmod.set_weight_grad_method(None)
        depthwise_build._reset_for_tests()


def test_timing_interleaves_the_candidates_so_a_slow_moment_falls_on_all():
    # the machine is slow for the first two timed calls: timed back to back, the fast candidate would
    # take both and look slow; interleaved, each candidate still has calls outside the slow moment
    import time as _time

    from mixlab.ops.kernel_build import time_each

    calls = []

    def make(name, seconds):
        def run():
            calls.append(name)
            slow = 0.03 if len(calls) in (3, 4) else 0.0  # calls 1-2 are the untimed warm-ups
            _time.sleep(seconds + slow)
        return run

    times = time_each({"fast": make("fast", 0.002), "slow": make("slow", 0.006)})
    assert calls[:4] == ["fast", "slow", "fast", "slow"]
    assert min(times, key=times.get) == "fast"
