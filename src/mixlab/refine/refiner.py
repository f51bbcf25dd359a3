"""Refining whole masks with a patch refiner, and the patches it is trained on.

:func:`refine_masks` runs the whole BPR inference on a batch of images and coarse masks:
boundary boxes -> image and mask patches -> the refiner -> patches pasted back and averaged
-> the refined masks (:mod:`mixlab.refine.patches`). :func:`training_patches` cuts the
training set: image, coarse-mask and ground-truth patches of the same boxes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .patches import boundary_boxes, crop_patches, paste_patches, reassemble, refiner_input
from ..errors import UsageError

__all__ = ["PatchSettings", "refine_masks", "training_patches"]


@dataclass(frozen=True)
class PatchSettings:
    """How patches are cut: ``size`` px boxes at the image's scale, resized to ``input_size``
    for the refiner; ``nms_iou``: the NMS threshold on box IoU."""

    size: int = 64
    input_size: int = 128
    nms_iou: float = 0.55

    @classmethod
    def from_config(cls, cfg: dict, training: bool = False) -> "PatchSettings":
        p = cfg["patch"]
        return cls(int(p["size"]), int(p["input_size"]), float(p["nms_iou_train" if training else "nms_iou"]))


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.no_grad()
def refine_masks(model: torch.nn.Module, images: torch.Tensor, coarse: torch.Tensor, settings: PatchSettings,
                 mean, std, device: torch.device | str = "cpu", batch_size: int = 64, precision: str = "fp32",
                 images_per_chunk: int = 16, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(refined masks (N, 1, H, W) bool on the CPU, patches per image (N,) int64).

    ``images``: (N, 3, H, W) uint8; ``coarse``: (N, 1, H, W) masks (bool or 0/1). The model
    gets :func:`~mixlab.refine.patches.refiner_input` batches of ``batch_size`` patches and
    returns one logit channel; its sigmoid probabilities are pasted back. Images are handled
    ``images_per_chunk`` at a time to bound the memory of the float copies.
    """
    from ..train.step import autocast

    if images.ndim != 4 or coarse.ndim != 4 or images.shape[0] != coarse.shape[0] \
            or images.shape[-2:] != coarse.shape[-2:]:
        raise UsageError(f"images (N, 3, H, W) and coarse masks (N, 1, H, W) must agree, got "
                         f"{tuple(images.shape)} and {tuple(coarse.shape)}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out, counts = [], []
    try:
        for part in _chunks(images.shape[0], images_per_chunk):
            x = images[part].to(device)
            c = (coarse[part] > 0.5 if coarse.dtype != torch.bool else coarse[part]).to(device)
            boxes, idx = boundary_boxes(c, settings.size, settings.nms_iou)
            idx = idx.to(device)
            probs = []
            for b in _chunks(len(boxes), batch_size):
                img_p = crop_patches(x, boxes[b], idx[b], settings.input_size) / 255.0
                mask_p = crop_patches(c.float(), boxes[b], idx[b], settings.input_size)
                with autocast(device, precision):
                    logits = model(refiner_input(img_p, mask_p, mean, std))
                probs.append(torch.sigmoid(logits.float()[:, :1]))
            probs = torch.cat(probs) if probs else torch.zeros(0, 1, settings.input_size, settings.input_size,
                                                               device=device)
            total, count = paste_patches(probs, boxes, idx, (x.shape[0], *x.shape[-2:]))
            out.append(reassemble(c, total, count, threshold).cpu())
            counts.append(torch.bincount(idx.cpu(), minlength=x.shape[0]))
    finally:
        model.train(was_training)
    return torch.cat(out), torch.cat(counts)


def training_patches(images: torch.Tensor, coarse: torch.Tensor, truth: torch.Tensor, settings: PatchSettings,
                     images_per_chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image patches (P, 3, S, S) uint8, masks (P, 2, S, S) uint8, image index (P,)).

    ``masks[:, 0]`` is the coarse mask patch in 0..255 (the crop of a binary mask is soft
    where it is upscaled), ``masks[:, 1]`` the ground-truth patch in 0/1 (crop > 0.5). They
    are one tensor so that flips and rotations move both with the image.
    """
    imgs, masks, where = [], [], []
    for part in _chunks(images.shape[0], images_per_chunk):
        c = coarse[part] > 0.5 if coarse.dtype != torch.bool else coarse[part]
        boxes, idx = boundary_boxes(c, settings.size, settings.nms_iou)
        s = settings.input_size
        imgs.append(crop_patches(images[part], boxes, idx, s).round().clamp(0, 255).to(torch.uint8))
        c_p = (crop_patches(c.float(), boxes, idx, s) * 255).round().to(torch.uint8)
        t_p = (crop_patches(truth[part].float(), boxes, idx, s) > 0.5).to(torch.uint8)
        masks.append(torch.cat([c_p, t_p], dim=1))
        where.append(idx + part.start)
    return torch.cat(imgs), torch.cat(masks), torch.cat(where)
