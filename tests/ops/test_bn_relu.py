"""mixlab.ops.bn_relu: BatchNorm + ReLU against a written-out fp64 reference and aten, what stays
aten, the running statistics, the module swap, the per-shape choice, threads, FX and compile."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixlab
from mixlab.ops import bn_relu as br
from mixlab.ops.bn_relu import BatchNormReLU2d, batch_norm_relu, restore_bn_relu, use_fast_bn_relu


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _ref(x, w, b, dy, eps=1e-5):
    """relu(batch_norm(x)) with batch statistics, written out in fp64; y and dx, dw, db."""
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    mean = xd.mean((0, 2, 3), keepdim=True)
    var = ((xd - mean) ** 2).mean((0, 2, 3), keepdim=True)
    z = (xd - mean) / torch.sqrt(var + eps) * wd.view(1, -1, 1, 1) + bd.view(1, -1, 1, 1)
    y = torch.where(z > 0, z, torch.zeros_like(z))
    y.backward(dy.double())
    return y.detach(), xd.grad, wd.grad, bd.grad


def _grads(fn, x, w, b, dy):
    xs, ws, bs = x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()
    y = fn(xs, None, None, ws, bs, True, 0.1, 1e-5)
    y.backward(dy)
    return y.detach(), xs.grad, ws.grad, bs.grad


def _err(got, want):
    return (got.double() - want.double()).abs().max().item()


# narrow widths (summed as 32-wide rows), a width that is not a divisor of 32, wide ones, one pixel a map
@pytest.mark.parametrize("shape", [(2, 16, 8, 12), (3, 8, 5, 7), (2, 5, 6, 4), (1, 33, 5, 3), (2, 128, 6, 6),
                                   (4, 64, 1, 1)])
def test_kernel_equals_fp64_reference_fp32(bn_relu_kernel, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = _cl(torch.randn(shape, generator=g) * 3 + 1)
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    dy = _cl(torch.randn(shape, generator=g))
    got = _grads(batch_norm_relu, x, w, b, dy)
    assert got[0].is_contiguous(memory_format=torch.channels_last) and got[1].is_contiguous(memory_format=torch.channels_last)
    for i, (k, r) in enumerate(zip(got, _ref(x, w, b, dy))):
        assert _err(k, r) <= 2e-5 * max(1.0, r.abs().max().item()), (i, _err(k, r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masks_exact_zeros_as_aten_and_rounds_where_it_rounds(bn_relu_kernel, dtype):
    # small integers and each image's negative: every channel's mean is 0 and many outputs are
    # exactly 0 (ReLU passes no gradient there)
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-2, 3, (3, 16, 6, 6), generator=g).float()
    x = _cl(torch.cat([a, -a])).to(dtype)
    w, b = torch.rand(16, generator=g) + 0.5, torch.zeros(16)
    dy = _cl(torch.randn(6, 16, 6, 6, generator=g)).to(dtype)
    got, want = _grads(batch_norm_relu, x, w, b, dy), _grads(br._aten, x, w, b, dy)
    assert (want[0] == 0).float().mean() > 0.3
    if dtype == torch.bfloat16:
        assert torch.equal(got[0], want[0])
    else:
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    for k, a_ in zip(got[1:], want[1:]):
        torch.testing.assert_close(k.float(), a_.float(), rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-2)
    # random bf16 data: the outputs bit-equal to aten's but for a few one step apart
    x = _cl(torch.randn(4, 32, 9, 9, generator=g) * 2).bfloat16()
    with torch.no_grad():
        d = (batch_norm_relu(x, None, None, w.repeat(2), b.repeat(2), True, 0.1, 1e-5).float()
             - br._aten(x, None, None, w.repeat(2), b.repeat(2), True, 0.1, 1e-5).float()).abs()
    assert (d > 0).float().mean() < 1e-3


def test_updates_running_statistics_as_batchnorm_does(bn_relu_kernel):
    x = _cl(torch.randn(4, 16, 6, 6) * 2 + 3)
    for momentum in (0.1, None):
        ref, fused = nn.BatchNorm2d(16, momentum=momentum), nn.BatchNorm2d(16, momentum=momentum)
        fused.__class__ = BatchNormReLU2d
        for _ in range(3):
            want = F.relu(ref(x))
            got = fused(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.running_var, ref.running_var, rtol=1e-5, atol=1e-6)  # (aten sums in fp32)
        assert int(fused.num_batches_tracked) == int(ref.num_batches_tracked) == 3


def test_nan_and_inf_pass_as_through_aten(bn_relu_kernel):
    g = torch.Generator().manual_seed(6)
    x = _cl(torch.randn(2, 8, 4, 4, generator=g))
    x[0, 1, 0, 0] = float("nan")  # one channel's statistics NaN: the whole channel NaN, and its gradients
    x[1, 2, 1, 1] = float("inf")
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    dy = _cl(torch.randn(2, 8, 4, 4, generator=g))
    got, want = _grads(batch_norm_relu, x, w, b, dy), _grads(br._aten, x, w, b, dy)
    for k, a in zip(got, want):
        assert torch.equal(k.isnan(), a.isnan()) and torch.equal(k.isinf(), a.isinf())
        fin = k.isfinite() & a.isfinite()
        torch.testing.assert_close(k[fin], a[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_module_options_as_batchnorm_in_training_and_evaluation(bn_relu_kernel, affine, track):
    x = _cl(torch.randn(4, 8, 5, 5) * 2 + 1)
    ref = nn.BatchNorm2d(8, affine=affine, track_running_stats=track, momentum=None)
    fused = copy.deepcopy(ref)
    fused.__class__ = BatchNormReLU2d
    for mode in ("train", "eval"):
        getattr(ref, mode)(), getattr(fused, mode)()
        torch.testing.assert_close(fused(x), F.relu(ref(x)), rtol=1e-5, atol=1e-5)
    assert (fused.running_mean is None) == (not track)


def test_runs_aten_where_the_kernel_does_not_apply(bn_relu_kernel):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    for x, training in ((torch.randn(2, 8, 5, 6, generator=g), True),  # NCHW
                        (_cl(torch.randn(2, 8, 5, 6, generator=g)), False),  # evaluation
                        (_cl(torch.randn(2, 8, 5, 6, generator=g)).double(), True)):  # another dtype
        rm, rv = torch.zeros(8, dtype=x.dtype), torch.ones(8, dtype=x.dtype)
        got = batch_norm_relu(x, rm.clone(), rv.clone(), w.to(x.dtype), b.to(x.dtype), training, 0.1, 1e-5)
        want = br._aten(x, rm.clone(), rv.clone(), w.to(x.dtype), b.to(x.dtype), training, 0.1, 1e-5)
        assert torch.equal(got, want)


def test_three_threads_equal_the_reference(bn_relu_kernel):
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        g = torch.Generator().manual_seed(5)
        for shape in ((3, 16, 17, 11), (2, 40, 9, 7)):
            x = _cl(torch.randn(shape, generator=g) * 2 + 1)
            w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
            dy = _cl(torch.randn(shape, generator=g))
            for k, r in zip(_grads(batch_norm_relu, x, w, b, dy), _ref(x, w, b, dy)):
                assert _err(k, r) <= 2e-5 * max(1.0, r.abs().max().item())
    finally:
        torch.set_num_threads(before)


def _block():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 3)).to(memory_format=torch.channels_last)


def test_swap_keeps_the_state_dict_restores_and_leaves_what_it_must(bn_relu_kernel):
    model = _block()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_fast_bn_relu(model) == 2 and type(model[1]) is BatchNormReLU2d and type(model[2]) is br._ReLUFusedAway
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert restore_bn_relu(model) == 2
    assert type(model[1]) is nn.BatchNorm2d and type(model[2]) is nn.ReLU and model[2].inplace and not model[5].inplace
    # a hooked ReLU, a BatchNorm used twice, a Sequential with its own forward: left alone
    hooked = _block()
    hooked[2].register_forward_hook(lambda *a: None)
    shared_bn = nn.BatchNorm2d(3)

    class Own(nn.Sequential):
        def forward(self, x):
            return x

    shared = nn.Sequential(nn.Sequential(shared_bn, nn.ReLU()), shared_bn)
    assert use_fast_bn_relu(hooked) == 1 and type(hooked[1]) is nn.BatchNorm2d
    assert use_fast_bn_relu(shared) == 0
    assert use_fast_bn_relu(Own(nn.BatchNorm2d(3), nn.ReLU())) == 0
    assert use_fast_bn_relu(mixlab.create_model("convmlp_s")) == 9


def test_a_switched_model_trains_the_same(bn_relu_kernel, monkeypatch):
    calls = []
    real = br._forward_op
    monkeypatch.setattr(br, "_forward_op", lambda *a: calls.append(1) or real(*a))
    x, y = _cl(torch.randn(4, 3, 12, 12)), torch.tensor([0, 1, 2, 1])
    runs = []
    for fuse in (False, True):
        model = _block()
        if fuse:
            use_fast_bn_relu(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(3):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs.append((losses, copy.deepcopy(model.state_dict())))
    assert len(calls) == 6  # two pairs, three steps
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5, abs=1e-6)
    for k in runs[0][1]:
        torch.testing.assert_close(runs[1][1][k], runs[0][1][k], rtol=1e-4, atol=1e-5)


def test_method_is_timed_once_per_shape_and_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXLAB_KERNEL_CACHE", str(tmp_path))
    br.LIBRARY.reset()
    if not br.fast_bn_relu_available():
        pytest.skip(f"kernel not built here: {br.LIBRARY.unavailable_reason()}")
    monkeypatch.setattr(br.PLAN, "_choices", None)
    calls = []
    real = br._time_methods
    monkeypatch.setattr(br, "_time_methods",
                        lambda make_runs: calls.append(sorted(make_runs())) or {"kernel": 2.0, "aten": 1.0})
    x, w, b = _cl(torch.randn(2, 4, 5, 5)), torch.randn(4), torch.randn(4)
    for _ in range(3):
        y = batch_norm_relu(x, None, None, w, b, True, 0.1, 1e-5)
    assert calls == [["aten", "kernel"]] and torch.equal(y, br._aten(x, None, None, w, b, True, 0.1, 1e-5))
    plan = json.loads(br.PLAN.path().read_text())
    assert list(plan.values()) == ["aten"] and list(plan)[0].startswith("bn_relu|(2, 4, 5, 5)|float32")
    monkeypatch.setattr(br.PLAN, "_choices", None)
    batch_norm_relu(x, None, None, w, b, True, 0.1, 1e-5)
    assert len(calls) == 1
    monkeypatch.setattr(br, "_time_methods", real)  # a real timing: both times, the random stream untouched
    monkeypatch.setattr(br.PLAN, "_choices", {})
    torch.manual_seed(3)
    batch_norm_relu(x, None, None, w, b, True, 0.1, 1e-5)
    after = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(4), after) and len(br.PLAN._choices) == 1
    with pytest.raises(ValueError, match="'kernel', 'aten' or None"):
        br.set_bn_relu_method("fast")
    br.LIBRARY.reset()


def test_fx_and_compile_see_aten(bn_relu_kernel):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
    from test_contract import _fx

    model = _block()
    use_fast_bn_relu(model)
    x = _cl(torch.randn(2, 3, 8, 8))
    traced = _fx(model.train())  # a leaf for timm's tracer
    torch.testing.assert_close(traced(x), copy.deepcopy(model)(x), rtol=1e-5, atol=1e-5)
    want = copy.deepcopy(model)(x)
    got = torch.compile(model, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
