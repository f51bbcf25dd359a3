"""Layer finding, weight tiles, Grad-CAM, input gradients and feature maps."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

import mixlab
from mixlab.analysis.viz import (default_feature_layers, depthwise_convs, feature_maps, find_spatial_target,
                                 grid_shape, gradcam, input_gradients, kernel_layer, spatial_layout, stem_conv,
                                 weight_tiles)
from mixlab.registry import model_info


def test_grid_shape_near_square():
    assert grid_shape(256) == (16, 16)
    assert grid_shape(768) == (28, 28)  # 27 x 28 = 756 < 768
    assert grid_shape(750) == (27, 28)
    assert grid_shape(10) == (3, 4)
    assert grid_shape(1) == (1, 1)


def test_weight_tiles_modes_and_normalisation():
    torch.manual_seed(0)
    rgb, mode = weight_tiles(torch.randn(5, 3, 2, 2), "tile")
    assert mode == "rgb" and rgb.shape == (5, 2, 2, 3)
    flat = rgb.reshape(5, -1)
    np.testing.assert_allclose(flat.min(1), 0, atol=1e-7)  # each tile min-max on its own
    np.testing.assert_allclose(flat.max(1), 1, atol=1e-7)
    w = torch.randn(4, 1, 3, 3)
    single, mode = weight_tiles(w, "tile")
    assert mode == "single"
    ref = (w[1, 0] - w[1, 0].min()) / (w[1, 0].max() - w[1, 0].min())
    np.testing.assert_allclose(single[1], ref.numpy(), atol=1e-6)
    w = torch.zeros(2, 4, 3, 3)
    w[0, 2, 1, 1], w[1, 1] = 5.0, 1.0
    tiles, mode = weight_tiles(w, "tile")
    assert mode == "strongest" and tiles[0][1, 1] == 1.0 and tiles[0].sum() == 1.0
    assert np.all(tiles[1] == 0.5)  # the strongest slice of filter 1 is constant


def test_weight_tiles_global_is_one_min_max_over_the_tensor():
    # the Keras seed: (w - w.min()) / (w.max() - w.min()) over the whole kernel tensor, then tiles
    torch.manual_seed(0)
    w = torch.randn(6, 3, 2, 2) * torch.arange(1, 7).view(6, 1, 1, 1)  # filters of different ranges
    tiles, mode = weight_tiles(w)  # global is the default
    ref = ((w - w.min()) / (w.max() - w.min())).permute(0, 2, 3, 1).numpy()
    assert mode == "rgb"
    np.testing.assert_allclose(tiles, ref, atol=1e-6)
    flat = tiles.reshape(6, -1)
    assert flat.max(1)[0] < 0.9 and flat.min(1)[0] > 0.1  # the small filter keeps its small contrast
    k = torch.randn(8, 1, 5, 5)
    single, _ = weight_tiles(k, "global")
    np.testing.assert_allclose(single, ((k[:, 0] - k.min()) / (k.max() - k.min())).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="global"):
        weight_tiles(k, "per-tile")


def test_convmixer_layers():
    with torch.device("meta"):
        model = mixlab.create_model("convmixer_256_8")
    assert stem_conv(model)[0] == "stem.0"
    dws = depthwise_convs(model)
    assert [n for n, _ in dws] == [f"blocks.{i}.0.fn.0" for i in range(8)]
    assert kernel_layer(model)[0] == "blocks.3.0.fn.0"  # the seed's: the Keras model's layer 26, 4th of 8
    assert kernel_layer(model, block=2)[0] == "blocks.2.0.fn.0"
    with pytest.raises(ValueError, match="out of range"):
        kernel_layer(model, block=8)
    with pytest.raises(ValueError, match="not a Conv2d"):
        kernel_layer(model, layer="blocks.0.1x")
    target = find_spatial_target(model, 32)
    assert (target["name"], target["layout"], target["c"], target["h"], target["w"]) == ("blocks", "nchw", 256, 16, 16)


def _one_per_family() -> list[str]:
    chosen: dict[str, str] = {}
    for name in mixlab.list_models(task="classification"):
        fam = model_info(name).family
        # the CIFAR form when there is one (small maps, fast), else the first name
        if fam not in chosen or ("cifar" in name and "cifar" not in chosen[fam]):
            chosen[fam] = name
    return sorted(chosen.values())


@pytest.mark.parametrize("name", _one_per_family())
def test_layer_detection_for_every_family(name):
    info = model_info(name)
    with torch.device("meta"):
        model = mixlab.create_model(name)
    stem_name, stem = stem_conv(model)
    assert isinstance(stem, nn.Conv2d) and stem.in_channels == 3
    for _, conv in depthwise_convs(model):
        assert conv.groups == conv.in_channels == conv.out_channels
    target = find_spatial_target(model, info.input_size)
    assert target["h"] > 1 and target["w"] > 1 and target["layout"] in ("nchw", "nhwc", "tokens")
    # the stage really is the last spatial one: its map has the model's pooled width (or the
    # head's pre-pool projection), not the classifier's
    assert target["c"] == getattr(model, "num_features", target["c"]) or target["name"].startswith("head")
    assert default_feature_layers(model, info.input_size)


def test_spatial_layout_tells_layouts_apart():
    assert spatial_layout((2, 768, 7, 7), (224, 224))["layout"] == "nchw"
    assert spatial_layout((2, 7, 7, 768), (224, 224))["layout"] == "nhwc"
    tok = spatial_layout((2, 197, 384), (224, 224), prefix_tokens=1)
    assert (tok["layout"], tok["h"], tok["w"], tok["prefix"]) == ("tokens", 14, 14, 1)
    assert spatial_layout((2, 8, 8, 8), (32, 32), channels=8)["layout"] == "nchw"
    assert spatial_layout((2, 1000), (224, 224)) is None
    assert spatial_layout((2, 5, 7, 7), (224, 224))["layout"] == "nchw"


class RegionNet(nn.Module):
    """A classifier that sees only rows 2..9 and columns 20..27 of a 32x32 input."""

    REGION = (slice(2, 10), slice(20, 28))

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.head = nn.Linear(8, 3)
        self.num_features = 8

    def forward(self, x):
        mask = torch.zeros_like(x)
        mask[:, :, self.REGION[0], self.REGION[1]] = 1
        return self.head(torch.relu(self.conv(x * mask)).mean(dim=(2, 3)))


@pytest.mark.parametrize("method", ["gradcam", "gradients"])
def test_saliency_concentrated_where_the_model_looks(method):
    torch.manual_seed(0)
    model = RegionNet().eval()
    x = torch.randn(3, 3, 32, 32)
    maps, info = (gradcam(model, x) if method == "gradcam" else input_gradients(model, x))
    assert maps.shape == (3, 32, 32) and np.allclose(maps.max(axis=(1, 2)), 1.0)
    rows, cols = RegionNet.REGION
    if method == "gradients":
        inside = maps[:, rows, cols].sum((1, 2)) / maps.sum((1, 2))
        np.testing.assert_allclose(inside, 1.0)  # exactly zero outside
    else:
        assert info["layer"] == "conv"
        # the 3x3 conv reaches one pixel past the region; bilinear upsampling is identity at 32x32
        grown = (slice(rows.start - 1, rows.stop + 1), slice(cols.start - 1, cols.stop + 1))
        inside = maps[:, grown[0], grown[1]].sum((1, 2)) / maps.sum((1, 2))
        assert (inside > 0.999).all()


def _randomise_batchnorm(model):
    """Freshly initialised BatchNorms are identities; give them trained-looking statistics so the
    maps are not degenerate."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.5)
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)


