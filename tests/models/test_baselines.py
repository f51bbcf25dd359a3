"""Baselines: timm's/torchvision's networks under mixlab names, and their CIFAR forms.

ImageNet forms must be exactly the library's model (same parameters, same state_dict
layout); CIFAR forms must have the stated adaptation (checked through shapes and through
parameter counts derived by hand from the adaptation) and train at 32x32.
"""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

import mixlab
from mixlab import create_model, list_models, model_info
from mixlab.analysis.profile import count_params
from mixlab.models.baselines import BASELINES, GoogLeNet

ARCHS = {b.name: b for b in BASELINES}
REQUIRED = {"vgg16_bn", "googlenet", "inception_v3", "resnet18", "resnet50", "seresnet18", "densenet121",
            "mobilenetv1", "mobilenetv2", "efficientnet_b0", "regnetx_200mf", "regnety_400mf", "vit_tiny",
            "vit_small", "swin_tiny"}

# forward_features output of each CIFAR form at 32x32 (batch 1): the last stage's map
CIFAR_FEATURES = {
    "vgg16_bn": (1, 512, 1, 1), "googlenet": (1, 1024, 4, 4), "inception_v3": (1, 2048, 7, 7),
    "resnet18": (1, 512, 4, 4), "resnet34": (1, 512, 4, 4), "resnet50": (1, 2048, 4, 4), "seresnet18": (1, 512, 4, 4),
    "densenet121": (1, 1024, 4, 4), "mobilenetv1": (1, 1024, 4, 4), "mobilenetv2": (1, 1280, 4, 4),
    "efficientnet_b0": (1, 1280, 4, 4), "regnetx_200mf": (1, 368, 4, 4), "regnety_400mf": (1, 440, 4, 4),
    "vit_tiny": (1, 65, 192), "vit_small": (1, 65, 384), "swin_tiny": (1, 2, 2, 768),
}
# ... and of each ImageNet form at its own input size
IMAGENET_FEATURES = {
    "vgg16_bn": (1, 512, 7, 7), "googlenet": (1, 1024, 7, 7), "inception_v3": (1, 2048, 8, 8),
    "resnet18": (1, 512, 7, 7), "resnet34": (1, 512, 7, 7), "resnet50": (1, 2048, 7, 7), "seresnet18": (1, 512, 7, 7),
    "densenet121": (1, 1024, 7, 7), "mobilenetv1": (1, 1024, 7, 7), "mobilenetv2": (1, 1280, 7, 7),
    "efficientnet_b0": (1, 1280, 7, 7), "regnetx_200mf": (1, 368, 7, 7), "regnety_400mf": (1, 440, 7, 7),
    "vit_tiny": (1, 197, 192), "vit_small": (1, 197, 384), "swin_tiny": (1, 7, 7, 768),
}


def _reference(arch: str) -> nn.Module:
    """The library's own ImageNet model, built without mixlab."""
    b = ARCHS[arch]
    if b.timm_name is None:
        return torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    return timm.create_model(b.timm_name)


