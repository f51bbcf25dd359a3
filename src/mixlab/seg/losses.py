"""Segmentation losses on logits ``(N, K, H, W)`` and 0/1 targets of the same shape.

``bce_dice`` is the loss of the paper's code (UNeXt-pytorch ``losses.BCEDiceLoss``, inherited
from pytorch-nested-unet): ``0.5 * BCE + (1 - Dice)``, the BCE averaged over every pixel and the
soft Dice computed per image over all its classes and pixels,
``(2 * sum(p * t) + 1e-5) / (sum(p) + sum(t) + 1e-5)`` with ``p = sigmoid(logits)``, then
averaged over the batch. Every loss computes in float32 (also under bf16 autocast). On the CPU
``bce_dice`` runs as mixlab's kernel (:mod:`mixlab.ops.seg_loss`: one pass forward, one backward)
where it was timed faster than aten's operations; ``BCEDiceLoss(fast=False)`` keeps aten's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..ops.seg_loss import bce_dice, soft_dice

__all__ = ["soft_dice", "BCEDiceLoss", "DiceLoss", "BCELoss", "FocalLoss", "LOSSES", "build_loss"]


def _check(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape")
    return logits.float(), target.float()


class BCEDiceLoss(nn.Module):
    """``bce_weight * BCE + dice_weight * (1 - mean per-image soft Dice)``; 0.5 and 1 as the paper's code.
    ``fast``: mixlab's CPU kernel where it applies (:mod:`mixlab.ops.seg_loss`); False: aten's operations."""

    def __init__(self, bce_weight: float = 0.5, dice_weight: float = 1.0, smooth: float = 1e-5, fast: bool = True):
        super().__init__()
        self.bce_weight, self.dice_weight, self.smooth, self.fast = bce_weight, dice_weight, smooth, fast

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = _check(logits, target)
        return bce_dice(logits, target, self.bce_weight, self.dice_weight, self.smooth, fast=self.fast)


class DiceLoss(nn.Module):
    """``1 - mean per-image soft Dice``."""

    def __init__(self, smooth: float = 1e-5):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = _check(logits, target)
        return 1 - soft_dice(logits, target, self.smooth).mean()


class BCELoss(nn.Module):
    """Binary cross-entropy on logits, averaged over every pixel (``BCEWithLogitsLoss``)."""

    def __init__(self, pos_weight: float | None = None):
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = _check(logits, target)
        pw = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)


class FocalLoss(nn.Module):
    """Binary focal loss (Lin et al. 2017): ``-alpha_t (1 - p_t)^gamma log p_t``, averaged over pixels.

    ``alpha`` weighs the foreground (``1 - alpha`` the background); None weighs both 1.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.25):
        super().__init__()
        if gamma < 0:
            raise UsageError(f"gamma must be >= 0, got {gamma}")
        self.gamma, self.alpha = gamma, alpha

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = _check(logits, target)
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # = -log p_t
        p_t = torch.exp(-ce)
        loss = (1 - p_t).pow(self.gamma) * ce
        if self.alpha is not None:
            loss = (self.alpha * target + (1 - self.alpha) * (1 - target)) * loss
        return loss.mean()


LOSSES = {"bce_dice": BCEDiceLoss, "dice": DiceLoss, "bce": BCELoss, "focal": FocalLoss}
_ALIASES = {"bcediceloss": "bce_dice", "bce+dice": "bce_dice", "diceloss": "dice", "bcewithlogitsloss": "bce",
            "focalloss": "focal"}


def build_loss(name: str = "bce_dice", **kwargs) -> nn.Module:
    """A loss by name: ``bce_dice`` (the paper's), ``dice``, ``bce``, ``focal``."""
    key = name.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in LOSSES:
        raise UsageError(f"unknown segmentation loss {name!r}; choose from {', '.join(LOSSES)}")
    return LOSSES[key](**kwargs)
