"""mixlab.ops.seg_loss: the BCE + Dice kernel against an fp64 reference and aten, where it steps
aside, and the per-shape choice."""
import json

import pytest
import torch

from mixlab.ops import seg_loss as sl
from mixlab.seg.losses import BCEDiceLoss, build_loss


def _inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 4
    t = (torch.rand(shape, generator=g) > 0.6).float()
    flat = x.view(-1)
    special = torch.tensor([100., -100., 30., -30., 17., -17., 0., 1e-8])
    flat[:min(8, flat.numel())] = special[:flat.numel()]
    return x, t


def _loss_and_grad(fn, x, t, *args):
    xs = x.clone().requires_grad_()
    loss = fn(xs, t, *args)
    loss.backward()
    return loss.detach(), xs.grad


# one image per chunk or several (4096 values a chunk), classes, a single value per image
@pytest.mark.parametrize("shape", [(3, 1, 17, 19), (2, 3, 40, 50), (5, 1), (1, 1, 64, 64)])
@pytest.mark.parametrize("weights", [(0.5, 1.0), (1.0, 0.0), (0.0, 1.0)])
@pytest.mark.parametrize("threads", [1, 3])
def test_kernel_against_fp64_and_aten(seg_loss_kernel, shape, weights, threads):
    x, t = _inputs(shape, sum(shape))
    if shape[0] > 1:
        t[0] = 0  # an image without foreground (the Dice's smoothing alone)
        t[-1] = 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _loss_and_grad(sl._BceDiceFn.apply, x, t, *weights, 1e-5)
        aten = _loss_and_grad(sl.bce_dice_reference, x, t, *weights, 1e-5)
    finally:
        torch.set_num_threads(before)
    ref = _loss_and_grad(sl.bce_dice_reference, x.double(), t.double(), *weights, 1e-5)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert abs(got[0].item() - ref[0].item()) <= max(abs(aten[0].item() - ref[0].item()), 2e-7 * abs(ref[0].item()))
    scale = ref[1].abs().max().item()
    err, err_aten = (got[1].double() - ref[1]).abs().max().item(), (aten[1].double() - ref[1]).abs().max().item()
    assert err <= max(2 * err_aten, 1e-6 * scale), (err, err_aten, scale)


def test_the_module_uses_it_and_fast_false_keeps_aten(seg_loss_kernel, monkeypatch):
    calls = []
    real = sl._BceDiceFn.apply
    monkeypatch.setattr(sl._BceDiceFn, "apply", lambda *a: calls.append(1) or real(*a))
    x, t = _inputs((2, 1, 8, 8), 0)
    fast, plain = build_loss("bce_dice"), BCEDiceLoss(fast=False)
    a, b = fast(x, t), plain(x, t)
    assert calls == [1]
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_steps_aside_where_it_does_not_apply(seg_loss_kernel, monkeypatch):
    calls = []
    real = sl._BceDiceFn.apply
    monkeypatch.setattr(sl._BceDiceFn, "apply", lambda *a: calls.append(1) or real(*a))
    x, t = _inputs((2, 1, 8, 8), 1)
    want = sl.bce_dice_reference(x.double(), t.double(), 0.5, 1.0, 1e-5)
    torch.testing.assert_close(sl.bce_dice(x.double(), t.double()), want)  # fp64: aten's
    tg = t.clone().requires_grad_()
    sl.bce_dice(x, tg).backward()  # a target that wants a gradient: aten's, which gives it one
    assert tg.grad is not None
    assert not sl.bce_dice_applies(x[0, 0, 0], t[0, 0, 0]) and not sl.bce_dice_applies(x, t[:1])
    assert calls == []


def test_choice_is_timed_once_per_shape_and_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXLAB_KERNEL_CACHE", str(tmp_path))
    sl.LIBRARY.reset()
    monkeypatch.setattr(sl.PLAN, "_choices", None)
    if not sl.fast_seg_loss_available():
        pytest.skip(f"kernel not built here: {sl.LIBRARY.unavailable_reason()}")
    timed = []
    monkeypatch.setattr(sl, "_time_methods", lambda make: timed.append(sorted(make())) or {"kernel": 1.0, "aten": 2.0})
    x, t = _inputs((2, 1, 8, 8), 2)
    for _ in range(3):
        sl.bce_dice(x.clone().requires_grad_(), t).backward()
    assert timed == [["aten", "kernel"]]
    plan = json.loads(sl.PLAN.path().read_text())
    assert plan == {f"bce_dice|(2, 1, 8, 8)|t{torch.get_num_threads()}": "kernel"}
    monkeypatch.setattr(sl.PLAN, "_choices", None)  # a new process reads the verdict
    sl.bce_dice(x, t)
    assert len(timed) == 1
    sl.LIBRARY.reset()


def test_nan_and_infinite_logits_as_aten(seg_loss_kernel):
    x, t = _inputs((2, 1, 8, 8), 3)
    x[0, 0, 1, 1] = float("nan")
    got = _loss_and_grad(sl._BceDiceFn.apply, x, t, 0.5, 1.0, 1e-5)
    assert got[0].isnan() and got[1][0, 0, 1, 1].isnan()  # a NaN logit: a NaN loss and a NaN gradient there
    x, t = _inputs((2, 1, 8, 8), 4)
    x[0, 0, 1, 1], t[0, 0, 1, 1] = float("inf"), 0.0
    got = _loss_and_grad(sl._BceDiceFn.apply, x, t, 0.5, 1.0, 1e-5)
    aten = _loss_and_grad(sl.bce_dice_reference, x, t, 0.5, 1.0, 1e-5)
    assert got[0].item() == aten[0].item() == float("inf")