def test_every_required_baseline_is_registered_in_both_forms():
    assert REQUIRED <= set(ARCHS)
    names = set(list_models())
    for arch, b in ARCHS.items():
        imagenet, cifar = model_info(f"{arch}_imagenet"), model_info(f"{arch}_cifar")
        assert {f"{arch}_imagenet", f"{arch}_cifar"} <= names
        family = "baseline-vit" if arch.startswith(("vit", "swin")) else "baseline-cnn"
        assert imagenet.family == cifar.family == family
        assert imagenet.cifar == "" and imagenet.num_classes == 1000
        assert imagenet.input_size == ((3, 299, 299) if arch == "inception_v3" else (3, 224, 224))
        assert cifar.cifar and cifar.num_classes == 10 and cifar.input_size == (3, 32, 32)
        assert imagenet.timm_name == b.timm_name  # a pure alias where timm has the network


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_imagenet_form_is_the_library_model(arch):
    """Same class, same parameter count, same state_dict keys and shapes; forward at native size."""
    with torch.device("meta"):
        ours, ref = create_model(f"{arch}_imagenet"), _reference(arch)
        size = model_info(f"{arch}_imagenet").input_size[-1]
        feats = ours.forward_features(torch.zeros(1, 3, size, size))
        logits = ours(torch.zeros(1, 3, size, size))
    assert count_params(ours)[0] == count_params(ref)[0]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert tuple(feats.shape) == IMAGENET_FEATURES[arch]
    assert tuple(logits.shape) == (1, 1000)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_cifar_form_feature_map_at_32(arch):
    # forward and backward at 32x32 (every parameter reached): tests/models/test_contract.py
    info = model_info(f"{arch}_cifar")
    with torch.device("meta"):
        feats = create_model(f"{arch}_cifar").forward_features(torch.zeros(1, *info.input_size))
    assert tuple(feats.shape) == CIFAR_FEATURES[arch]


@pytest.mark.parametrize("arch", ["googlenet", "mobilenetv2", "regnetx_200mf"])
def test_smallest_imagenet_forms_run_for_real(arch):
    model = create_model(f"{arch}_imagenet").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_googlenet_computes_what_torchvision_computes():
    torch.manual_seed(0)
    ours = create_model("googlenet_imagenet").eval()
    ref = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
        pre = ours.forward_head(ours.forward_features(x), pre_logits=True)
        assert pre.shape == (2, 1024) and torch.equal(ours.fc(pre), ref(x))
    assert isinstance(ours, GoogLeNet) and isinstance(ours, torchvision.models.GoogLeNet)


def _conv(cin, cout, k, bias=False):
    return cout * cin * k * k + (cout if bias else 0)


def _linear(cin, cout):
    return cin * cout + cout


def test_cifar_parameter_counts_follow_from_the_adaptation():
    """Each CIFAR count = the library's ImageNet count, minus what the adaptation removed, plus what it added."""
    with torch.device("meta"):
        n = {a: count_params(_reference(a))[0] for a in ("resnet18", "googlenet", "vgg16_bn", "mobilenetv2",
                                                         "vit_tiny", "swin_tiny")}
        got = {a: count_params(create_model(f"{a}_cifar"))[0] for a in n}
    # 7x7 stem conv -> 3x3; 1000-way head -> 10-way
    assert got["resnet18"] == n["resnet18"] - _conv(3, 64, 7) + _conv(3, 64, 3) - _linear(512, 1000) + _linear(512, 10)
    assert got["googlenet"] == (n["googlenet"] - _conv(3, 64, 7) + _conv(3, 64, 3)
                                - _linear(1024, 1000) + _linear(1024, 10))
    # fc6 (7x7 conv 512->4096) and fc7 (1x1 4096->4096) dropped, head on the 512 features
    assert got["vgg16_bn"] == (n["vgg16_bn"] - _conv(512, 4096, 7, bias=True) - _conv(4096, 4096, 1, bias=True)
                               - _linear(4096, 1000) + _linear(512, 10))
    # strides only: the head is all that changes
    assert got["mobilenetv2"] == n["mobilenetv2"] - _linear(1280, 1000) + _linear(1280, 10)
    # patch 16 -> 4: smaller patch conv, 64+1 positions instead of 196+1
    assert got["vit_tiny"] == (n["vit_tiny"] - 192 * 3 * (16 * 16 - 4 * 4) - (197 - 65) * 192
                               - _linear(192, 1000) + _linear(192, 10))
    # patch 4 -> 2; window 7 -> 4 (relative-position tables 13x13 -> 7x7 per head), stage 4's 2x2 map
    # clamps its window to 2 (3x3 tables); depths (2, 2, 6, 2), heads (3, 6, 12, 24)
    heads = 2 * 3 + 2 * 6 + 6 * 12 + 2 * 24
    assert got["swin_tiny"] == (n["swin_tiny"] - 96 * 3 * (16 - 4) - heads * (169 - 49) - 2 * 24 * (49 - 9)
                                - _linear(768, 1000) + _linear(768, 10))


