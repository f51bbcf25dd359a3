"""Mask R-CNN on a mixlab or timm backbone: torchvision's detector with mixlab's backbone.

Everything after the feature pyramid is torchvision's ``MaskRCNN``: the resize/normalise
transform, the RPN (anchors, proposals, its losses), ``MultiScaleRoIAlign``, the box and mask
heads, the loss L = L_cls + L_box + L_mask (+ the RPN's objectness and box losses), and the
post-processing that pastes each instance's 28x28 mask into the image. What mixlab chooses
are the options that matter when training without ImageNet weights on small images:

* ``norm: gn`` puts GroupNorm in the FPN and in the box and mask heads, which become
  torchvision's ``maskrcnn_resnet50_fpn_v2`` heads (4 convolutions + 1 fully connected layer
  for boxes; a 2-convolution RPN head): normalisation that does not depend on the batch of
  2-8 images a detector trains with;
* ``anchor_sizes``: one anchor size per pyramid level (torchvision's 32..512 suit COCO's
  800-pixel images; BUSI's 256-pixel ones want 16..256);
* ``min_size`` / ``max_size``: the image size the transform resizes to (a list of min sizes
  draws one per training batch: multi-scale training);
* ``trainable_stages``: backbone stages trained (the others frozen), for ``--init`` weights.
"""
from __future__ import annotations

import math
from functools import partial

from torch import nn
from ..errors import UsageError

__all__ = ["DETECTOR_DEFAULTS", "build_mask_rcnn", "check_detector_options"]

# the keys of a config's ``detector`` section (torchvision's defaults where it has one)
DETECTOR_DEFAULTS: dict = {
    "min_size": 800,  # int, or a list: one drawn per training batch (multi-scale training)
    "max_size": 1333,
    "fpn_channels": 256,
    "norm": "gn",  # gn (GroupNorm in FPN and heads) | none (torchvision's plain FPN and heads)
    "anchor_sizes": None,  # one per pyramid level (with the pooled one); null: 32, 64, ... as torchvision
    "aspect_ratios": [0.5, 1.0, 2.0],
    "out_indices": None,  # backbone feature maps feeding the FPN; null: the last four with distinct strides
    "pyramid_strides": [4, 8, 16, 32],  # the simple pyramid's levels for isotropic backbones (ConvMixer, ViT)
    "trainable_stages": None,  # null: train the whole backbone; k: only its last k stages
    "mask_head_convs": 4,
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_train": 2000,
    "rpn_pre_nms_top_n_test": 1000,
    "rpn_post_nms_top_n_test": 1000,
    "box_batch_size_per_image": 512,
    "box_score_thresh": 0.05,
    "box_detections_per_img": 100,
}


def _sizes(value, key: str) -> list[int]:
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, int) and v > 0 for v in values):
        raise UsageError(f"detector.{key} must be a positive integer or a list of them, got {value!r}")
    return [int(v) for v in values]


def check_detector_options(d: dict) -> None:
    """Raise ValueError naming the first bad ``detector`` option."""
    _sizes(d["min_size"], "min_size")
    _sizes(d["max_size"], "max_size")
    if not isinstance(d["max_size"], int):
        raise UsageError(f"detector.max_size must be one integer, got {d['max_size']!r}")
    if d["norm"] not in ("gn", "none", None):
        raise UsageError(f"detector.norm must be gn or none, got {d['norm']!r}")
    if not isinstance(d["fpn_channels"], int) or d["fpn_channels"] < 8:
        raise UsageError(f"detector.fpn_channels must be an integer >= 8, got {d['fpn_channels']!r}")
    if d["anchor_sizes"] is not None:
        _sizes(d["anchor_sizes"], "anchor_sizes")
    if not d["aspect_ratios"] or not all(isinstance(r, (int, float)) and r > 0 for r in d["aspect_ratios"]):
        raise UsageError(f"detector.aspect_ratios must be positive numbers, got {d['aspect_ratios']!r}")
    for key in ("mask_head_convs", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
                "rpn_post_nms_top_n_test", "box_batch_size_per_image", "box_detections_per_img"):
        if not isinstance(d[key], int) or d[key] < (0 if key == "mask_head_convs" else 1):
            raise UsageError(f"detector.{key} must be a positive integer, got {d[key]!r}")
    if not isinstance(d["box_score_thresh"], (int, float)) or not 0 <= d["box_score_thresh"] < 1:
        raise UsageError(f"detector.box_score_thresh must be in [0, 1), got {d['box_score_thresh']!r}")


