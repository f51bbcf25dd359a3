"""Boundary patches of coarse masks: find them, cut them out, paste refined ones back.

The steps of BPR ("Look Closer to Segment Better", Tang et al., CVPR 2021), as its official
code (tinyalpha/BPR: ``tools/split_patches.py``, ``tools/merge_patches.py``) does them, on
batches of masks ``(N, 1, H, W)`` at once:

1. **boundary pixels** (:func:`boundary_map`): a pixel whose 3x3 neighbourhood holds both
   foreground and background. Its score is how mixed the neighbourhood is,
   ``min(c, 9 - c)`` for ``c`` foreground pixels of 9 (the official ``find_float_boundary``,
   up to its constant factor). Unlike the official code (zero padding), the image edge is
   not a boundary: an object cut by the image border has no boundary there to refine.
2. **dense boxes** (:func:`propose_boxes`): a ``size`` x ``size`` square centred on every
   boundary pixel, covering pixels ``x - size//2 .. x - size//2 + size - 1``.
3. **NMS** (:func:`nms_boxes`): ``torchvision.ops.batched_nms`` on box IoU, per image. Ties
   (the score has only four values) are broken by raster order, so the kept boxes do not
   depend on how a sort orders equal keys. The official code uses IoU 0.25 for training
   patches and 0.55 at inference on Cityscapes (0.15 / 0.25 on COCO). At a threshold of
   1/3 or more every boundary pixel lies inside a kept box (a box suppressed at IoU > 1/3
   is shifted by less than half a box from the box that suppressed it); below that, some
   need not.
4. **fit inside** (:func:`fit_inside`): boxes reaching over the image edge are shifted back
   in, after NMS, as the official ``_force_move_back`` does.
5. **crop** (:func:`crop_patches`): image and mask patches resized to the refiner's input
   size with ``torchvision.ops.roi_align`` (see there for why not ``grid_sample``).
6. **paste** (:func:`paste_patches`, :func:`reassemble`): each refined patch is resampled
   back to its box (the inverse of the crop's sampling), patches are averaged where they
   overlap, the average is thresholded at 0.5, and pixels outside every box keep the coarse
   mask (the official ``merge_patches.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, roi_align
from ..errors import UsageError

__all__ = ["boundary_map", "propose_boxes", "nms_boxes", "fit_inside", "boundary_boxes", "crop_patches",
           "paste_patches", "reassemble", "refiner_input"]


def _as_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) or (N, H, W) masks (bool, 0/1, or probabilities) -> (N, 1, H, W) float 0/1."""
    if masks.ndim == 3:
        masks = masks[:, None]
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise UsageError(f"masks must be (N, 1, H, W) or (N, H, W), got shape {tuple(masks.shape)}")
    return (masks > 0.5).float() if masks.dtype != torch.bool else masks.float()


