"""Augmentation of whole batches on the training device.

The data set lives on the device as one uint8 tensor; each batch is cropped, flipped and
(optionally) warped there in a few batched kernels, so two CPU cores never starve a GPU
and the CPU path runs no per-image Python.

What comes from where, and why:
- random crop with padding, horizontal flip: written here, vectorised over the batch
  (one gather), because torchvision's per-image transforms cost a Python call per image.
- random resized crop and rotation: one batched ``affine_grid``/``grid_sample`` with a
  per-image matrix (torchvision's v2 transforms draw one set of parameters per call, i.e.
  the same crop for a whole batch, which is a different augmentation).
- RandAugment and colour jitter: torchvision's v2 implementations, applied image by image
  on the device (their per-image op choice is the point of RandAugment; torchvision's
  magnitude scale, 31 bins, is the one the public ConvMixer CIFAR recipe used, timm's is not).
- MixUp/CutMix: timm's ``Mixup``; random erasing: timm's ``RandomErasing``; both already work
  on device batches. ``erasing_mode: zero`` is torchvision's ``RandomErasing(value=0)`` instead
  (image by image), which is Paddle's default ``RandomErasing`` too (same probability 0.5,
  scale (0.02, 0.33), ratio (0.3, 3.3), fill 0): a black rectangle on the raw image, placed
  where the Conv2Former seed's Paddle pipeline has it, after the random resized crop and
  before the flip and the rotation (the crop and the rotation are then two resamplings, as
  there, instead of one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UsageError


@dataclass
class AugmentConfig:
    crop_padding: int = 4  # random crop after padding by this much (0 = no crop)
    crop_pad_mode: str = "constant"  # constant (zeros) | reflect
    hflip: float = 0.5
    vflip: float = 0.0
    rrc_scale: tuple[float, float] | None = None  # random resized crop area range, e.g. (0.6, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotate: float = 0.0  # max degrees, uniform in [-rotate, rotate]
    randaugment_n: int = 0
    randaugment_m: int = 9
    color_jitter: float = 0.0  # brightness/contrast/saturation strength
    random_erasing: float = 0.0  # probability
    # noise: timm's, per-pixel N(0, 1) on the normalised batch, after every other step;
    # zero: torchvision's/Paddle's, 0 (black) on the raw image, after the random resized crop, before flip/rotation
    erasing_mode: str = "noise"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0

    @classmethod
    def from_dict(cls, d: dict | None) -> "AugmentConfig":
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise UsageError(f"unknown augmentation key(s): {', '.join(unknown)}; "
                             f"known: {', '.join(cls.__dataclass_fields__)}")
        for k in ("rrc_scale", "rrc_ratio"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        if d.get("erasing_mode", "noise") not in ("noise", "zero"):
            raise UsageError(f"augment.erasing_mode must be 'noise' (timm's: N(0, 1) noise after normalising) or "
                             f"'zero' (torchvision's/Paddle's: black, before flip and rotation), "
                             f"got {d['erasing_mode']!r}")
        return cls(**d)


def random_crop_flip(x: torch.Tensor, padding: int, hflip: float, generator: torch.Generator | None = None,
                     pad_mode: str = "constant", vflip: float = 0.0) -> torch.Tensor:
    """Random crop (after padding) and flips of a uint8 or float batch (N, C, H, W), in one gather."""
    n, c, h, w = x.shape
    dev = x.device
    rand = lambda *s: torch.rand(*s, generator=generator, device="cpu").to(dev)  # noqa: E731
    if padding > 0:
        xp = F.pad(x if pad_mode == "constant" else x.float(), (padding,) * 4, mode=pad_mode)
        xp = xp.to(x.dtype)
        dy = (rand(n) * (2 * padding + 1)).long().clamp_(max=2 * padding)
        dx = (rand(n) * (2 * padding + 1)).long().clamp_(max=2 * padding)
    else:
        xp = x
        dy = dx = torch.zeros(n, dtype=torch.long, device=dev)
    rows = torch.arange(h, device=dev)[None, :] + dy[:, None]  # (N, H)
    cols = torch.arange(w, device=dev)[None, :] + dx[:, None]  # (N, W)
    if hflip > 0:
        flip = rand(n) < hflip
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    if vflip > 0:
        flip = rand(n) < vflip
        rows = torch.where(flip[:, None], rows.flip(1), rows)
    # gather rows then columns: two index_select-like gathers over (N, C, H, W)
    wp = xp.shape[-1]
    out = xp.gather(2, rows[:, None, :, None].expand(n, c, h, wp))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def random_affine(x: torch.Tensor, scale: tuple[float, float] | None, ratio: tuple[float, float],
                  rotate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random resized crop and rotation of a float batch, in one ``grid_sample``."""
    n = x.shape[0]
    dev = x.device
    rand = lambda *s: torch.rand(*s, generator=generator).to(dev)  # noqa: E731
    if scale is not None:
        area = scale[0] + (scale[1] - scale[0]) * rand(n)
        log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand(n)
        aspect = torch.exp(log_r)
        sw = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width / image width
        sh = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = (1 - sw) * (2 * rand(n) - 1)  # crop centre in [-1, 1] coordinates, kept inside
        cy = (1 - sh) * (2 * rand(n) - 1)
    else:
        sw = sh = torch.ones(n, device=dev)
        cx = cy = torch.zeros(n, device=dev)
    angle = (2 * rand(n) - 1) * math.radians(rotate) if rotate else torch.zeros(n, device=dev)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([sw * cos, -sh * sin, cx], 1),
                         torch.stack([sw * sin, sh * cos, cy], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Normalize:
    """uint8 (or float 0..255) batch -> float batch normalised by per-channel mean and std
    (given in 0..1 units); what evaluation does, and the last step of :class:`BatchAugment`."""

    def __init__(self, mean, std, device: str | torch.device = "cpu"):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def __call__(self, x: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=memory_format)


class BatchAugment:
    """uint8 batch on the device -> normalised float batch (and soft targets when mixing)."""

    def __init__(self, cfg: AugmentConfig, mean, std, num_classes: int, label_smoothing: float = 0.0,
                 seed: int = 0, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.normalize = Normalize(mean, std, self.device)
        self.generator = torch.Generator().manual_seed(seed)
        self.randaugment = self.jitter = self.erase = self.mixup = None
        if cfg.randaugment_n > 0:
            from torchvision.transforms import v2

            self.randaugment = v2.RandAugment(num_ops=cfg.randaugment_n, magnitude=cfg.randaugment_m)
        if cfg.color_jitter > 0:
            from torchvision.transforms import v2

            j = cfg.color_jitter
            self.jitter = v2.ColorJitter(brightness=j, contrast=j, saturation=j)
        if cfg.random_erasing > 0 and cfg.erasing_mode == "zero":
            from torchvision.transforms import v2

            self.erase = v2.RandomErasing(p=cfg.random_erasing, value=0)
        elif cfg.random_erasing > 0:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(probability=cfg.random_erasing, mode="pixel", device=str(self.device))
        if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mix_prob,
                               label_smoothing=label_smoothing, num_classes=num_classes)

    def _per_image(self, x: torch.Tensor, fn) -> torch.Tensor:
        # torchvision's v2 ops draw one parameter set per call: call them per image.
        # They use torch's global RNG, which the trainer seeds (and checkpoints) per run.
        return torch.stack([fn(img) for img in x])

    def __call__(self, x: torch.Tensor, y: torch.Tensor, train: bool = True,
                 memory_format=torch.contiguous_format):
        cfg = self.cfg
        erase_raw = train and self.erase is not None and cfg.erasing_mode == "zero"
        if train:
            if cfg.randaugment_n > 0:
                x = self._per_image(x, self.randaugment)
            if self.jitter is not None:
                x = self._per_image(x, self.jitter)
            if erase_raw:  # random resized crop, erasing, then flip and rotation below
                x = x.float()
                if cfg.rrc_scale is not None:
                    x = random_affine(x, cfg.rrc_scale, cfg.rrc_ratio, 0.0, self.generator)
                x = self._per_image(x, self.erase)
            if cfg.crop_padding > 0 or cfg.hflip > 0 or cfg.vflip > 0:
                x = random_crop_flip(x, cfg.crop_padding, cfg.hflip, self.generator, cfg.crop_pad_mode, cfg.vflip)
        x = x.float()
        if erase_raw:
            if cfg.rotate:
                x = random_affine(x, None, cfg.rrc_ratio, cfg.rotate, self.generator)
        elif train and (cfg.rrc_scale is not None or cfg.rotate):
            x = random_affine(x, cfg.rrc_scale, cfg.rrc_ratio, cfg.rotate, self.generator)
        x = self.normalize(x, memory_format)
        if train and self.erase is not None and not erase_raw:
            x = self.erase(x)
        if train and self.mixup is not None:
            if x.shape[0] % 2:  # timm's Mixup pairs image i with N-1-i and needs an even batch
                x, y = x[:-1], y[:-1]
            x, y = self.mixup(x, y)
        return x, y
