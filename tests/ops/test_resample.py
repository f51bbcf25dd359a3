"""mixlab.ops.resample: BatchNorm + max-pool + ReLU, BatchNorm + upsample + ReLU + residual and
upsample + ReLU + 1x1 conv against written-out
fp64 references and aten, what stays aten, the running statistics, the module swap on UNeXt, the
per-shape choice and torch.compile."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixlab
from mixlab.ops import resample as rs
from mixlab.ops.resample import (PoolingBatchNorm2d, UpsamplingBatchNorm2d, UpsamplingConv2d, batch_norm_max_pool_relu,
                                 batch_norm_upsample_relu_add, restore_resample, upsample_relu_conv1x1,
                                 use_fast_resample)


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- references (fp64, written out)

def _pool_ref(x, w, b, dy, eps=1e-5):
    """relu(maxpool2(batch_norm(x))) with batch statistics, written out; y and dx, dw, db."""
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    mean = xd.mean((0, 2, 3), keepdim=True)
    var = ((xd - mean) ** 2).mean((0, 2, 3), keepdim=True)
    z = (xd - mean) / torch.sqrt(var + eps) * wd.view(1, -1, 1, 1) + bd.view(1, -1, 1, 1)
    n, c, h, w_ = z.shape
    win = z.reshape(n, c, h // 2, 2, w_ // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w_ // 2, 4)
    best = win.gather(-1, win.argmax(-1, keepdim=True)).squeeze(-1)  # the first maximum, as aten's pool
    y = torch.where(best > 0, best, torch.zeros_like(best))
    y.backward(dy.double())
    return y.detach(), xd.grad, wd.grad, bd.grad


def _interp_matrix(n_in):
    """(2 n_in, n_in): 2x bilinear upsampling along one axis, align_corners=False, from its formula."""
    a = torch.zeros(2 * n_in, n_in, dtype=torch.float64)
    for o in range(2 * n_in):
        src = max((o + 0.5) / 2 - 0.5, 0.0)
        i0 = int(src)
        i1 = min(i0 + 1, n_in - 1)
        l1 = src - i0
        a[o, i0] += 1 - l1
        a[o, i1] += l1
    return a


def _up_ref(x, weight, bias, dy):
    """conv1x1(relu(upsample2x(x))), written out; y and dx, dweight, dbias."""
    xd, wd = x.double().requires_grad_(), weight.double().requires_grad_()
    bd = bias.double().requires_grad_() if bias is not None else None
    u = torch.einsum("oh,nchw,pw->ncop", _interp_matrix(x.shape[2]), xd, _interp_matrix(x.shape[3]))
    u = torch.where(u > 0, u, torch.zeros_like(u))
    y = torch.einsum("kc,ncop->nkop", wd[:, :, 0, 0], u)
    if bd is not None:
        y = y + bd.view(1, -1, 1, 1)
    y.backward(dy.double())
    return y.detach(), xd.grad, wd.grad, None if bd is None else bd.grad


def _grads(fn, *args, dy):
    leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for a in args]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [a.grad for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]


def _err(got, want):
    return (got.double() - want).abs().max().item()


# ----------------------------------------------------------------------------- BatchNorm + max-pool + ReLU

# widths with a compiled trip count (8, 16, 32) and others; one image of one window; a negative scale
# (the window maximum of the normalised values is then the minimum of the inputs)
@pytest.mark.parametrize("shape", [(2, 16, 8, 12), (3, 8, 6, 4), (2, 32, 4, 4), (2, 5, 6, 8), (1, 128, 4, 2),
                                   (1, 3, 2, 2)])
def test_pool_kernel_equals_fp64_reference_fp32(resample_kernel, shape):
    g = torch.Generator().manual_seed(sum(shape))
    n, c, h, w = shape
    x = _cl(torch.randn(shape, generator=g) * 3 + 1)
    weight, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    weight[0] = -abs(weight[0])
    dy = _cl(torch.randn(n, c, h // 2, w // 2, generator=g))
    got = _grads(lambda x, w, b: batch_norm_max_pool_relu(x, None, None, w, b, True, 0.1, 1e-5), x, weight, bias, dy=dy)
    want = _pool_ref(x, weight, bias, dy)
    assert got[0].is_contiguous(memory_format=torch.channels_last) and got[1].is_contiguous(memory_format=torch.channels_last)
    assert [t.dtype for t in got] == [torch.float32] * 4
    for i, (k, r) in enumerate(zip(got, want)):
        assert _err(k, r) <= 2e-5 * max(1.0, r.abs().max().item()), (i, _err(k, r))


@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (2, 32, 6, 4), (2, 7, 4, 6)])
def test_pool_kernel_in_bf16_is_as_close_as_aten(resample_kernel, shape):
    g = torch.Generator().manual_seed(7)
    n, c, h, w = shape
    x = _cl(torch.randn(shape, generator=g) * 2 + 0.5).bfloat16()
    weight, bias = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    dy = _cl(torch.randn(n, c, h // 2, w // 2, generator=g)).bfloat16()
    args = (x, weight, bias)
    got = _grads(lambda x, w, b: batch_norm_max_pool_relu(x, None, None, w, b, True, 0.1, 1e-5), *args, dy=dy)
    aten = _grads(lambda x, w, b: rs._aten_pool(x, None, None, w, b, True, 0.1, 1e-5), *args, dy=dy)
    want = _pool_ref(x, weight, bias, dy)
    assert got[0].dtype == got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    # the pooled values are the normalised values rounded to bf16: within one rounding of the reference
    assert _err(got[0], want[0]) <= 2 ** -8 * want[0].abs().max().item()
    for i in range(1, 4):  # where rounding ties two values of a window, both pick the same first one
        assert _err(got[i], want[i]) <= 2 * _err(aten[i], want[i]) + 1e-2 * want[i].abs().max().item(), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_breaks_ties_and_masks_zeros_as_aten(resample_kernel, dtype):
    # small integers, and each image's negative in the batch: every channel's mean is 0, windows tie
    # often and many pooled values are exactly 0 (ReLU passes no gradient there)
    g = torch.Generator().manual_seed(9)
    a = torch.randint(-2, 3, (3, 16, 8, 8), generator=g).float()
    x = _cl(torch.cat([a, -a])).to(dtype)
    w, b = torch.rand(16, generator=g) + 0.5, torch.zeros(16)
    w[:4] = -w[:4]  # negative scales: the maximum of the normalised values is the minimum of the inputs
    dy = _cl(torch.randn(6, 16, 4, 4, generator=g)).to(dtype)
    got = _grads(lambda x, w, b: batch_norm_max_pool_relu(x, None, None, w, b, True, 0.1, 1e-5), x, w, b, dy=dy)
    want = _grads(lambda x, w, b: rs._aten_pool(x, None, None, w, b, True, 0.1, 1e-5), x, w, b, dy=dy)
    assert (got[0] == 0).float().mean() > 0.1  # the case it is about (14% here)
    if dtype == torch.bfloat16:
        assert torch.equal(got[0], want[0])
    else:  # (BatchNorm's arithmetic rounds differently in fp32)
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    for k, a_ in zip(got[1:], want[1:]):  # the same positions get the gradient (else errors of order 1)
        torch.testing.assert_close(k.float(), a_.float(), rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_pool_updates_running_statistics_as_batchnorm_does(resample_kernel):
    g = torch.Generator().manual_seed(0)
    x = _cl(torch.randn(4, 16, 6, 6, generator=g) * 2 + 3)
    for momentum in (0.1, None):
        ref, fused = nn.BatchNorm2d(16, momentum=momentum), nn.BatchNorm2d(16, momentum=momentum)
        fused.__class__ = PoolingBatchNorm2d
        for _ in range(3):
            want = F.relu(F.max_pool2d(ref(x), 2, 2))
            got = fused.forward_pool_relu(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(fused, name), getattr(ref, name), rtol=1e-5, atol=1e-6)  # (aten sums in fp32)
        assert int(fused.num_batches_tracked) == int(ref.num_batches_tracked) == 3


def test_pool_runs_aten_where_the_kernel_does_not_apply(resample_kernel):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    cases = [(_cl(torch.randn(2, 8, 5, 6, generator=g)), True),  # odd height: aten's pool drops the last row
             (torch.randn(2, 8, 6, 6, generator=g), True),  # NCHW
             (_cl(torch.randn(2, 8, 6, 6, generator=g)), False),  # evaluation (running statistics)
             (_cl(torch.randn(2, 8, 6, 6, generator=g)).double(), True)]  # another dtype
    for x, training in cases:
        rm, rv = torch.zeros(8, dtype=x.dtype), torch.ones(8, dtype=x.dtype)
        wx, bx = w.to(x.dtype), b.to(x.dtype)
        got = batch_norm_max_pool_relu(x, rm.clone(), rv.clone(), wx, bx, training, 0.1, 1e-5)
        want = rs._aten_pool(x, rm.clone(), rv.clone(), wx, bx, training, 0.1, 1e-5)
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- BatchNorm + upsample + ReLU + residual

def _up_add_ref(x, skip, w, b, dy, eps=1e-5):
    """relu(upsample2x(batch_norm(x))) + skip with batch statistics, written out; y and dx, dskip, dw, db."""
    xd, sd, wd, bd = (t.double().requires_grad_() for t in (x, skip, w, b))
    mean = xd.mean((0, 2, 3), keepdim=True)
    var = ((xd - mean) ** 2).mean((0, 2, 3), keepdim=True)
    z = (xd - mean) / torch.sqrt(var + eps) * wd.view(1, -1, 1, 1) + bd.view(1, -1, 1, 1)
    u = torch.einsum("oh,nchw,pw->ncop", _interp_matrix(x.shape[2]), z, _interp_matrix(x.shape[3]))
    y = torch.where(u > 0, u, torch.zeros_like(u)) + sd
    y.backward(dy.double())
    return y.detach(), xd.grad, sd.grad, wd.grad, bd.grad


# more than one band of 16 input rows in the backward (33, 40 rows): the rows at a band's edges
@pytest.mark.parametrize("shape", [(2, 16, 8, 12), (3, 5, 7, 4), (2, 32, 6, 6), (1, 8, 1, 3), (2, 160, 4, 4),
                                   (1, 8, 33, 5), (2, 16, 40, 6)])
def test_upsample_add_kernel_equals_fp64_reference_fp32(resample_kernel, shape):
    g = torch.Generator().manual_seed(sum(shape))
    n, c, h, w = shape
    x = _cl(torch.randn(shape, generator=g) * 2 + 1)
    skip = _cl(torch.randn(n, c, 2 * h, 2 * w, generator=g))
    weight, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    dy = _cl(torch.randn(n, c, 2 * h, 2 * w, generator=g))
    got = _grads(lambda x, s, w, b: batch_norm_upsample_relu_add(x, s, None, None, w, b, True, 0.1, 1e-5),
                 x, skip, weight, bias, dy=dy)
    want = _up_add_ref(x, skip, weight, bias, dy)
    assert got[0].is_contiguous(memory_format=torch.channels_last) and got[1].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got[2], dy)  # the residual's gradient is the output's
    for i, (k, r) in enumerate(zip(got, want)):
        assert _err(k, r) <= 2e-5 * max(1.0, r.abs().max().item()), (i, _err(k, r))


def test_upsample_add_kernel_in_bf16_is_as_close_as_aten(resample_kernel):
    g = torch.Generator().manual_seed(5)
    x = _cl(torch.randn(2, 16, 6, 8, generator=g) * 2 + 0.5).bfloat16()
    skip = _cl(torch.randn(2, 16, 12, 16, generator=g)).bfloat16()
    weight, bias = torch.rand(16, generator=g) + 0.5, torch.randn(16, generator=g)
    dy = _cl(torch.randn(2, 16, 12, 16, generator=g)).bfloat16()
    args = (x, skip, weight, bias)
    got = _grads(lambda x, s, w, b: batch_norm_upsample_relu_add(x, s, None, None, w, b, True, 0.1, 1e-5), *args, dy=dy)
    aten = _grads(lambda x, s, w, b: rs._aten_up_add(x, s, None, None, w, b, True, 0.1, 1e-5), *args, dy=dy)
    want = _up_add_ref(*args, dy)
    assert got[0].dtype == got[1].dtype == torch.bfloat16 and got[3].dtype == torch.float32
    for i in range(5):
        assert _err(got[i], want[i]) <= 2 * _err(aten[i], want[i]) + 1e-2 * want[i].abs().max().item(), i


def test_upsample_add_updates_running_statistics_and_steps_aside(resample_kernel):
    g = torch.Generator().manual_seed(4)
    x = _cl(torch.randn(2, 8, 5, 6, generator=g) * 2 + 3)
    skip = _cl(torch.randn(2, 8, 10, 12, generator=g))
    ref, fused = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
    fused.__class__ = UpsamplingBatchNorm2d
    for _ in range(2):
        want = F.relu(F.interpolate(ref(x), scale_factor=2.0, mode="bilinear")) + skip
        got = fused.forward_upsample_relu_add(x, skip)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.running_var, ref.running_var, rtol=1e-5, atol=1e-6)  # (aten sums in fp32)
    torch.testing.assert_close(fused.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    # a residual of another dtype (UNeXt's first decoder stage adds a LayerNorm's fp32 output under
    # bf16 autocast), NCHW and evaluation: aten's result, bit for bit
    w, b = fused.weight.detach(), fused.bias.detach()
    for xi, si, training in ((x.bfloat16(), skip, True), (x.contiguous(), skip.contiguous(), True), (x, skip, False)):
        rm, rv = torch.zeros(8), torch.ones(8)
        got = batch_norm_upsample_relu_add(xi, si, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)
        want = rs._aten_up_add(xi, si, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)
        assert got.dtype == want.dtype and torch.equal(got, want)


# ----------------------------------------------------------------------------- upsample + ReLU + 1x1 conv

# widths with a compiled trip count (8, 16, 32) and others; several outputs; one-row and one-column maps
@pytest.mark.parametrize("shape,k", [((2, 16, 8, 12), 1), ((3, 5, 7, 4), 3), ((1, 8, 1, 5), 2), ((2, 32, 4, 1), 1),
                                     ((1, 16, 40, 40), 2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_upsample_kernel_equals_fp64_reference_fp32(resample_kernel, shape, k, with_bias):
    g = torch.Generator().manual_seed(sum(shape) + k)
    n, c, h, w = shape
    x = _cl(torch.randn(shape, generator=g))
    weight = torch.randn(k, c, 1, 1, generator=g)
    bias = torch.randn(k, generator=g) if with_bias else None
    dy = _cl(torch.randn(n, k, 2 * h, 2 * w, generator=g))
    got = _grads(upsample_relu_conv1x1, x, weight, bias, dy=dy)
    want = [t for t in _up_ref(x, weight, bias, dy) if t is not None]
    assert len(got) == len(want) and [t.dtype for t in got] == [torch.float32] * len(got)
    assert got[0].shape == (n, k, 2 * h, 2 * w) and got[1].is_contiguous(memory_format=torch.channels_last)
    for i, (a, r) in enumerate(zip(got, want)):
        assert _err(a, r) <= 1e-5 * max(1.0, r.abs().max().item()), (i, _err(a, r))


@pytest.mark.parametrize("k", [1, 2])  # 16 channels to one output: the bf16 head's own register form
def test_upsample_kernel_under_autocast_is_as_close_as_aten(resample_kernel, k):
    g = torch.Generator().manual_seed(3)
    x = _cl(torch.randn(2, 16, 12, 10, generator=g)).bfloat16()
    conv = nn.Conv2d(16, k, 1)
    dy = torch.randn(2, k, 24, 20, generator=g).bfloat16()
    fused = copy.deepcopy(conv)
    fused.__class__ = UpsamplingConv2d
    outs = []
    for m, fn in ((fused, fused.forward_upsampled), (conv, lambda t: conv(F.relu(F.interpolate(t, scale_factor=2.0,
                                                                                                mode="bilinear"))))):
        xs = x.detach().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            y = fn(xs)
        y.backward(dy)
        outs.append((y.detach(), xs.grad, m.weight.grad, m.bias.grad))
    want = _up_ref(x, conv.weight.detach().bfloat16(), conv.bias.detach().bfloat16(), dy)
    got, aten = outs
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    for i in range(4):
        assert _err(got[i], want[i]) <= 2 * _err(aten[i], want[i]) + 1e-2 * want[i].abs().max().item(), i


def test_upsample_runs_aten_where_the_kernel_does_not_apply(resample_kernel):
    g = torch.Generator().manual_seed(2)
    x = _cl(torch.randn(2, 4, 5, 6, generator=g))
    w, b = torch.randn(3, 4, 1, 1, generator=g), torch.randn(3, generator=g)
    assert torch.equal(upsample_relu_conv1x1(x.contiguous(), w, b), rs._aten_up(x.contiguous(), w, b))  # NCHW
    with torch.no_grad():  # nothing to differentiate: aten's forward
        assert torch.equal(upsample_relu_conv1x1(x, w, b), rs._aten_up(x, w, b))
    w3 = torch.randn(3, 4, 3, 3, generator=g)  # not a 1x1 convolution: aten (which raises what it raises)
    assert torch.equal(upsample_relu_conv1x1(x, w3), rs._aten_up(x, w3, None))
    with pytest.raises(RuntimeError):  # dtypes that aten refuses are refused the same way
        upsample_relu_conv1x1(x, w.bfloat16(), None)


# ----------------------------------------------------------------------------- on UNeXt

def _unext(**kw):
    torch.manual_seed(0)
    return mixlab.create_model("unext_s", num_classes=1, **kw)


def test_swap_keeps_the_state_dict_and_restores(resample_kernel):
    model = _unext()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_fast_resample(model) == 8
    assert [type(model.ebn1), type(model.ebn2), type(model.ebn3), type(model.final)] == [PoolingBatchNorm2d] * 3 + [
        UpsamplingConv2d]
    assert all(type(getattr(model, f"dbn{i}")) is UpsamplingBatchNorm2d for i in (1, 2, 3, 4))
    assert type(model.block1.__getitem__(0).norm2) is nn.LayerNorm  # only what the model names
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert use_fast_resample(model) == 0  # already switched
    assert restore_resample(model) == 8 and type(model.ebn1) is nn.BatchNorm2d and type(model.final) is nn.Conv2d
    assert type(model.dbn4) is nn.BatchNorm2d
    assert use_fast_resample(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 1, 1))) == 0  # names nothing


def test_unext_trains_the_same_fused_and_unfused(resample_kernel, monkeypatch):
    calls = []
    for name in ("_pool_forward_op", "_up_add_forward_op", "_up_forward_op"):
        real = getattr(rs, name)
        monkeypatch.setattr(rs, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    x = _cl(torch.randn(2, 3, 64, 64))
    y = (torch.rand(2, 1, 64, 64) > 0.5).float()
    runs = []
    for fuse in (False, True):
        model = _unext()
        if fuse:
            use_fast_resample(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses = []
        for _ in range(3):
            loss = F.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            runs.append((losses, model(x), model.state_dict()))
    (l0, out0, sd0), (l1, out1, sd1) = runs
    # the fused run ran the kernels (all four decoder stages: in fp32 the first one's residual has the
    # map's dtype; under bf16 autocast it is a LayerNorm's fp32 output and that stage stays aten's)
    assert calls == (["_pool_forward_op"] * 3 + ["_up_add_forward_op"] * 4 + ["_up_forward_op"]) * 3
    assert l0 == pytest.approx(l1, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(out1, out0, rtol=1e-4, atol=1e-4)
    for k in sd0:
        torch.testing.assert_close(sd1[k], sd0[k], rtol=1e-4, atol=1e-5)


def test_hooks_on_a_fused_module_still_run(resample_kernel):
    model = _unext()
    use_fast_resample(model)
    seen = []
    model.ebn1.register_forward_hook(lambda m, i, o: seen.append(("ebn1", tuple(o.shape))))
    model.final.register_forward_hook(lambda m, i, o: seen.append(("final", tuple(i[0].shape))))
    model(_cl(torch.randn(2, 3, 32, 32))).sum().backward()
    assert seen == [("ebn1", (2, 8, 32, 32)), ("final", (2, 8, 32, 32))]  # as unfused: their own inputs and outputs


def test_eval_and_features_are_the_unfused_model(resample_kernel):
    ref, model = _unext(), _unext()
    use_fast_resample(model)
    x = _cl(torch.randn(2, 3, 32, 32))
    ref.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        assert torch.equal(model.forward_features(x), ref.forward_features(x))
    model.train(), ref.train()
    torch.testing.assert_close(model.forward_features(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)


def test_method_is_timed_once_per_shape_and_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXLAB_KERNEL_CACHE", str(tmp_path))
    rs.LIBRARY.reset()
    if not rs.fast_resample_available():
        pytest.skip(f"kernel not built here: {rs.LIBRARY.unavailable_reason()}")
    monkeypatch.setattr(rs.PLAN, "_choices", None)
    calls = []
    real = rs._time_methods
    monkeypatch.setattr(rs, "_time_methods",
                        lambda make_runs: calls.append(sorted(make_runs())) or {"kernel": 2.0, "aten": 1.0})
    x, w, b = _cl(torch.randn(2, 4, 6, 6)), torch.randn(4), torch.randn(4)
    for _ in range(3):
        y = batch_norm_max_pool_relu(x, None, None, w, b, True, 0.1, 1e-5)
    assert calls == [["aten", "kernel"]]  # timed on the first call only
    assert torch.equal(y, rs._aten_pool(x, None, None, w, b, True, 0.1, 1e-5))  # aten was timed faster
    plan = json.loads(rs.PLAN.path().read_text())
    assert list(plan.values()) == ["aten"] and list(plan)[0].startswith("bn_pool_relu|(2, 4, 6, 6)|float32")
    monkeypatch.setattr(rs.PLAN, "_choices", None)  # a new process reads the verdict instead of timing again
    batch_norm_max_pool_relu(x, None, None, w, b, True, 0.1, 1e-5)
    assert len(calls) == 1
    # a real timing returns both candidates' times, and leaves the caller's random stream alone
    monkeypatch.setattr(rs, "_time_methods", real)
    monkeypatch.setattr(rs.PLAN, "_choices", {})
    torch.manual_seed(3)
    upsample_relu_conv1x1(x.requires_grad_(), torch.randn(2, 4, 1, 1), None)
    after = torch.rand(4)
    torch.manual_seed(3)
    torch.randn(2, 4, 1, 1)
    assert torch.equal(torch.rand(4), after) and len(rs.PLAN._choices) == 1
    with pytest.raises(ValueError, match="'kernel', 'aten' or None"):
        rs.set_resample_method("fast")
    rs.LIBRARY.reset()


def test_compiled_fused_modules_run_aten_inside_the_graph(resample_kernel):
    bn, head = nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1)
    bn.__class__, head.__class__ = PoolingBatchNorm2d, UpsamplingConv2d

    def f(x):
        return head.forward_upsampled(bn.forward_pool_relu(x))

    x = _cl(torch.randn(2, 4, 8, 8))
    want = f(x)
    got = torch.compile(f, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- rounding points, threads, FX

def _fraction_and_steps(got, want):
    """Share of elements that differ, and the largest difference in bf16 steps of the value's size."""
    d = (got.float() - want.float()).abs()
    step = want.float().abs().clamp_min(2 ** -20) * 2 ** -7
    return (d > 0).float().mean().item(), (d / step).max().item()


