"""ConvMixer's residual block fused into one autograd node (mixlab.ops.residual) equals the
unfused ``fn(x) + x``: forward, every gradient, BatchNorm's running statistics; and it steps aside
(exactly the unfused computation) wherever it does not apply."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from timm.models.convmixer import Residual

from mixlab.ops import depthwise as dw
from mixlab.ops import gelu as gb
from mixlab.ops import residual as residual_mod
from mixlab.ops.depthwise import use_fast_depthwise
from mixlab.ops.gelu import restore_gelu, use_fast_gelu
from mixlab.ops.residual import FusedResidual, fuse_residual_blocks, unfuse_residual_blocks


def _block(c=37, k=5, bias=True, momentum=0.1, seed=0):
    torch.manual_seed(seed)
    block = Residual(nn.Sequential(nn.Conv2d(c, c, k, groups=c, padding="same", bias=bias), nn.GELU(),
                                   nn.BatchNorm2d(c, momentum=momentum)))
    with torch.no_grad():  # not the initial affine parameters: their gradients must carry information
        block.fn[2].weight.uniform_(0.5, 1.5)
        block.fn[2].bias.uniform_(-0.5, 0.5)
    return block


def _fused(block, fast_depthwise=True):
    f = copy.deepcopy(block)
    if fast_depthwise:
        use_fast_depthwise(f)
    pairs, _ = use_fast_gelu(f)
    assert pairs == 1 and type(f) is FusedResidual
    return f


def _run(block, x, upstream):
    # bf16 as training runs it: fp32 parameters under autocast
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=x.dtype == torch.bfloat16):
        y = block(x)
    y.backward(upstream.to(y.dtype))
    grads = [x.grad] + [p.grad for p in block.parameters()]
    return y.detach(), grads, [b.clone() for b in block.buffers()]


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, bias, momentum", [(5, True, 0.1), (3, False, None), (11, True, 0.01)])
@pytest.mark.parametrize("input_grad", ["kernel", "aten"])
def test_fused_block_equals_the_unfused_one(gelu_kernel, dtype, k, bias, momentum, input_grad, monkeypatch):
    # input_grad: the depthwise input gradient (to which the residual's gradient is added) by the
    # C++ forward with the flipped kernel, the sum inside it, or by aten, the sum after
    monkeypatch.setattr(dw.PLAN, "_choices", {})  # nothing recorded by another test decides the method
    want = "flipped_kernel" if input_grad == "kernel" else "aten"
    monkeypatch.setattr(dw, "_choose", lambda key, cands, run, *margin: want if want in cands else cands[0])
    lib = dw.load_kernel()
    if input_grad == "kernel" and (lib is None or lib.mixlab_dw_fwd_max_kw() == 0):
        pytest.skip("the depthwise forward kernel is not built on this CPU")
    adds = []
    real_kernel_forward = dw._kernel_forward
    monkeypatch.setattr(dw, "_kernel_forward",
                        lambda *a, add=None, **kw: adds.append(add is not None) or real_kernel_forward(*a, add=add, **kw))
    plain = _block(37, k, bias, momentum)
    fused = _fused(plain)
    calls = []
    real_apply = residual_mod._ResidualDepthwiseGeluBnFn.apply
    monkeypatch.setattr(residual_mod._ResidualDepthwiseGeluBnFn, "apply",
                        lambda *a: calls.append(1) or real_apply(*a))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 37, 9, 11, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    up = torch.randn(4, 37, 9, 11, generator=g).contiguous(memory_format=torch.channels_last)
    got_y, got_g, got_b = _run(fused, x, up)
    ref_y, ref_g, ref_b = _run(copy.deepcopy(plain).double(), x.double(), up.double())
    assert calls == [1]  # it ran fused
    assert (True in adds) == (input_grad == "kernel")  # the residual's gradient summed inside the kernel
    assert got_y.dtype == dtype and got_y.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        assert _rel(got_y, ref_y) < 1e-5
        assert all(_rel(a, b) < 2e-5 for a, b in zip(got_g, ref_g)), [_rel(a, b) for a, b in zip(got_g, ref_g)]
    else:  # bf16: no worse than twice the unfused bf16 block (aten's ops) against the same fp64 reference
        un_y, un_g, _ = _run(copy.deepcopy(plain), x, up)
        assert _rel(got_y, ref_y) <= max(2 * _rel(un_y, ref_y), 1e-5)
        for a, u, r in zip(got_g, un_g, ref_g):
            assert _rel(a, r) <= max(2 * _rel(u, r), 1e-4), (_rel(a, r), _rel(u, r))
    # running statistics and the batch count, as nn.BatchNorm2d keeps them
    for a, b in zip(got_b, ref_b):
        assert _rel(a.double(), b) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert int(fused.fn[2].num_batches_tracked) == 1


def test_fused_under_autocast_trains_like_the_unfused_model(gelu_kernel):
    import mixlab

    torch.manual_seed(0)
    plain = mixlab.create_model("convmixer_256_8", num_classes=10).to(memory_format=torch.channels_last)
    fused = copy.deepcopy(plain)
    use_fast_depthwise(fused)
    use_fast_gelu(fused)
    assert sum(type(m) is FusedResidual for m in fused.modules()) == 8
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    losses = {}
    for name, m in (("plain", plain), ("fused", fused)):
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        losses[name] = []
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(m(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    # bf16: the two round differently; a broken gradient would move the loss far more than this
    assert max(abs(a - b) for a, b in zip(losses["plain"], losses["fused"])) < 0.05, losses


def test_swap_keeps_state_and_restores():
    import mixlab

    model = mixlab.create_model("convmixer_256_8")
    before = copy.deepcopy(model.state_dict())
    use_fast_depthwise(model)
    use_fast_gelu(model)
    assert sum(type(m) is FusedResidual for m in model.modules()) == 8
    assert all(isinstance(m, Residual) for m in model.modules() if type(m) is FusedResidual)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    restore_gelu(model)
    assert not any(type(m) is FusedResidual for m in model.modules())
    assert sum(type(m) is Residual for m in model.modules()) == 8
    # and by hand
    assert fuse_residual_blocks(model) == 0  # the GELUs are back: nothing to fuse
    use_fast_gelu(model)
    assert unfuse_residual_blocks(model) == 8


def test_blocks_that_do_not_match_are_left_alone():
    hooked = _block()
    hooked.fn[0].register_forward_hook(lambda *a: None)  # someone watches the conv's output
    strided = Residual(nn.Sequential(nn.Conv2d(8, 8, 3, groups=8, stride=2), nn.GELU(), nn.BatchNorm2d(8)))
    dense = Residual(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GELU(), nn.BatchNorm2d(8)))
    longer = Residual(nn.Sequential(nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.GELU(), nn.BatchNorm2d(8), nn.ReLU()))
    # padding that changes the size: the unfused sum raises (as it should), so it is not fused
    resized = Residual(nn.Sequential(nn.Conv2d(8, 8, 3, groups=8, padding=2), nn.GELU(), nn.BatchNorm2d(8)))
    for m in (hooked, strided, dense, longer, resized):
        use_fast_gelu(m)
        assert type(m) is Residual
    with pytest.raises(RuntimeError):
        resized.train()(torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last))


def test_the_residual_must_have_the_pairs_shape(gelu_kernel):
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="residual must have"):
        gb._forward_op(x, torch.ones(8), torch.zeros(8), 1e-5, torch.randn(2, 8, 6, 6))


def test_double_backward_is_refused(gelu_kernel):
    fused = _fused(_block())
    x = torch.randn(2, 37, 6, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    (gx,) = torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


@pytest.mark.parametrize("case", ["eval", "nchw", "no_grad", "fp32_input_under_bf16_autocast", "aten_conv",
                                  "backward_hook_on_bn", "hook_on_the_branch", "global_hook"])
def test_steps_aside_where_it_does_not_apply(gelu_kernel, case, monkeypatch):
    plain = _block()
    fused = _fused(plain, fast_depthwise=case != "aten_conv")
    if case == "backward_hook_on_bn":
        fused.fn[2].register_full_backward_hook(lambda *a: None)
    if case == "hook_on_the_branch":
        fused.fn.register_forward_hook(lambda *a: None)
    if case == "global_hook":
        handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    unfused = copy.deepcopy(fused)
    unfuse_residual_blocks(unfused)  # the same modules (fast ops), only the fusion undone
    x = torch.randn(2, 37, 6, 7).contiguous(memory_format=torch.channels_last)
    if case == "eval":
        fused.eval(), unfused.eval()
    if case == "nchw":
        x = x.contiguous()
    calls = []
    monkeypatch.setattr(residual_mod._ResidualDepthwiseGeluBnFn, "apply", lambda *a: calls.append(1))
    ctx = torch.no_grad() if case == "no_grad" else torch.enable_grad()
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "fp32_input_under_bf16_autocast")
    try:
        with ctx, ac:
            a, b = fused(x), unfused(x)
    finally:
        if case == "global_hook":
            handle.remove()
    assert calls == [] and a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(fused.fn[2].running_mean, unfused.fn[2].running_mean)