@pytest.mark.parametrize("arch", [a for a in sorted(ARCHS) if ARCHS[a].adapt is not None])
def test_cifar_features_only_reductions_match_the_maps(arch):
    with torch.device("meta"):
        model = timm.create_model(f"{arch}_cifar", features_only=True)
        feats = model(torch.zeros(1, 3, 32, 32))
    chans, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert [f.shape[1] for f in feats] == chans
    sizes = [f.shape[-1] for f in feats]
    if arch == "inception_v3":  # unpadded stride-2 reductions: 32 -> 15 -> 7
        assert sizes == [32, 32, 32, 15, 7] and reductions == [1, 1, 1, 2, 4]
    else:
        assert sizes == [32 // r for r in reductions]
        assert sizes[-1] == (1 if arch == "vgg16_bn" else 4)


def test_adapted_modules_are_as_stated():
    with torch.device("meta"):
        r, d, g, v = (create_model(n) for n in ("resnet18_cifar", "densenet121_cifar", "regnety_400mf_cifar",
                                                 "vit_tiny_cifar"))
    assert r.conv1.kernel_size == (3, 3) and r.conv1.stride == (1, 1) and isinstance(r.maxpool, nn.Identity)
    assert d.features.conv0.kernel_size == (3, 3) and isinstance(d.features.pool0, nn.Identity)
    for arch in ("mobilenetv1", "mobilenetv2", "efficientnet_b0"):
        def strides(m):
            return [m.conv_stem.stride] + [blk[0].conv_dw.stride for blk in m.blocks]

        with torch.device("meta"):
            cifar, imagenet = strides(create_model(f"{arch}_cifar")), strides(create_model(f"{arch}_imagenet"))
        changed = [i for i, (a, b) in enumerate(zip(cifar, imagenet)) if a != b]
        assert changed == [0, 2], arch  # the stem and blocks[1][0]: two stride-2 convs set to 1
    assert g.stem.conv.stride == g.s1.b1.conv2.conv.stride == g.s1.b1.downsample.conv.stride == (1, 1)
    assert g.s2.b1.conv2.conv.stride == (2, 2)
    assert v.patch_embed.patch_size == (4, 4) and v.patch_embed.img_size == (32, 32)


def test_options_the_adaptation_cannot_take_are_refused():
    with pytest.raises(ValueError, match="stem_type"):
        create_model("resnet18_cifar", stem_type="deep")
    with pytest.raises(ValueError, match="no hosted weights|no pretrained weights"):
        create_model("resnet18_cifar", pretrained=True)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("resnet18_cifar", pretrained=True)
    with pytest.raises(TypeError, match="does not take"):
        create_model("googlenet_cifar", aux_logits=True)
    with pytest.raises(ValueError, match="does not take mlp_ratio"):
        create_model("vgg16_bn_cifar", mlp_ratio=0.5)


def test_googlenet_takes_in_chans():
    # the classifier reset and headless forms of every name: tests/models/test_contract.py
    with torch.device("meta"):
        m = create_model("googlenet_cifar", in_chans=1)
        assert m(torch.zeros(1, 1, 32, 32)).shape == (1, 10)
    assert m.conv1.conv.in_channels == 1


def test_models_command_shows_the_cifar_adaptation(capsys):
    from mixlab.cli import main

    assert main(["models", "resnet18_cifar"]) == 0
    out = capsys.readouterr().out
    assert "resnet18_cifar" in out and "[CIFAR: stem replaced" in out and "11.17M" in out
    assert mixlab.model_info("inception_v3_cifar").cifar.startswith("stem changed after building (no upsampling)")
