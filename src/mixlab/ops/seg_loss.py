"""mixlab's BCE + soft Dice loss kernel for the CPU (``seg_loss_kernels.cpp``).

``0.5 * BCE + (1 - mean per-image soft Dice)`` on logits, the loss of the UNeXt paper's code
(:class:`mixlab.seg.losses.BCEDiceLoss`). In aten it is BCE-with-logits (whose ``log1p`` alone
takes 2.7 ms for UNeXt's 8 x 256 x 256 logits on 2 EPYC cores, where ``exp`` takes 0.16) and the
Dice's sigmoid, products and sums, forward and backward: about 4 ms of a 77 ms UNeXt step at
batch 8. Here the forward is one pass (the per-image sums of BCE, p * t, p and t, in fp64) and
the backward one pass (``cb (p - t) + (k1 t - k2) p (1 - p)`` with per-image constants from the
forward's sums).

Scope: fp32 CPU logits and targets of the same shape (N, ...) with N images, not under
``torch.compile``; anything else runs aten's operations. The first call of each shape times the
kernel against aten (forward and backward) and keeps the faster, once per machine, as the other
kernels do. ``MIXLAB_FAST_LOSS_BUILD=0`` skips the kernel.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from .kernel_build import KernelLibrary, Plan, time_training_calls

__all__ = ["bce_dice", "bce_dice_reference", "bce_dice_applies", "soft_dice", "fast_seg_loss_available",
           "set_seg_loss_method"]

_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
LIBRARY = KernelLibrary(
    Path(__file__).with_name("seg_loss_kernels.cpp"), "mixlab_seg_loss", "BCE + Dice loss",
    ("mixlab_seg_loss_abi_version", 1),
    {"mixlab_bce_dice_fwd": (_I, [_P, _P, _L, _L, _P, _I]),
     "mixlab_bce_dice_bwd": (_I, [_P, _P, _L, _L, _F, _P, _P, _P, _I])},
    "MIXLAB_FAST_LOSS_BUILD", "the segmentation loss runs as aten's operations (correct, slower)")
PLAN = Plan("seg_loss_plan", identity=lambda: LIBRARY.source_text())


_time_methods = time_training_calls  # (a module global: tests replace it)


def fast_seg_loss_available() -> bool:
    """Whether the compiled kernel is loaded (building it on first call)."""
    return LIBRARY.load() is not None


def set_seg_loss_method(method: str | None) -> None:
    """Force 'kernel' or 'aten' for every call; None (default) times them per shape."""
    PLAN.force(method, "segmentation loss")


def soft_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Per-image soft Dice ``(N,)`` of ``sigmoid(logits)`` against ``target``."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)


def bce_dice_reference(logits: torch.Tensor, target: torch.Tensor, bce_weight: float, dice_weight: float,
                       smooth: float) -> torch.Tensor:
    """The loss by aten's operations (what the kernel computes)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return bce_weight * bce + dice_weight * (1 - soft_dice(logits, target, smooth).mean())


class _BceDiceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, bce_weight, dice_weight, smooth):
        x, t = x.contiguous(), t.contiguous()
        b, n = x.shape[0], x[0].numel()
        sums = torch.empty(b, 4, dtype=torch.float64)
        LIBRARY.check(LIBRARY.load().mixlab_bce_dice_fwd(x.data_ptr(), t.data_ptr(), b, n, sums.data_ptr(),
                                                         torch.get_num_threads()))
        num = 2 * sums[:, 1] + smooth
        den = sums[:, 2] + sums[:, 3] + smooth
        loss = bce_weight * sums[:, 0].sum() / (b * n) + dice_weight * (1 - (num / den).mean())
        ctx.save_for_backward(x, t)
        ctx.consts = (b, n, bce_weight, dice_weight, num, den)
        return loss.to(torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, t = ctx.saved_tensors
        b, n, bce_weight, dice_weight, num, den = ctx.consts
        g = float(grad)
        cd = -dice_weight * g / (b * den * den)  # d(1 - mean D)/dD_i times dD_i/dp, per image
        k1 = (cd * 2 * den).to(torch.float32)
        k2 = (cd * num).to(torch.float32)
        dx = torch.empty_like(x)
        LIBRARY.load().mixlab_bce_dice_bwd(x.data_ptr(), t.data_ptr(), b, n, bce_weight * g / (b * n), k1.data_ptr(),
                                           k2.data_ptr(), dx.data_ptr(), torch.get_num_threads())
        return dx, None, None, None, None


def bce_dice_applies(logits: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether :func:`bce_dice` can run the kernel on these tensors (else it runs aten's)."""
    return (logits.device.type == "cpu" and logits.dtype == target.dtype == torch.float32
            and logits.shape == target.shape and logits.dim() >= 2 and logits.numel() > 0
            and target.device.type == "cpu" and not torch.compiler.is_compiling() and not target.requires_grad
            and fast_seg_loss_available())


def _runs(logits: torch.Tensor, target: torch.Tensor, args: tuple) -> dict:
    xs = logits.detach().clone().requires_grad_()
    return {"kernel": lambda: _BceDiceFn.apply(xs, target, *args).backward(),
            "aten": lambda: bce_dice_reference(xs, target, *args).backward()}


def bce_dice(logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 0.5, dice_weight: float = 1.0,
             smooth: float = 1e-5, fast: bool = True) -> torch.Tensor:
    """``bce_weight * BCE-with-logits + dice_weight * (1 - mean per-image soft Dice)`` by the kernel
    where ``fast``, it applies and it was timed faster for this shape, else by aten's operations."""
    args = (float(bce_weight), float(dice_weight), float(smooth))
    if fast and bce_dice_applies(logits, target):
        key = f"bce_dice|{tuple(logits.shape)}|t{torch.get_num_threads()}"
        if PLAN.kernel_or_aten(key, lambda: _runs(logits, target, args), _time_methods) == "kernel":
            return _BceDiceFn.apply(logits, target, *args)
    return bce_dice_reference(logits, target, *args)
