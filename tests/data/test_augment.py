"""Batched crop/flip equals a per-image reference; affine warps keep shapes and the identity."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mixlab.data.augment import AugmentConfig, BatchAugment, random_affine, random_crop_flip


def test_crop_flip_equals_per_image_reference():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    g = torch.Generator().manual_seed(5)
    out = random_crop_flip(x, padding=2, hflip=0.5, generator=g)
    # replay the same random draws, then crop and flip each image naively
    g = torch.Generator().manual_seed(5)
    dy = (torch.rand(16, generator=g) * 5).long().clamp(max=4)
    dx = (torch.rand(16, generator=g) * 5).long().clamp(max=4)
    flip = torch.rand(16, generator=g) < 0.5
    xp = F.pad(x, (2, 2, 2, 2))
    for i in range(16):
        ref = xp[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)
    assert flip.any() and not flip.all() and (dx != 2).any()


def test_no_padding_no_flip_is_identity():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(random_crop_flip(x, padding=0, hflip=0.0), x)


def test_affine_identity_when_scale_full_and_no_rotation():
    x = torch.rand(3, 3, 16, 16)
    out = random_affine(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), rotate=0.0)
    assert torch.allclose(out, x, atol=1e-5)


def test_batch_augment_normalises_and_mixes():
    cfg = AugmentConfig(crop_padding=4, hflip=0.5, mixup_alpha=0.2, rrc_scale=(0.6, 1.0), rotate=20,
                        random_erasing=0.25, color_jitter=0.4, randaugment_n=2, randaugment_m=12)
    aug = BatchAugment(cfg, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), num_classes=10, label_smoothing=0.1)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    y = torch.randint(0, 10, (8,))
    xa, ya = aug(x, y)
    assert xa.shape == (8, 3, 16, 16) and xa.dtype == torch.float32
    assert ya.shape == (8, 10) and torch.allclose(ya.sum(1), torch.ones(8))  # soft targets
    xe, ye = aug(x, y, train=False)
    assert torch.equal(ye, y)
    assert torch.allclose(xe, (x.float() / 255 - 0.5) / 0.25, atol=1e-5)


def test_zero_erasing_is_torchvisions_black_rectangle_before_the_flip():
    from torchvision.transforms import v2

    cfg = AugmentConfig(crop_padding=0, hflip=1.0, random_erasing=1.0, erasing_mode="zero")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    aug = BatchAugment(cfg, mean, std, num_classes=10, seed=3)
    x = torch.randint(1, 256, (6, 3, 12, 12), dtype=torch.uint8)  # no black pixel of its own
    y = torch.arange(6)
    torch.manual_seed(7)
    out, y_out = aug(x, y)
    # the seed's order, image by image: Paddle's RandomErasing() (= torchvision's: p 0.5 by
    # default, here 1, scale 0.02-0.33, ratio 0.3-3.3, fill 0) on the raw image, then the flip
    torch.manual_seed(7)
    erase = v2.RandomErasing(p=1.0, value=0)
    ref = torch.stack([erase(img.float()) for img in x]).flip(-1)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (ref / 255 - m) / s, rtol=0, atol=1e-5)
    assert torch.equal(y_out, y)
    black = ((out * s + m).abs() < 1e-6).all(1)  # (N, H, W): erased pixels
    assert black.any()
    for mask in black:  # each erased region is one rectangle of about a third of the image at most
        if mask.any():  # (0.33 of the area, its sides rounded to whole pixels)
            rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert int(mask.sum()) == int(box) < 0.45 * 144


def test_zero_erasing_with_the_seeds_crop_and_rotation_and_bad_mode():
    cfg = AugmentConfig(crop_padding=0, hflip=0.5, rrc_scale=(0.6, 1.0), rotate=20, color_jitter=0.2,
                        random_erasing=0.5, erasing_mode="zero")
    aug = BatchAugment(cfg, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), num_classes=10)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    xa, _ = aug(x, torch.zeros(8, dtype=torch.long))
    assert xa.shape == (8, 3, 16, 16) and torch.isfinite(xa).all()
    import pytest

    with pytest.raises(ValueError, match="erasing_mode"):
        AugmentConfig.from_dict({"erasing_mode": "black"})