def boundary_map(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(is_boundary (N, H, W) bool, score (N, H, W) int64 in 0..4) of binary masks.

    ``score`` is ``min(c, 9 - c)`` for the ``c`` foreground pixels of the 3x3 neighbourhood
    (edge pixels replicated outward); a pixel is on the boundary when its score is > 0.
    """
    m = _as_masks(masks)
    count = F.conv2d(F.pad(m, (1, 1, 1, 1), mode="replicate"), m.new_ones(1, 1, 3, 3))[:, 0]
    count = count.round().long()  # exact: sums of nine 0/1 values
    score = torch.minimum(count, 9 - count)
    return score > 0, score


def propose_boxes(masks: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(boxes (P, 4) float64 ``x0, y0, x1, y1`` in pixel-edge coordinates, scores (P,) float64,
    image index (P,) int64): a ``size`` square centred on every boundary pixel.

    Scores are the boundary score (1..4) plus a fraction below 0.5 that decreases in raster
    order, so that no two scores of an image are equal (see the module notes on NMS).
    """
    if int(size) < 1:
        raise UsageError(f"patch size must be at least 1 pixel, got {size}")
    is_boundary, score = boundary_map(masks)
    n, h, w = is_boundary.shape
    idx, ys, xs = is_boundary.nonzero(as_tuple=True)
    x0 = (xs - size // 2).double()
    y0 = (ys - size // 2).double()
    boxes = torch.stack([x0, y0, x0 + size, y0 + size], dim=1)
    raster = (ys * w + xs).double()
    scores = score[idx, ys, xs].double() + 0.5 * (1.0 - raster / (h * w))
    return boxes, scores, idx


def nms_boxes(boxes: torch.Tensor, scores: torch.Tensor, image_index: torch.Tensor,
              iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes NMS keeps (each image on its own), highest score first."""
    if not 0.0 < float(iou_threshold) <= 1.0:
        raise UsageError(f"the NMS IoU threshold must be in (0, 1], got {iou_threshold}")
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    return batched_nms(boxes, scores, image_index, float(iou_threshold))


def fit_inside(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes shifted (not resized) to lie inside a ``height`` x ``width`` image; a box larger
    than the image is centred on it (it then reaches over both edges)."""
    out = boxes.clone()
    for lo, hi, extent in ((0, 2, width), (1, 3, height)):
        size = out[:, hi] - out[:, lo]
        start = torch.where(size <= extent, out[:, lo].clamp(min=0).minimum(extent - size),
                            ((extent - size) / 2).floor())
        out[:, lo], out[:, hi] = start, start + size
    return out


def boundary_boxes(masks: torch.Tensor, size: int, iou_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes (P, 4) float64 with integer corners, image index (P,)) of the boundary patches of
    a batch of masks: proposed, NMS-filtered, fitted inside the image, sorted by image."""
    boxes, scores, idx = propose_boxes(masks, size)
    keep = nms_boxes(boxes, scores, idx, iou_threshold)
    keep = keep[torch.argsort(idx[keep], stable=True)]  # image by image, each by score
    h, w = masks.shape[-2:]
    return fit_inside(boxes[keep], h, w), idx[keep]


def crop_patches(images: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor,
                 out_size: int) -> torch.Tensor:
    """(P, C, out_size, out_size) float: each box of its image, resampled.

    ``torchvision.ops.roi_align`` (``aligned=True``) samples a regular grid of points in each
    box bilinearly, the sampling ``F.grid_sample(..., align_corners=False)`` does with an
    affine grid (the tests check they agree). It is used here because it takes the images
    once and every box of every image with its image index, where ``grid_sample`` needs one
    input per grid (the image copied once per patch), and because with ``sampling_ratio=-1``
    it averages ceil(box / out) points per output pixel and axis when a box is shrunk,
    where ``grid_sample`` would alias. At ``out_size == box size`` the crop is exact.
    Points more than one pixel outside the image read 0.
    """
    if boxes.numel() == 0:
        return images.new_zeros((0, images.shape[1], out_size, out_size), dtype=torch.float32)
    x = images.float()
    rois = torch.cat([image_index[:, None].to(x.dtype), boxes.to(x.dtype)], dim=1)
    return roi_align(x, rois, output_size=(int(out_size), int(out_size)), spatial_scale=1.0, sampling_ratio=-1,
                     aligned=True)


def paste_patches(patches: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor,
                  shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count), each (N, H, W) float32: the patches (P, 1, S, S) resampled onto their boxes
    and added up, and how many patches cover each pixel.

    The resampling inverts :func:`crop_patches`: output pixel ``j`` of a box starting at
    ``x0`` reads the patch at ``(j + 0.5) * S / B - 0.5``, which is bilinear
    ``F.interpolate(..., align_corners=False)`` from S to the box size B. Boxes must have
    integer corners and one size (as :func:`boundary_boxes` makes them). For binary patches
    a crop at an integer upscale (B -> k B) followed by this paste gives the mask back
    exactly once thresholded at 0.5 (the centre weight of the round trip is over 1/2).
    """
    n, h, w = shape
    total = torch.zeros(n * h * w, dtype=torch.float32, device=patches.device)
    count = torch.zeros_like(total)
    if boxes.numel() == 0:
        return total.view(n, h, w), count.view(n, h, w)
    sizes = boxes[:, 2:] - boxes[:, :2]
    b = int(sizes[0, 0])
    if not bool((sizes == b).all()) or not bool((boxes == boxes.round()).all()):
        raise UsageError("paste_patches needs square boxes of one size with integer corners")
    back = patches.float() if patches.shape[-1] == b else F.interpolate(
        patches.float(), size=(b, b), mode="bilinear", align_corners=False)
    offs = torch.arange(b, device=patches.device)
    ys = boxes[:, 1].long().to(patches.device)[:, None, None] + offs[None, :, None]
    xs = boxes[:, 0].long().to(patches.device)[:, None, None] + offs[None, None, :]
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    flat = (image_index.to(patches.device)[:, None, None] * h + ys) * w + xs
    total.index_add_(0, flat[inside], back[:, 0][inside])
    count.index_add_(0, flat[inside], torch.ones_like(back[:, 0][inside]))
    return total.view(n, h, w), count.view(n, h, w)


def reassemble(coarse: torch.Tensor, total: torch.Tensor, count: torch.Tensor,
               threshold: float = 0.5) -> torch.Tensor:
    """(N, 1, H, W) bool: the mean of the patches where any covers a pixel, thresholded;
    the coarse mask elsewhere."""
    coarse_b = _as_masks(coarse) > 0.5
    covered = count > 0
    mean = total / count.clamp(min=1)
    return torch.where(covered[:, None], (mean > threshold)[:, None], coarse_b)


def refiner_input(image_patches: torch.Tensor, mask_patches: torch.Tensor, mean, std) -> torch.Tensor:
    """The refiner's 4-channel input: the image patch (0..1) normalised by ``mean``/``std``
    and the coarse mask patch (0..1) mapped to -1..1, as the official
    ``EncoderDecoderRefine`` feeds them."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=image_patches.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=image_patches.device).view(1, -1, 1, 1)
    return torch.cat([(image_patches.float() - m) / s, (mask_patches.float() - 0.5) / 0.5], dim=1)