def test_bf16_outputs_round_where_aten_rounds(resample_kernel):
    # bf16 results rounded where aten's stored intermediates are (the BatchNorm output, the
    # upsampled map): all but a few elements bit-equal to aten's, the rest one step apart
    g = torch.Generator().manual_seed(11)
    x = _cl(torch.randn(4, 16, 16, 16, generator=g) * 2 + 0.5).bfloat16()
    w, b = torch.rand(16, generator=g) + 0.5, torch.randn(16, generator=g)
    skip = _cl(torch.randn(4, 16, 32, 32, generator=g)).bfloat16()
    head_w, head_b = torch.randn(1, 16, 1, 1, generator=g).bfloat16(), torch.randn(1, generator=g).bfloat16()
    with torch.no_grad():
        pairs = [(rs._BatchNormPoolReluFn.apply(x, w, b, 1e-5)[0], rs._aten_pool(x, None, None, w, b, True, 0.0, 1e-5)),
                 (rs._BatchNormUpsampleReluAddFn.apply(x, skip, w, b, 1e-5)[0],
                  rs._aten_up_add(x, skip, None, None, w, b, True, 0.0, 1e-5)),
                 (rs._UpsampleReluConvFn.apply(x, head_w, head_b), rs._aten_up(x, head_w, head_b))]
    for i, (got, want) in enumerate(pairs):
        frac, steps = _fraction_and_steps(got, want)
        assert frac < 1e-3 and steps <= 2.01, (i, frac, steps)  # (a sum after a rounding: up to 2 of its steps)


