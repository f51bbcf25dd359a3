"""mixlab.ops.pointwise: the 1x1 convolution's weight gradient by each method against aten and
an fp64 reference, the module swap, where it steps aside, and the per-shape choice."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixlab.ops import pointwise as pw
from mixlab.ops.pointwise import PointwiseConv2d, restore_pointwise, use_fast_pointwise


@pytest.fixture
def method():
    def force(m):
        pw.set_pointwise_method(m)
    yield force
    pw.set_pointwise_method(None)


def _grads(conv, x, dy, autocast=False):
    conv = copy.deepcopy(conv)
    xs = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = conv(xs)
    y.backward(dy)
    return y.detach(), xs.grad, conv.weight.grad, conv.bias.grad


# (N, C_in, C_out, H, W)
@pytest.mark.parametrize("shape", [(4, 6, 10, 4, 4), (3, 7, 5, 3, 5), (1, 16, 8, 2, 2)])
@pytest.mark.parametrize("m", pw.METHODS)
def test_each_method_equals_aten_in_fp32_and_fp64_reference(method, shape, m):
    n, ci, co, h, w = shape
    torch.manual_seed(0)
    ref = nn.Conv2d(ci, co, 1)
    fast = copy.deepcopy(ref)
    assert use_fast_pointwise(fast) == 1 and type(fast) is PointwiseConv2d
    x = torch.randn(n, ci, h, w).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(n, co, h, w)
    method(m)
    got, want = _grads(fast, x, dy), _grads(ref, x, dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the weight gradient against fp64: sum over pixels of dy (x) x
    gw64 = torch.einsum("nohw,nihw->oi", dy.double(), x.double())
    torch.testing.assert_close(got[2].double().view(co, ci), gw64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[3].double(), dy.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", pw.METHODS)
def test_under_autocast_as_close_to_fp64_as_aten(method, m):
    torch.manual_seed(1)
    ref = nn.Conv2d(32, 48, 1)
    fast = copy.deepcopy(ref)
    use_fast_pointwise(fast)
    x = torch.randn(8, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(8, 48, 6, 6).bfloat16()
    method(m)
    got, want = _grads(fast, x, dy, autocast=True), _grads(ref, x, dy, autocast=True)
    assert got[0].dtype == want[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0])  # the forward is aten's
    torch.testing.assert_close(got[1], want[1])  # so is the input gradient
    xb = x.bfloat16().double()
    gw64 = torch.einsum("nohw,nihw->oi", dy.double(), xb)
    for i, r in ((2, gw64), (3, dy.double().sum((0, 2, 3)))):
        err, err_aten = ((got[i].double().view_as(r) - r).abs().max().item(),
                         (want[i].double().view_as(r) - r).abs().max().item())
        assert err <= 2 * err_aten + 1e-3 * r.abs().max().item(), (i, err, err_aten)


def test_steps_aside_where_it_does_not_apply(method):
    method("mm")
    torch.manual_seed(2)
    ref = nn.Conv2d(4, 6, 1)
    fast = copy.deepcopy(ref)
    use_fast_pointwise(fast)
    nchw = torch.randn(2, 4, 3, 3)
    for x in (nchw, nchw.contiguous(memory_format=torch.channels_last)):
        with torch.no_grad():
            assert torch.equal(fast(x), ref(x))
    got, want = _grads(fast, nchw, torch.randn(2, 6, 3, 3)), _grads(ref, nchw, torch.randn(2, 6, 3, 3))
    assert torch.equal(got[0], want[0])
    # only plain 1x1 convs, stride 1, no padding, one group, without hooks are switched
    kept = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1, stride=2), nn.Conv2d(4, 4, 1, groups=2),
                         nn.Conv2d(4, 4, 1, padding=1))
    hooked = nn.Conv2d(4, 4, 1)
    hooked.register_forward_hook(lambda *a: None)
    assert use_fast_pointwise(nn.Sequential(kept, hooked)) == 0


def test_swap_keeps_state_and_restores():
    import mixlab

    model = mixlab.create_model("conv2former_n_cifar")
    want = {k: v.clone() for k, v in model.state_dict().items()}
    n = sum(type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) for m in model.modules())
    assert n > 0 and use_fast_pointwise(model) == n
    got = model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert restore_pointwise(model) == n and not any(type(m) is PointwiseConv2d for m in model.modules())


def test_method_is_timed_once_per_shape_and_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXLAB_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(pw.PLAN, "_choices", None)
    calls = []
    monkeypatch.setattr(pw, "time_each", lambda runs: calls.append(sorted(runs)) or
                        {"aten": 3.0, "mm": 1.0})
    conv = nn.Conv2d(4, 6, 1)
    use_fast_pointwise(conv)
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    for _ in range(3):
        conv(x).sum().backward()
    assert calls == [["aten", "mm"]]  # fp32 and 6 channels: not the kernel's
    plan = json.loads(pw.PLAN.path().read_text())
    assert list(plan.values()) == ["mm"] and list(plan)[0].startswith("(2, 4, 3, 3)|(6, 4, 1, 1)|float32")
    monkeypatch.setattr(pw.PLAN, "_choices", None)  # a new process reads the verdict
    conv(x).sum().backward()
    assert len(calls) == 1
    with pytest.raises(ValueError, match="pointwise method"):
        pw.set_pointwise_method("fast")


def test_swapped_model_trains_as_the_original():
    import mixlab

    torch.manual_seed(0)
    a = mixlab.create_model("conv2former_n_cifar", num_classes=4).to(memory_format=torch.channels_last)
    b = copy.deepcopy(a)
    use_fast_pointwise(b)
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (a, b))
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (4,))
    for _ in range(3):
        losses = []
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-5, losses


def _bf16_rows(m, c, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, c, generator=g) * 2).bfloat16()


# rows: one pair, an odd count, under one chunk, several chunks with an odd tail; channels (C_in, C_out):
# one 16-wide block; output tiles of 6 with tails (16 = 6+6+4, 80, 144); vector blocks of 64 with tails of
# 16 and 32 (80 = 64+16, 144, 272 = 4 x 64 + 16, 96 = 64+32); with at most 128 outputs and more inputs the
# kernel swaps its operands ((80, 48), (160, 96), (96, 32)), from 144 outputs on it does not ((272, 144))
@pytest.mark.parametrize("m", [1, 2, 75, 256, 1033])
@pytest.mark.parametrize("ci,co", [(16, 16), (80, 48), (48, 80), (64, 64), (80, 144), (272, 144), (160, 96),
                                   (96, 32)])
@pytest.mark.parametrize("threads", [1, 3])
def test_kernel_weight_grad_against_fp64(pointwise_kernel, m, ci, co, threads):
    x, g = _bf16_rows(m, ci, 0), _bf16_rows(m, co, 1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gw, gb = pw.pointwise_weight_grad(x, g)
        gw_only, none = pw.pointwise_weight_grad(x, g, with_bias=False)
    finally:
        torch.set_num_threads(before)
    assert gw.dtype == gb.dtype == torch.float32 and gw.shape == (co, ci) and gb.shape == (co,) and none is None
    assert torch.equal(gw, gw_only)
    # bf16 values are exact in fp64: the only error allowed is fp32 accumulation, bounded by the
    # sum of the products' sizes
    want = g.double().t() @ x.double()
    bound = g.double().abs().t() @ x.double().abs()
    assert ((gw.double() - want).abs() <= 1e-5 * bound + 1e-30).all()
    bsum = g.double().sum(0)
    assert ((gb.double() - bsum).abs() <= 1e-6 * g.double().abs().sum(0) + 1e-30).all()


def test_kernel_weight_grad_refuses_what_it_does_not_run(pointwise_kernel):
    x = _bf16_rows(10, 16, 0)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU rows"):
            pw.pointwise_weight_grad(x.cuda(), _bf16_rows(10, 16, 1).cuda())
    with pytest.raises(ValueError, match="multiples of 16"):
        pw.pointwise_weight_grad(x, _bf16_rows(10, 24, 1))
    with pytest.raises(ValueError, match="multiples of 16"):
        pw.pointwise_weight_grad(x.float(), _bf16_rows(10, 16, 1).float())
    with pytest.raises(ValueError, match=r"\(M, C_in\) and \(M, C_out\)"):
        pw.pointwise_weight_grad(x, _bf16_rows(12, 16, 1))


def test_kernel_in_a_layer_under_autocast(pointwise_kernel, monkeypatch):
    """The layer's gradients under bf16 autocast with the kernel: the forward and input gradient are
    aten's bit for bit, the weight and bias gradients far closer to fp64 than aten's."""
    calls = []
    real = pw.pointwise_weight_grad
    monkeypatch.setattr(pw, "pointwise_weight_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(3)
    ref = nn.Conv2d(64, 32, 1)
    fast = copy.deepcopy(ref)
    use_fast_pointwise(fast)
    x = torch.randn(4, 64, 9, 7).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(4, 32, 9, 7).bfloat16()
    got, want = _grads(fast, x, dy, autocast=True), _grads(ref, x, dy, autocast=True)
    assert calls == [1]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    gw64 = torch.einsum("nohw,nihw->oi", dy.double(), x.bfloat16().double())
    err = (got[2].double().view(32, 64) - gw64).abs().max().item()
    err_aten = (want[2].double().view(32, 64) - gw64).abs().max().item()
    assert err < err_aten / 20, (err, err_aten)
    torch.testing.assert_close(got[3].double(), dy.double().sum((0, 2, 3)), rtol=1e-6, atol=1e-5)


def test_kernel_trains_conv2former_as_aten_does(pointwise_kernel, monkeypatch):
    """Three AdamW steps of a Conv2Former under bf16 autocast, the kernel computing every 1x1 weight
    gradient it can against aten computing them all: the losses agree to bf16's precision."""
    import mixlab

    calls = []
    real = pw.pointwise_weight_grad
    monkeypatch.setattr(pw, "pointwise_weight_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    a = mixlab.create_model("conv2former_n_cifar", num_classes=4).to(memory_format=torch.channels_last)
    b = copy.deepcopy(a)
    use_fast_pointwise(a)
    use_fast_pointwise(b)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (4,))
    losses = {}
    for name, model in (("aten", a), ("kernel", b)):
        pw.set_pointwise_method(name)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[name] = []
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    pw.set_pointwise_method("kernel")
    assert len(calls) >= 3 * 40  # Conv2Former-N's 1x1 layers have channel counts of multiples of 16
    torch.testing.assert_close(losses["kernel"], losses["aten"], rtol=2e-2, atol=0)


def test_kernel_is_timed_where_it_applies(pointwise_kernel, monkeypatch, tmp_path):
    monkeypatch.setenv("MIXLAB_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(pw.PLAN, "_choices", None)
    pw.set_pointwise_method(None)
    calls = []
    times = {"aten": 3.0, "mm": 2.0, "kernel": 1.0}
    monkeypatch.setattr(pw, "time_each", lambda runs: calls.append(sorted(runs)) or {m: times[m] for m in runs})
    conv = nn.Conv2d(16, 32, 1)
    use_fast_pointwise(conv)
    x = torch.randn(2, 16, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        y.float().sum().backward()
    assert calls == [["aten", "kernel", "mm"]]
    assert list(pw.PLAN.choices().values()) == ["kernel"]
    # where the kernel cannot run (here: not built), the shape is timed again without it, under its own key
    monkeypatch.setattr(pw, "fast_pointwise_available", lambda: False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    y.float().sum().backward()
    assert calls[1] == ["aten", "mm"] and sorted(pw.PLAN.choices().values()) == ["kernel", "mm"]
    assert sorted(k[-2:] for k in pw.PLAN.choices()) == ["k0", "k1"]
