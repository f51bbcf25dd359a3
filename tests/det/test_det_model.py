"""Mask R-CNN on every backbone family: a train step and an eval step at 64x64, the maps that
reach the FPN, frozen stages, --init weights, and backbones that cannot be used."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mixlab.det.model import DETECTOR_DEFAULTS, build_mask_rcnn

TINY = dict(DETECTOR_DEFAULTS, min_size=64, max_size=64, fpn_channels=16, anchor_sizes=[8, 16, 32, 64, 128],
            rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100,
            rpn_post_nms_top_n_test=30, box_batch_size_per_image=16, box_detections_per_img=5, mask_head_convs=1,
            box_score_thresh=0.0)

# (backbone, small architecture arguments): every family at a size that runs in a second
FAMILIES = {
    "resnet": ("resnet18_imagenet", dict(channels=(8, 16, 32, 64))),
    "convmlp": ("convmlp_s", dict(blocks=(1, 1, 1), dims=(16, 32, 64), channels=16)),
    "conv2former": ("conv2former_n", dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))),
    "asmlp": ("asmlp_t", dict(embed_dim=16, depths=(1, 1, 1, 1))),
    "swin_mlp": ("swin_mlp_tiny_c6", dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(4, 8, 16, 32), window_size=2)),
    "convmixer-p8": ("convmixer_256_8", dict(dim=16, depth=2, patch_size=8, kernel_size=3)),
    "convmixer-p7": ("convmixer_256_8", dict(dim=16, depth=2, patch_size=7, kernel_size=3)),
    "timm-swin-nhwc": ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=2, embed_dim=24,
                                                            depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4))),
}


def _batch():
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 20:50] = 1
    targets = [dict(boxes=torch.tensor([[20.0, 10.0, 50.0, 30.0]]), labels=torch.tensor([1]), masks=masks),
               dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64),
                    masks=torch.zeros(0, 64, 64, dtype=torch.uint8))]  # an image without instances
    return images, targets


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_builds_trains_and_detects(family):
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = build_mask_rcnn(name, 1, TINY, [0.5] * 3, [0.25] * 3, kwargs)
    fpn_inputs = {}
    model.backbone.fpn.register_forward_pre_hook(lambda m, args: fpn_inputs.update(args[0]))
    images, targets = _batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    loss = sum(losses.values())
    assert math.isfinite(loss.item())
    loss.backward()
    stem = next(p for p in model.backbone.body.parameters())
    assert stem.grad is not None and float(stem.grad.abs().sum()) > 0

    # the maps reaching the FPN: NCHW, at the strides and widths the backbone's feature_info reports
    info = model.backbone.body.feature_info
    if model.backbone.isotropic:
        strides, widths = TINY["pyramid_strides"], [info.channels()[-1]] * 4
    else:
        strides = [info.reduction()[i] for i in model.backbone.indices]
        widths = [info.channels()[i] for i in model.backbone.indices]
        assert strides == [4, 8, 16, 32]
    got = [tuple(v.shape) for v in fpn_inputs.values()]
    assert got == [(2, c, 64 // s, 64 // s) for c, s in zip(widths, strides)]

    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for o in out:
        n = len(o["scores"])
        assert 0 < n <= TINY["box_detections_per_img"]  # box_score_thresh 0: an untrained model detects too
        assert o["boxes"].shape == (n, 4) and o["masks"].shape == (n, 1, 64, 64)
        assert o["labels"].tolist() == [1] * n


def test_isotropic_pyramid_of_a_patch_7_convmixer_resizes_to_power_of_two_strides():
    model = build_mask_rcnn("convmixer_256_8", 1, TINY, [0.5] * 3, [0.25] * 3,
                            dict(dim=16, depth=2, patch_size=7, kernel_size=3))
    assert model.backbone.isotropic and model.backbone.body.feature_info.reduction() == [7]
    maps = model.backbone.stage_maps(torch.zeros(1, 3, 64, 64))
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_backbone_without_features_only_is_refused(monkeypatch):
    from timm.models import _registry, build_model_with_cfg

    class Plain(nn.Module):  # a classifier that declares no stages (no feature_info)
        def __init__(self, num_classes=10, **kwargs):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 8, 3, 2), nn.Linear(8, num_classes)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    def plainnet_for_test(pretrained=False, **kwargs):
        return build_model_with_cfg(Plain, "plainnet_for_test", pretrained, **kwargs)

    monkeypatch.setitem(_registry._model_entrypoints, "plainnet_for_test", plainnet_for_test)
    with pytest.raises(ValueError, match=r"backbone 'plainnet_for_test' has no features_only form .*"
                                         r"no attribute 'feature_info'"):
        build_mask_rcnn("plainnet_for_test", 1, TINY, [0.5] * 3, [0.25] * 3)
    with pytest.raises(KeyError, match="unknown model 'convmlp_xs'"):
        build_mask_rcnn("convmlp_xs", 1, TINY, [0.5] * 3, [0.25] * 3)


def test_wrong_anchor_count_and_strides_are_explained():
    with pytest.raises(ValueError, match=r"anchor_sizes has 3 sizes but the pyramid of resnet18_imagenet has 5 levels"):
        build_mask_rcnn("resnet18_imagenet", 1, dict(TINY, anchor_sizes=[8, 16, 32]), [0.5] * 3, [0.25] * 3,
                        dict(channels=(8, 16, 32, 64)))
    with pytest.raises(ValueError, match="strictly increasing strides"):
        build_mask_rcnn("resnet18_imagenet", 1, dict(TINY, out_indices=[3, 2]), [0.5] * 3, [0.25] * 3,
                        dict(channels=(8, 16, 32, 64)))


def test_trainable_stages_freeze_the_stages_before_them():
    model = build_mask_rcnn("resnet18_imagenet", 1, dict(TINY, trainable_stages=1), [0.5] * 3, [0.25] * 3,
                            dict(channels=(8, 16, 32, 64)))
    body = model.backbone.body
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer4"}
    frozen_bn = [m for n, m in body.named_modules() if isinstance(m, nn.BatchNorm2d) and n.startswith("layer3")]
    model.train()
    assert frozen_bn and all(not m.training for m in frozen_bn)
    assert body.layer4[0].bn1.training


def test_init_weights_from_a_classifier_reach_the_backbone(tmp_path):
    from safetensors.torch import save_file

    from mixlab.registry import create_model
    from mixlab.tasks.detection import load_init_weights

    kw = dict(dims=(16, 32, 64), blocks=(1, 1, 1), channels=16)
    classifier = create_model("convmlp_s", num_classes=3, **kw)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = build_mask_rcnn("convmlp_s", 1, TINY, [0.5] * 3, [0.25] * 3, kw)
    n = load_init_weights(model, str(tmp_path / "w.safetensors"), "convmlp_s")
    body = model.backbone.body.state_dict()
    assert n == len(body)
    assert torch.equal(body["model.stages.1.blocks.0.channel_mlp1.fc1.weight"],
                       classifier.state_dict()["stages.1.blocks.0.channel_mlp1.fc1.weight"])
    other = create_model("convmlp_s", num_classes=3, dims=(16, 32, 32), blocks=(1, 1, 1), channels=16)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit the backbone: 0 tensor\(s\) missing, \d+ of another shape"):
        load_init_weights(model, str(tmp_path / "x.safetensors"), "convmlp_s")