@pytest.fixture
def three_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_kernels_split_over_threads_equal_the_reference(resample_kernel, three_threads):
    # per-thread channel sums, rows and backward bands split over 3 threads (the suite runs on one)
    g = torch.Generator().manual_seed(12)
    x = _cl(torch.randn(3, 16, 34, 20, generator=g) * 2 + 1)
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    dy = _cl(torch.randn(3, 16, 17, 10, generator=g))
    got = _grads(lambda x, w, b: batch_norm_max_pool_relu(x, None, None, w, b, True, 0.1, 1e-5), x, w, b, dy=dy)
    for k, r in zip(got, _pool_ref(x, w, b, dy)):
        assert _err(k, r) <= 2e-5 * max(1.0, r.abs().max().item())
    skip, dy2 = _cl(torch.randn(3, 16, 68, 40, generator=g)), _cl(torch.randn(3, 16, 68, 40, generator=g))
    got = _grads(lambda x, s, w, b: batch_norm_upsample_relu_add(x, s, None, None, w, b, True, 0.1, 1e-5),
                 x, skip, w, b, dy=dy2)
    for k, r in zip(got, _up_add_ref(x, skip, w, b, dy2)):
        assert _err(k, r) <= 2e-5 * max(1.0, r.abs().max().item())
    hw, hb, dy3 = torch.randn(2, 16, 1, 1, generator=g), torch.randn(2, generator=g), torch.randn(3, 2, 68, 40)
    got = _grads(upsample_relu_conv1x1, x, hw, hb, dy=_cl(dy3))
    for k, r in zip(got, _up_ref(x, hw, hb, dy3)):
        assert _err(k, r) <= 1e-5 * max(1.0, r.abs().max().item())


