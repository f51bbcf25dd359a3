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