def test_gradcam_equals_naive_computation_on_convmixer():
    torch.manual_seed(0)
    model = mixlab.create_model("convmixer_256_8").eval()
    _randomise_batchnorm(model)
    x = torch.randn(2, 3, 32, 32)
    maps, info = gradcam(model, x, target=3)
    assert (maps.max(axis=(1, 2)) == 1).all()  # a real, non-degenerate map for both images
    assert info["layer"] == "blocks"
    feats = model.forward_features(x)
    feats.retain_grad()
    model.forward_head(feats)[:, 3].sum().backward()
    weights = feats.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * feats).sum(1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    ref = (cam / cam.flatten(1).max(1).values[:, None, None]).numpy()
    np.testing.assert_allclose(maps, ref, atol=1e-5)


def test_gradcam_on_nhwc_and_token_models():
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1, 1, 1),
                             num_heads=(1, 1, 1, 1), img_size=64, window_size=4, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    maps, info = gradcam(swin, x)
    assert info["layer"] == "norm" and info["shape"] == [2, 2, 2, 128] and maps.shape == (2, 64, 64)
    feats = swin.forward_features(x)  # (N, H, W, C)
    feats.retain_grad()
    logits = swin.forward_head(feats)
    logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    a, g = feats.permute(0, 3, 1, 2), feats.grad.permute(0, 3, 1, 2)
    cam = torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    ref = (cam / cam.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]).numpy()
    np.testing.assert_allclose(maps, ref, atol=1e-5)

    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=1, num_classes=5).eval()
    maps, info = gradcam(vit, x)
    assert info["layer"] == "norm" and info["shape"] == [2, 17, 192] and maps.shape == (2, 64, 64)


def test_feature_maps_pick_top_energy_channels():
    torch.manual_seed(0)
    model = mixlab.create_model("convmixer_256_8").eval()
    x = torch.randn(1, 3, 32, 32)
    res = feature_maps(model, x, ["blocks.0", "blocks"], top_k=5)
    with torch.no_grad():
        feats = model.forward_features(x)[0]
    energy = feats.pow(2).mean(dim=(1, 2))
    top = energy.argsort(descending=True)[:5]
    assert res[1]["layer"] == "blocks" and res[1]["channels"] == top.tolist()
    np.testing.assert_allclose(res[1]["maps"], feats[top].numpy(), atol=1e-5)
    assert res[0]["shape"] == [256, 16, 16] and len(res[0]["channels"]) == 5
    assert default_feature_layers(model, 32) == ["blocks.0", "blocks.2", "blocks.5", "blocks.7"]
