"""ConvMixer ("Patches Are All You Need?", Trockman & Kolter, 2022).

timm's ``ConvMixer`` is exactly the paper's network (patch-embedding conv, then per block a
depthwise conv with a residual around it and a pointwise conv, each conv followed by GELU
then BatchNorm), so mixlab reuses it and only registers the seed's CIFAR-10 variant and
the paper's ImageNet models under mixlab names.
"""
from __future__ import annotations

from torch import nn
from timm.models._builder import build_model_with_cfg
from timm.models._registry import generate_default_cfgs
from timm.models.convmixer import ConvMixer

from ..data.constants import CIFAR_MEAN, CIFAR_STD
from ..registry import register_model

PAPER = "Patches Are All You Need? (Trockman & Kolter, TMLR 2022)"


def _cfg(input_size=(3, 224, 224), num_classes=1000, **kwargs):
    return dict(input_size=input_size, num_classes=num_classes, first_conv="stem.0", classifier="head",
                paper_name=PAPER, **kwargs)


default_cfgs = generate_default_cfgs({
    "convmixer_256_8": _cfg(input_size=(3, 32, 32), num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD),
    "convmixer_768_32_k7_p7": _cfg(),
    "convmixer_1024_20_k9_p14": _cfg(),
    "convmixer_1536_20_k9_p7": _cfg(),
})


def _create(variant: str, pretrained: bool, defaults: dict, bn_momentum: float | None = None,
            bn_eps: float | None = None, **kwargs):
    """``bn_momentum`` / ``bn_eps``: set on every BatchNorm after building (timm's ConvMixer
    builds ``nn.BatchNorm2d(dim)`` with torch's defaults, 0.1 and 1e-5, and has no option for
    them). ``bn_momentum`` is in torch's convention, the weight of the new batch's statistics:
    Keras' default ``momentum=0.99`` (the weight of the old ones) is ``bn_momentum=0.01``, and
    Keras' ``epsilon`` default is 1e-3."""
    if bn_momentum is not None and not 0.0 <= float(bn_momentum) <= 1.0:
        raise ValueError(f"bn_momentum is the weight of each new batch's statistics (torch's convention; "
                         f"Keras' momentum=0.99 is bn_momentum=0.01): it must be in [0, 1], got {bn_momentum}")
    if bn_eps is not None and not float(bn_eps) > 0.0:
        raise ValueError(f"bn_eps must be a positive number (Keras' default is 1e-3, torch's 1e-5), got {bn_eps}")
    model = build_model_with_cfg(ConvMixer, variant, pretrained, feature_cfg=dict(flatten_sequential=True),
                                 **{**defaults, **kwargs})
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if bn_momentum is not None:
                m.momentum = float(bn_momentum)
            if bn_eps is not None:
                m.eps = float(bn_eps)
    return model


@register_model(family="convmixer", paper=PAPER, model_cls=ConvMixer, input_size=(3, 32, 32), num_classes=10,
                paper_figures=dict(params=594_186, top1_cifar10=82.71),
                cifar="native CIFAR model: patch 2, kernel 5")
def convmixer_256_8(pretrained=False, bn_momentum=None, bn_eps=None, **kwargs):
    """The seed's CIFAR-10 model: h=256, depth 8, kernel 5, patch 2, 10 classes, 32x32."""
    defaults = dict(dim=256, depth=8, kernel_size=5, patch_size=2, num_classes=10)
    return _create("convmixer_256_8", pretrained, defaults, bn_momentum, bn_eps, **kwargs)


@register_model(family="convmixer", paper=PAPER, model_cls=ConvMixer,
                paper_figures=dict(params=21.1e6))
def convmixer_768_32_k7_p7(pretrained=False, bn_momentum=None, bn_eps=None, **kwargs):
    """ConvMixer-768/32, kernel 7, patch 7 (ImageNet, 224x224)."""
    defaults = dict(dim=768, depth=32, kernel_size=7, patch_size=7, act_layer=nn.ReLU)
    return _create("convmixer_768_32_k7_p7", pretrained, defaults, bn_momentum, bn_eps, **kwargs)


@register_model(family="convmixer", paper=PAPER, model_cls=ConvMixer,
                paper_figures=dict(params=24.4e6))
def convmixer_1024_20_k9_p14(pretrained=False, bn_momentum=None, bn_eps=None, **kwargs):
    """ConvMixer-1024/20, kernel 9, patch 14 (ImageNet, 224x224)."""
    defaults = dict(dim=1024, depth=20, kernel_size=9, patch_size=14)
    return _create("convmixer_1024_20_k9_p14", pretrained, defaults, bn_momentum, bn_eps, **kwargs)


@register_model(family="convmixer", paper=PAPER, model_cls=ConvMixer,
                paper_figures=dict(params=51.6e6))
def convmixer_1536_20_k9_p7(pretrained=False, bn_momentum=None, bn_eps=None, **kwargs):
    """ConvMixer-1536/20, kernel 9, patch 7 (ImageNet, 224x224)."""
    defaults = dict(dim=1536, depth=20, kernel_size=9, patch_size=7)
    return _create("convmixer_1536_20_k9_p7", pretrained, defaults, bn_momentum, bn_eps, **kwargs)
