"""ConvMixer ("Patches Are All You Need?", Trockman & Kolter, 2022).

timm's ``ConvMixer`` is exactly the paper's network (patch-embedding conv, then per block a
depthwise conv with a residual around it and a pointwise conv, each conv followed by GELU
then BatchNorm), so mixlab reuses it and only registers the seed's CIFAR-10 variant and
the paper's ImageNet models under mixlab names.
"""
from __future__ import annotations

import math

from torch import nn
from timm.models._registry import generate_default_cfgs
from timm.models.convmixer import ConvMixer

from ..data.constants import CIFAR_MEAN, CIFAR_STD
from ..registry import register_model
from ._timm_api import build

PAPER = "Patches Are All You Need? (Trockman & Kolter, TMLR 2022)"


def _cfg(input_size=(3, 224, 224), num_classes=1000, patch_size=7, **kwargs):
    size = input_size[1] // patch_size  # the map the blocks keep (no downsampling after the patch conv)
    return dict(input_size=input_size, num_classes=num_classes, pool_size=(size, size), first_conv="stem.0",
                classifier="head", paper_name=PAPER, **kwargs)


default_cfgs = generate_default_cfgs({
    "convmixer_256_8": _cfg(input_size=(3, 32, 32), num_classes=10, patch_size=2, mean=CIFAR_MEAN, std=CIFAR_STD),
    "convmixer_768_32_k7_p7": _cfg(),
    "convmixer_1024_20_k9_p14": _cfg(patch_size=14),
    "convmixer_1536_20_k9_p7": _cfg(),
})


def keras_init_(model: nn.Module) -> None:
    """Initialise convolutions and linear layers as Keras does by default: Glorot-uniform kernels
    (limit sqrt(6 / (fan_in + fan_out))) and zero biases.

    Keras computes the fans of a kernel of shape (kh, kw, in, out) as in*kh*kw and out*kh*kw; for
    a ``DepthwiseConv2D`` (kernel (kh, kw, channels, depth_multiplier)) that is channels*kh*kw and
    kh*kw, where torch's fan of the same grouped weight would be kh*kw. For ConvMixer-256/8 the
    limits are 0.031 (5x5 depthwise), 0.108 (1x1), 0.076 (stem) and 0.150 (head), against torch's
    default bounds of 0.2, 0.0625, 0.289 and 0.0625."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            if m.groups == m.in_channels == m.out_channels and m.groups > 1:
                fan_in, fan_out = m.in_channels * kh * kw, kh * kw
            else:
                fan_in, fan_out = m.in_channels // m.groups * kh * kw, m.out_channels * kh * kw
        elif isinstance(m, nn.Linear):
            fan_in, fan_out = m.in_features, m.out_features
        else:
            continue
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        nn.init.uniform_(m.weight, -limit, limit)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _create(variant: str, pretrained: bool, defaults: dict, bn_momentum: float | None = None,
            bn_eps: float | None = None, init: str | None = None, **kwargs):
    """``bn_momentum`` / ``bn_eps``: set on every BatchNorm after building (timm's ConvMixer
    builds ``nn.BatchNorm2d(dim)`` with torch's defaults, 0.1 and 1e-5, and has no option for
    them). ``bn_momentum`` is in torch's convention, the weight of the new batch's statistics:
    Keras' default ``momentum=0.99`` (the weight of the old ones) is ``bn_momentum=0.01``, and
    Keras' ``epsilon`` default is 1e-3. ``init``: ``torch`` (default, timm's) or ``keras``
    (:func:`keras_init_`, the Keras seed's)."""
    if init not in (None, "torch", "keras"):
        raise ValueError(f"init must be 'torch' (default) or 'keras' (Glorot-uniform kernels, zero biases), got {init!r}")
    if bn_momentum is not None and not 0.0 <= float(bn_momentum) <= 1.0:
        raise ValueError(f"bn_momentum is the weight of each new batch's statistics (torch's convention; "
                         f"Keras' momentum=0.99 is bn_momentum=0.01): it must be in [0, 1], got {bn_momentum}")
    if bn_eps is not None and not float(bn_eps) > 0.0:
        raise ValueError(f"bn_eps must be a positive number (Keras' default is 1e-3, torch's 1e-5), got {bn_eps}")
    model = build(ConvMixer, variant, pretrained, dict(flatten_sequential=True), **{**defaults, **kwargs})
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if bn_momentum is not None:
                m.momentum = float(bn_momentum)
            if bn_eps is not None:
                m.eps = float(bn_eps)
    if init == "keras" and not pretrained:
        keras_init_(model)
    return model


@register_model(family="convmixer", paper=PAPER, model_cls=ConvMixer, input_size=(3, 32, 32), num_classes=10,
                paper_figures=dict(params=594_186, top1_cifar10=82.71),
                cifar="native CIFAR model: patch 2, kernel 5")
def convmixer_256_8(pretrained=False, bn_momentum=None, bn_eps=None, init=None, **kwargs):
    """The seed's CIFAR-10 model: h=256, depth 8, kernel 5, patch 2, 10 classes, 32x32."""
    defaults = dict(dim=256, depth=8, kernel_size=5, patch_size=2, num_classes=10)
    return _create("convmixer_256_8", pretrained, defaults, bn_momentum, bn_eps, init, **kwargs)


@register_model(family="convmixer", paper=PAPER, model_cls=ConvMixer,
                paper_figures=dict(params=21.1e6))
def convmixer_768_32_k7_p7(pretrained=False, bn_momentum=None, bn_eps=None, init=None, **kwargs):
    """ConvMixer-768/32, kernel 7, patch 7 (ImageNet, 224x224)."""
    defaults = dict(dim=768, depth=32, kernel_size=7, patch_size=7, act_layer=nn.ReLU)
    return _create("convmixer_768_32_k7_p7", pretrained, defaults, bn_momentum, bn_eps, init, **kwargs)


@register_model(family="convmixer", paper=PAPER, model_cls=ConvMixer,
                paper_figures=dict(params=24.4e6))
def convmixer_1024_20_k9_p14(pretrained=False, bn_momentum=None, bn_eps=None, init=None, **kwargs):
    """ConvMixer-1024/20, kernel 9, patch 14 (ImageNet, 224x224)."""
    defaults = dict(dim=1024, depth=20, kernel_size=9, patch_size=14)
    return _create("convmixer_1024_20_k9_p14", pretrained, defaults, bn_momentum, bn_eps, init, **kwargs)


@register_model(family="convmixer", paper=PAPER, model_cls=ConvMixer,
                paper_figures=dict(params=51.6e6))
def convmixer_1536_20_k9_p7(pretrained=False, bn_momentum=None, bn_eps=None, init=None, **kwargs):
    """ConvMixer-1536/20, kernel 9, patch 7 (ImageNet, 224x224)."""
    defaults = dict(dim=1536, depth=20, kernel_size=9, patch_size=7)
    return _create("convmixer_1536_20_k9_p7", pretrained, defaults, bn_momentum, bn_eps, init, **kwargs)
