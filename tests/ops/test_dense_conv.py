"""mixlab.ops.dense_conv: the dense KxK convolution by each method (aten's; the gathered weight
gradient; Winograd's for fp32 3x3 stride 1) against an fp64 reference and aten, the module swap,
where it steps aside, and the per-shape choices."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixlab.ops import dense_conv as dc
from mixlab.ops.dense_conv import DenseConv2d, dense_conv_weight_grad, restore_dense_conv, use_fast_dense_conv
from mixlab.ops.winograd import winograd_available

CL = torch.channels_last


@pytest.fixture
def method():
    def force(m):
        dc.set_dense_conv_method(m)
    yield force
    dc.set_dense_conv_method(None)


def _fp64_grads(x, w, b, dy, stride, padding, dilation):
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    F.conv2d(x.double(), w64, b64, stride, padding, dilation).backward(dy.double())
    return w64.grad, b64.grad


# (N, C_in, C_out, H, W, kernel, stride, padding, dilation)
CASES = [(2, 3, 5, 9, 7, 3, 1, 1, 1), (1, 4, 6, 10, 11, 5, 2, 2, 1), (3, 2, 3, 12, 9, 3, 1, 2, 2),
         (2, 5, 4, 8, 8, 3, 2, 0, 1), (1, 3, 2, 7, 13, 7, 1, 3, 1), (2, 4, 4, 30, 40, 3, 1, 1, 1),
         (1, 6, 3, 6, 6, (3, 5), (1, 2), (0, 2), 1), (2, 3, 4, 9, 9, 3, 3, 4, 1)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("target_rows", [4096, 17, 1])  # one chunk; bands and image groups; one row each
def test_weight_grad_equals_fp64_reference(monkeypatch, case, target_rows):
    n, ci, co, h, w, k, s, p, d = case
    kh, kw = (k, k) if isinstance(k, int) else k
    monkeypatch.setattr(dc, "_TARGET_ROWS", target_rows)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, ci, h, w, generator=g).contiguous(memory_format=CL)
    wt = torch.randn(co, ci, kh, kw, generator=g)
    b = torch.randn(co, generator=g)
    dy = torch.randn(F.conv2d(x, wt, b, s, p, d).shape, generator=g).contiguous(memory_format=CL)
    gw, gb = dense_conv_weight_grad(x, dy, (kh, kw), s, p, d, with_bias=True)
    ref_w, ref_b = _fp64_grads(x, wt, b, dy, s, p, d)
    assert gw.shape == wt.shape and gw.dtype == gb.dtype == torch.float32
    torch.testing.assert_close(gw.double(), ref_w, rtol=1e-5, atol=1e-5 * ref_w.abs().max().item())
    torch.testing.assert_close(gb.double(), ref_b, rtol=1e-5, atol=1e-5)
    assert dense_conv_weight_grad(x, dy, (kh, kw), s, p, d)[1] is None


def test_bf16_weight_grad_is_as_close_to_fp64_as_aten():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, 20, 20, generator=g).bfloat16().contiguous(memory_format=CL)
    wt = torch.randn(24, 16, 3, 3, generator=g).bfloat16()
    dy = torch.randn(4, 24, 20, 20, generator=g).bfloat16().contiguous(memory_format=CL)
    ref = torch.ops.aten.convolution_backward(dy.double(), x.double(), wt.double(), None, [1, 1], [1, 1], [1, 1],
                                              False, [0, 0], 1, [False, True, False])[1]
    ours = dense_conv_weight_grad(x, dy, 3, 1, 1, 1)[0]
    aten = torch.ops.aten.convolution_backward(dy, x, wt, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                               [False, True, False])[1]
    err = (ours.double() - ref).abs().max().item()
    err_aten = (aten.double() - ref).abs().max().item()
    assert ours.dtype == torch.float32 and err <= max(2 * err_aten, 1e-2 * ref.abs().max().item()), (err, err_aten)


def test_bad_shapes_are_refused_with_the_reason():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="does not fit a 3x3 convolution"):
        dense_conv_weight_grad(x, torch.randn(2, 4, 7, 7), 3, 1, 1)
    with pytest.raises(ValueError, match="of one batch"):
        dense_conv_weight_grad(x, torch.randn(3, 4, 8, 8), 3, 1, 1)
    with pytest.raises(ValueError, match="dense conv method"):
        dc.set_dense_conv_method("fft")


def _grads(conv, x, dy, autocast=False):
    conv = copy.deepcopy(conv)
    xs = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = conv(xs)
    y.backward(dy)
    return y.detach(), xs.grad, conv.weight.grad, conv.bias.grad


@pytest.mark.parametrize("m", dc.METHODS)
@pytest.mark.parametrize("conv_args", [dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=0),
                                       dict(kernel_size=3, stride=2, padding=1),
                                       dict(kernel_size=5, padding=4, dilation=2), dict(kernel_size=(3, 1))])
def test_module_equals_conv2d_in_every_gradient(method, kernel_cache, monkeypatch, m, conv_args):
    monkeypatch.setenv("MIXLAB_KERNEL_CACHE", str(kernel_cache))
    if m == "winograd" and not winograd_available():
        pytest.skip("the Winograd kernel is not built here")
    torch.manual_seed(0)
    ref = nn.Conv2d(5, 7, **conv_args)
    fast = copy.deepcopy(ref)
    assert use_fast_dense_conv(fast) == 1 and type(fast) is DenseConv2d
    x = torch.randn(3, 5, 11, 9).contiguous(memory_format=CL)
    dy = torch.randn(ref(x).shape)
    method(m)
    got, want = _grads(fast, x, dy), _grads(ref, x, dy)
    # Winograd's transforms cost fp32 digits (within ~1e-5 of the largest entry: test_winograd.py)
    tol = 2e-5 if m == "winograd" else 1e-5
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("m", ["im2col", "winograd"])  # Winograd's is fp32 alone: bf16 takes im2col
def test_module_under_autocast_runs_bf16_like_aten(method, monkeypatch, m):
    monkeypatch.setattr(dc, "winograd_conv3x3", lambda *a: pytest.fail("Winograd's forward ran in bf16"))
    monkeypatch.setattr(dc, "winograd_conv3x3_backward", lambda *a, **k: pytest.fail("Winograd's backward ran"))
    method(m)
    torch.manual_seed(1)
    ref = nn.Conv2d(16, 24, 3, padding=1)
    fast = copy.deepcopy(ref)
    use_fast_dense_conv(fast)
    x = torch.randn(4, 16, 10, 10).contiguous(memory_format=CL)
    dy = torch.randn(4, 24, 10, 10).bfloat16()
    got, want = _grads(fast, x, dy, autocast=True), _grads(ref, x, dy, autocast=True)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0])  # the forward is aten's
    torch.testing.assert_close(got[1], want[1])  # so is the input gradient
    torch.testing.assert_close(got[2], want[2], rtol=2e-2, atol=2e-2 * want[2].abs().max().item())


def test_steps_aside_where_it_does_not_apply(method, monkeypatch):
    method("im2col")
    monkeypatch.setattr(dc, "dense_conv_weight_grad", lambda *a, **k: pytest.fail("the im2col path ran"))
    torch.manual_seed(2)
    ref = nn.Conv2d(4, 6, 3, padding=1)
    fast = copy.deepcopy(ref)
    use_fast_dense_conv(fast)
    nchw = torch.randn(2, 4, 5, 5)
    got, want = _grads(fast, nchw, torch.ones(2, 6, 5, 5)), _grads(ref, nchw, torch.ones(2, 6, 5, 5))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with torch.no_grad():  # no gradient: aten's forward
        assert torch.equal(fast(nchw.contiguous(memory_format=CL)), ref(nchw.contiguous(memory_format=CL)))
    # only plain one-group KxK convs with numeric padding, zero padding mode and no hooks are switched
    kept = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, groups=4),
                         nn.Conv2d(4, 4, 3, padding="same"), nn.Conv2d(4, 4, 3, padding_mode="reflect"),
                         nn.Conv2d(1, 1, 3))
    hooked = nn.Conv2d(4, 4, 3)
    hooked.register_forward_hook(lambda *a: None)
    assert use_fast_dense_conv(nn.Sequential(kept, hooked)) == 0


def test_swap_keeps_state_and_restores():
    import mixlab

    model = mixlab.create_model("convmlp_s")
    want = {k: v.clone() for k, v in model.state_dict().items()}
    n = sum(type(m) is nn.Conv2d and m.groups == 1 and m.kernel_size != (1, 1) for m in model.modules())
    assert n == 8 and use_fast_dense_conv(model) == n  # 3 tokenizer, 2 bottleneck 3x3, 3 downsamples
    got = model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert restore_dense_conv(model) == n and not any(type(m) is DenseConv2d for m in model.modules())


def test_methods_are_timed_once_per_shape_and_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXLAB_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(dc.PLAN, "_choices", None)
    calls = []
    fake = {"aten": 3.0, "im2col": 1.0, "winograd": 2.0}
    monkeypatch.setattr(dc, "time_each", lambda runs: calls.append(sorted(runs)) or {k: fake[k] for k in runs})
    strided, winograd_ok = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv2d(4, 6, 3, padding=1)
    use_fast_dense_conv(nn.Sequential(strided, winograd_ok))
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=CL).requires_grad_()
    for _ in range(3):
        strided(x).sum().backward()
    assert calls == [["aten", "im2col"]]  # Winograd's is for stride 1 alone; the forward is aten's
    plan = json.loads(dc.PLAN.path().read_text())
    assert list(plan.values()) == ["im2col"]
    assert list(plan)[0].startswith("backward|dx1|dw1|w0|(2, 4, 9, 9)|(6, 4, 3, 3)|s(2, 2)|p(1, 1)|d(1, 1)|float32")
    monkeypatch.setattr(dc.PLAN, "_choices", None)  # a new process reads the verdict
    strided(x).sum().backward()
    assert len(calls) == 1
    if not winograd_available():
        return
    for _ in range(2):
        winograd_ok(x).sum().backward()
    assert calls[1:] == [["aten", "winograd"], ["aten", "im2col", "winograd"]]
    plan = json.loads(dc.PLAN.path().read_text())
    assert sorted(plan.values()) == ["im2col", "im2col", "winograd"]  # the forward: Winograd's
    # a choice made where Winograd's kernel could not run is timed again where it can (and kept apart)
    monkeypatch.setattr(dc, "winograd_available", lambda: False)
    winograd_ok(x).sum().backward()
    assert calls[3:] == [["aten", "im2col"]]
    monkeypatch.setattr(dc, "winograd_available", lambda: True)
    winograd_ok(x).sum().backward()
    assert len(calls) == 4


@pytest.mark.parametrize("m", dc.METHODS)
def test_swapped_model_trains_as_the_original(method, kernel_cache, monkeypatch, m):
    import mixlab

    monkeypatch.setenv("MIXLAB_KERNEL_CACHE", str(kernel_cache))
    if m == "winograd" and not winograd_available():
        pytest.skip("the Winograd kernel is not built here")
    method(m)
    torch.manual_seed(0)
    a = mixlab.create_model("convmlp_s", num_classes=4).to(memory_format=CL)
    b = copy.deepcopy(a)
    assert use_fast_dense_conv(b) == 8
    opt_a, opt_b = (torch.optim.SGD(net.parameters(), lr=0.05) for net in (a, b))
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=CL)
    y = torch.randint(0, 4, (4,))
    for step in range(3):
        losses = []
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            torch.manual_seed(step)  # the same stochastic-depth draws in both
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-5, losses


def test_frozen_weight_gets_no_weight_gradient(method, monkeypatch):
    method("im2col")
    monkeypatch.setattr(dc, "dense_conv_weight_grad", lambda *a, **k: pytest.fail("a weight gradient was computed"))
    torch.manual_seed(3)
    ref = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    fast = copy.deepcopy(ref)
    use_fast_dense_conv(fast)
    for conv in (ref, fast):
        conv.weight.requires_grad_(False)
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=CL)
    dy = torch.randn(ref(x).shape)
    got, want = _grads(fast, x, dy), _grads(ref, x, dy)
    assert got[2] is None and want[2] is None
    for a, b in ((got[1], want[1]), (got[3], want[3])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