def _input_multiple(body: nn.Module) -> int:
    """What the padded batch's sides must be multiples of: 32, or the backbone's own multiple
    (Swin-MLP's patch x 2^3 x window) when it declares one."""
    inner = getattr(body, "model", body)
    own = getattr(inner, "input_multiple", None)
    return math.lcm(32, int(own())) if callable(own) else 32


def build_mask_rcnn(backbone_name: str, num_classes: int, detector: dict, mean, std, model_kwargs: dict | None = None,
                    drop_path_rate: float | None = None) -> nn.Module:
    """torchvision's MaskRCNN for ``num_classes`` object classes (+ background) on the named
    backbone's feature pyramid (:class:`~mixlab.det.backbone.BackboneFPN`)."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    from .backbone import BackboneFPN, create_feature_backbone, freeze_stages, group_norm

    d = detector
    check_detector_options(d)
    kwargs = dict(model_kwargs or {})
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    body = create_feature_backbone(backbone_name, default_img_size=int(d["max_size"]), **kwargs)
    gn = d["norm"] == "gn"
    backbone = BackboneFPN(body, int(d["fpn_channels"]), d["out_indices"], "gn" if gn else None,
                           d["pyramid_strides"], backbone_name)
    freeze_stages(backbone, d["trainable_stages"])
    levels = len(backbone.feature_strides)
    sizes = _sizes(d["anchor_sizes"], "anchor_sizes") if d["anchor_sizes"] is not None else \
        [32 * 2 ** i for i in range(levels)]
    if len(sizes) != levels:
        raise UsageError(f"detector.anchor_sizes has {len(sizes)} sizes but the pyramid of {backbone_name} has "
                         f"{levels} levels (strides {backbone.feature_strides}): give one size per level")
    ratios = tuple(float(r) for r in d["aspect_ratios"])
    anchors = AnchorGenerator(tuple((s,) for s in sizes), (ratios,) * levels)
    c = backbone.out_channels
    norm = partial(group_norm) if gn else None
    names = backbone.level_names
    heads = {}
    if gn:  # torchvision's v2 heads (maskrcnn_resnet50_fpn_v2), normalised with GroupNorm
        heads["rpn_head"] = RPNHead(c, anchors.num_anchors_per_location()[0], conv_depth=2)
        heads["box_head"] = FastRCNNConvFCHead((c, 7, 7), [c] * 4, [1024], norm_layer=norm)
    else:
        heads["rpn_head"] = RPNHead(c, anchors.num_anchors_per_location()[0])
        heads["box_head"] = TwoMLPHead(c * 7 * 7, 1024)
    heads["mask_head"] = MaskRCNNHeads(c, [c] * int(d["mask_head_convs"]), 1, norm_layer=norm)
    # torchvision's default predictors assume 256 channels: built here for the pyramid's width
    heads["box_predictor"] = FastRCNNPredictor(1024, int(num_classes) + 1)
    heads["mask_predictor"] = MaskRCNNPredictor(c, c, int(num_classes) + 1)
    min_size = _sizes(d["min_size"], "min_size")
    model = MaskRCNN(
        backbone, num_classes=None, min_size=tuple(min_size) if len(min_size) > 1 else min_size[0],
        max_size=int(d["max_size"]), image_mean=list(mean), image_std=list(std), rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
        mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2),
        rpn_pre_nms_top_n_train=int(d["rpn_pre_nms_top_n_train"]),
        rpn_post_nms_top_n_train=int(d["rpn_post_nms_top_n_train"]),
        rpn_pre_nms_top_n_test=int(d["rpn_pre_nms_top_n_test"]),
        rpn_post_nms_top_n_test=int(d["rpn_post_nms_top_n_test"]),
        box_batch_size_per_image=int(d["box_batch_size_per_image"]), box_score_thresh=float(d["box_score_thresh"]),
        box_detections_per_img=int(d["box_detections_per_img"]), size_divisible=_input_multiple(body), **heads)
    return model
