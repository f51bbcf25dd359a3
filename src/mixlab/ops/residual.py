"""ConvMixer's residual block, ``x + BatchNorm(GELU(depthwise_conv(x)))``, as one autograd node
on the CPU.

Unfused, the block's residual add is a full pass over the activation in the forward, and in the
backward autograd sums the two gradients of x (the residual's and the depthwise convolution's
input gradient) in another: about 1.1 ms each for ConvMixer-256/8's 128x256x16x16 bf16 activation
on 2 EPYC cores, 16 passes a training step. Fused, the add happens in the GELU + BatchNorm
kernel's normalisation pass (``mixlab.ops.gelu``), and the residual's gradient is summed into
the input gradient inside the depthwise forward kernel that computes it (``mixlab.ops.depthwise``,
where that kernel is the method the op timed fastest for the shape; else it is added after).

:func:`fuse_residual_blocks` (called by :func:`mixlab.ops.gelu.use_fast_gelu`) switches every
timm ``Residual`` whose branch is exactly (depthwise ``nn.Conv2d``, GELU fused away,
:class:`~mixlab.ops.gelu.GeluBatchNorm2d`) to :class:`FusedResidual`: same parameters, buffers
and state_dict keys. It runs fused only in training, on channels-last fp32/bf16 CPU tensors whose
dtype is the computation's, where the conv is mixlab's (:func:`~mixlab.ops.depthwise.use_fast_depthwise`)
and the pair would run its kernel, with no hooks on the block or its modules; otherwise exactly
the unfused ``fn(x) + x``. (Its own hooks run either way: they wrap this forward.)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from timm.models.convmixer import Residual

from . import depthwise as dw
from . import gelu as gl
from .module_swap import by_exact_type, global_hooks, hooked, swap_classes

__all__ = ["FusedResidual", "fuse_residual_blocks", "unfuse_residual_blocks"]


class _ResidualDepthwiseGeluBnFn(torch.autograd.Function):
    """y = x + batch_norm(gelu(conv(x))), batch statistics; returns y and the statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, eps, padding, dilation):
        with torch.autocast(x.device.type, enabled=False):
            wc = weight.to(x.dtype)
            bc = bias.to(x.dtype) if bias is not None else None
            z = dw._forward(x, wc, bc, padding, dilation)
            y, g, mean, var = gl._forward_op(z, gamma, beta, eps, x)
        ctx.save_for_backward(x, wc, z, g, gamma, mean, var)
        ctx.conf = (eps, padding, dilation, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, wc, z, g, gamma, mean, var = ctx.saved_tensors
        eps, padding, dilation, w_dtype, b_dtype = ctx.conf
        dy = grad_y.to(x.dtype).contiguous(memory_format=torch.channels_last)
        dz, dgamma, dbeta = gl._backward_op(z, g, dy, gamma, mean, var, eps)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # the convolution's input gradient plus the residual's, dy
            gx = dw._input_grad(dz, x, wc, padding, dilation, add=dy)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            with_bias = bool(ctx.needs_input_grad[2])
            gw, gb = dw._weight_grad_op(x, dz, wc.shape[2], wc.shape[3], *padding, *dilation, with_bias)
            gw = gw.to(w_dtype) if ctx.needs_input_grad[1] else None
            gb = gb.to(b_dtype) if with_bias else None
        return (gx, gw, gb, dgamma.to(gamma.dtype) if ctx.needs_input_grad[3] else None,
                dbeta.to(gamma.dtype) if ctx.needs_input_grad[4] else None, None, None, None)


def _branch(m: nn.Module):
    """(conv, bn) when ``m``'s branch is (a depthwise conv whose output has its input's size,
    fused-away GELU, GeluBatchNorm2d) and nothing watches its modules, else None."""
    fn = getattr(m, "fn", None)
    if type(fn) is not nn.Sequential or len(fn) != 3:
        return None
    conv, act, bn = fn[0], fn[1], fn[2]
    if (type(act) is not gl._FusedAway or type(bn) is not gl.GeluBatchNorm2d or not isinstance(conv, nn.Conv2d)
            or dw.ineligible_reason(conv) is not None or hooked(fn, conv, act, bn)):
        return None
    (kh, kw), (dh, dw_) = conv.kernel_size, conv.dilation
    if kh % 2 == 0 or kw % 2 == 0 or dw._resolve_padding(conv.padding, conv.kernel_size, conv.dilation) != (
            dh * (kh - 1) // 2, dw_ * (kw - 1) // 2):
        return None  # the output would not have the input's size: the unfused sum raises, as it should
    return conv, bn


class FusedResidual(Residual):
    """timm's ``Residual`` around (depthwise conv, GELU, BatchNorm), computed as one node where it
    can be (see the module's text); ``isinstance(m, Residual)`` holds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = _branch(self)
        if parts is None or not self._fusable(x, *parts):
            return self.fn(x) + x
        conv, bn = parts
        pad = dw._resolve_padding(conv.padding, conv.kernel_size, conv.dilation)
        c = x.shape[1]
        gamma = bn.weight if bn.weight is not None else x.new_ones(c, dtype=torch.float32)
        beta = bn.bias if bn.bias is not None else x.new_zeros(c, dtype=torch.float32)
        if gl._method("gelu_bn", x, lambda: gl._pair_runs(x, gamma, beta, bn.eps)) != "kernel":
            return self.fn(x) + x
        running_mean, running_var, _, momentum = bn.norm_args()
        y, mean, var = _ResidualDepthwiseGeluBnFn.apply(x, conv.weight, conv.bias, gamma, beta, bn.eps, pad,
                                                       conv.dilation)
        gl.update_running_stats(running_mean, running_var, mean, var, x.numel() // c, momentum)
        return y

    def _fusable(self, x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
        # only where the conv was switched to mixlab's (use_fast_depthwise): its kernels compute the
        # fused block's convolution, so a model that kept aten's convolution keeps it here too
        autocast = dw._autocast_dtype(x.device.type)
        compute = autocast or x.dtype
        same_dtype = autocast is not None or (conv.weight.dtype == x.dtype
                                              and (conv.bias is None or conv.bias.dtype == x.dtype))
        return (type(conv) is dw.DepthwiseConv2d and self.training and bn.training and torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and not global_hooks()
                and x.device.type == "cpu" and x.dtype == compute and compute in (torch.float32, torch.bfloat16)
                and same_dtype and x.dim() == 4 and x.shape[1] == conv.in_channels and gl._fusable(x))


def fuse_residual_blocks(model: nn.Module) -> int:
    """Switch every timm ``Residual`` of ``model`` whose branch is (depthwise conv, fused-away GELU,
    GeluBatchNorm2d) to :class:`FusedResidual`, in place; returns how many."""
    return swap_classes(model, lambda m: FusedResidual if type(m) is Residual and _branch(m) is not None else None)


def unfuse_residual_blocks(model: nn.Module) -> int:
    """Undo :func:`fuse_residual_blocks`; returns how many."""
    return swap_classes(model, by_exact_type({FusedResidual: Residual}))