def test_bf16_register_paths_over_threads_and_bands(resample_kernel, three_threads):
    # bf16, 16 channels: the AVX-512 register forms (where the CPU has them), rows split over 3 threads and
    # the backward over three bands of 16 input rows (34 rows), each as close to fp64 as aten's
    g = torch.Generator().manual_seed(13)
    x = _cl(torch.randn(3, 16, 34, 20, generator=g) * 2 + 0.5).bfloat16()
    w, b = torch.rand(16, generator=g) + 0.5, torch.randn(16, generator=g)
    dy = _cl(torch.randn(3, 16, 17, 10, generator=g)).bfloat16()
    cases = [(lambda x, w, b: batch_norm_max_pool_relu(x, None, None, w, b, True, 0.1, 1e-5),
              lambda x, w, b: rs._aten_pool(x, None, None, w, b, True, 0.1, 1e-5), (x, w, b), dy,
              _pool_ref(x, w, b, dy))]
    skip, dy2 = _cl(torch.randn(3, 16, 68, 40, generator=g)).bfloat16(), _cl(torch.randn(3, 16, 68, 40, generator=g)).bfloat16()
    cases.append((lambda x, s, w, b: batch_norm_upsample_relu_add(x, s, None, None, w, b, True, 0.1, 1e-5),
                  lambda x, s, w, b: rs._aten_up_add(x, s, None, None, w, b, True, 0.1, 1e-5), (x, skip, w, b), dy2,
                  _up_add_ref(x, skip, w, b, dy2)))
    hw, hb = torch.randn(1, 16, 1, 1, generator=g).bfloat16(), torch.randn(1, generator=g).bfloat16()
    dy3 = _cl(torch.randn(3, 1, 68, 40, generator=g)).bfloat16()
    cases.append((rs._UpsampleReluConvFn.apply, rs._aten_up, (x, hw, hb), dy3, _up_ref(x, hw, hb, dy3)))
    for n, (fast, plain, args, d, want) in enumerate(cases):
        got, aten = _grads(fast, *args, dy=d), _grads(plain, *args, dy=d)
        for i, (k, a, r) in enumerate(zip(got, aten, want)):
            assert _err(k, r) <= 2 * _err(a, r) + 1e-2 * max(1.0, r.abs().max().item()), (n, i, _err(k, r), _err(a, r))


def test_fx_traces_a_switched_unext_through_aten(resample_kernel):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
    from test_contract import _fx  # timm's tracer settings, as the model contract test traces

    model = _unext()
    use_fast_resample(model)
    x = _cl(torch.randn(2, 3, 32, 32))
    traced = _fx(model.train())
    assert not any("resample" in str(n.target) for n in traced.graph.nodes)  # aten's operations in the graph
    want = copy.deepcopy(model)(x)  # (the fused kernels, batch statistics)
    torch.testing.assert_close(traced(x), want, rtol=1e-4, atol=1e-4)
