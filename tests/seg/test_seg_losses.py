"""Segmentation losses against hand-computed values and the official BCEDiceLoss formula."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixlab.seg.losses import BCEDiceLoss, BCELoss, DiceLoss, FocalLoss, build_loss

S = 1e-5


def _official_bce_dice(inp, target):
    """pytorch-nested-unet / UNeXt-pytorch BCEDiceLoss, as written there."""
    bce = F.binary_cross_entropy_with_logits(inp, target)
    p = torch.sigmoid(inp)
    num = target.size(0)
    p, t = p.view(num, -1), target.view(num, -1)
    dice = (2.0 * (p * t).sum(1) + S) / (p.sum(1) + t.sum(1) + S)
    return 0.5 * bce + (1 - dice.sum() / num)


def test_bce_dice_by_hand():
    logits = torch.zeros(1, 1, 4, 4)  # p = 0.5 everywhere
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, :2, :2] = 1  # 4 of 16 pixels
    dice = (2 * 0.5 * 4 + S) / (0.5 * 16 + 4 + S)
    expected = 0.5 * math.log(2) + (1 - dice)
    assert BCEDiceLoss()(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert DiceLoss()(logits, target).item() == pytest.approx(1 - dice, rel=1e-6)
    assert BCELoss()(logits, target).item() == pytest.approx(math.log(2), rel=1e-6)


def test_bce_dice_equals_official_and_averages_dice_per_image():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 8, 8, generator=g) * 3
    target = (torch.rand(3, 2, 8, 8, generator=g) > 0.7).float()
    target[2] = 0  # an empty mask: its Dice must not be pooled with the others
    ours = BCEDiceLoss()(logits, target)
    torch.testing.assert_close(ours, _official_bce_dice(logits, target), rtol=1e-6, atol=1e-6)
    pooled = 1 - (2 * (torch.sigmoid(logits) * target).sum() + S) / (torch.sigmoid(logits).sum() + target.sum() + S)
    assert abs(DiceLoss()(logits, target).item() - pooled.item()) > 1e-3


def test_perfect_prediction_has_near_zero_loss_and_gradients_flow():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    logits = (target * 2 - 1) * 30
    assert BCEDiceLoss()(logits, target).item() < 1e-6
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    for name in ("bce_dice", "dice", "bce", "focal"):
        loss = build_loss(name)(x.to(torch.bfloat16), target)  # bf16 logits are computed in fp32
        assert loss.dtype == torch.float32
        grad, = torch.autograd.grad(loss, x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_focal_reduces_to_bce_and_down_weights_easy_pixels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 5, 5, generator=g)
    target = (torch.rand(2, 1, 5, 5, generator=g) > 0.5).float()
    torch.testing.assert_close(FocalLoss(gamma=0, alpha=None)(logits, target), BCELoss()(logits, target))
    # one pixel: p_t = sigmoid(2) for a positive at logit 2
    p = torch.sigmoid(torch.tensor(2.0))
    expected = 0.25 * (1 - p) ** 2 * -torch.log(p)
    got = FocalLoss(gamma=2, alpha=0.25)(torch.full((1, 1, 1, 1), 2.0), torch.ones(1, 1, 1, 1))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_build_loss_names_and_errors():
    assert isinstance(build_loss("BCEDiceLoss"), BCEDiceLoss)
    assert isinstance(build_loss("bce-dice"), BCEDiceLoss)
    assert isinstance(build_loss("dice"), DiceLoss)
    with pytest.raises(ValueError, match="unknown segmentation loss 'lovasz'"):
        build_loss("lovasz")
    with pytest.raises(ValueError, match="same shape"):
        BCEDiceLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
