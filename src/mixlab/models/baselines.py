"""Baselines the seed papers compare against: classic CNNs and vision transformers.

Nothing here is rewritten: every network is timm's own (torchvision's for GoogLeNet, which
timm lacks), registered under mixlab names in two forms each:

* ``<arch>_imagenet``: the paper's ImageNet network, exactly timm's/torchvision's model (the
  tests check the parameter counts against them). Where timm has the network the name is an
  alias of timm's entrypoint (``timm_name``), so ``pretrained=True`` goes through timm's own
  hub mechanism.
* ``<arch>_cifar``: 10 classes, 32x32 input. An ImageNet stem divides the image by 4 before
  the first stage (a 7x7/2 conv and a max-pool, or two stride-2 convs), which leaves a 32x32
  image 1x1 by the last stage; the CIFAR forms remove that early downsampling so the last
  stage works on a 4x4 map, as the public CIFAR references do (kuangliu/pytorch-cifar). The
  network is built by timm and then adapted in place: strides set to 1 where only the stride
  changes, modules replaced where the kernel changes (``cifar=`` of each says which, and
  ``mixlab models`` prints it). Vision transformers need no surgery, only timm's own options.

CIFAR-10 references for these CIFAR layouts (kuangliu/pytorch-cifar, SGD, 200 epochs): VGG16
92.64%, ResNet18 93.02%, ResNet50 93.62%, RegNetX_200MF 94.24%, RegNetY_400MF 94.29%,
MobileNetV2 94.43%, DenseNet121 95.04%. kuangliu's RegNets keep stride 1 in the first two
stages (8x8 last map) and use a 64-wide stem; mixlab's keep timm's widths and stop at 4x4.
"""
# (no `from __future__ import annotations`: FX copies string annotations into traced code, TorchScript rejects them)

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch
from torch import nn
from timm.layers import ClassifierHead
from torchvision.models.googlenet import GoogLeNet as TorchvisionGoogLeNet
from timm.models.densenet import DenseNet, densenet121
from timm.models.efficientnet import EfficientNet, efficientnet_b0, mobilenetv1_100, mobilenetv2_100
from timm.models.inception_v3 import InceptionV3, inception_v3
from timm.models.regnet import RegNet, regnetx_002, regnety_004
from timm.models.resnet import ResNet, resnet18, resnet34, resnet50, seresnet18
from timm.models.swin_transformer import SwinTransformer, swin_tiny_patch4_window7_224
from timm.models.vgg import VGG, vgg16_bn
from timm.models.vision_transformer import VisionTransformer, vit_small_patch16_224, vit_tiny_patch16_224
from timm.models._features import FeatureListNet
from timm.models._registry import generate_default_cfgs, get_pretrained_cfg

from ..data.constants import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from ..registry import register_model
from ._timm_api import ClassifierApi, build, check_pool, linear_head

__all__ = ["GoogLeNet", "BASELINES"]

CNN = "baseline-cnn"
VIT = "baseline-vit"


class GoogLeNet(ClassifierApi, TorchvisionGoogLeNet):
    """torchvision's GoogLeNet (Inception v1) without the auxiliary heads, with timm's interface.

    The network and its initialisation are torchvision's (``aux_logits=False,
    init_weights=True``); this subclass only adds what mixlab and timm expect of a model:
    ``forward_features`` / ``forward_head``, ``reset_classifier``, ``feature_info``,
    ``num_features``, ``in_chans`` and ``global_pool`` (``"avg"``, or ``""``: no pooling, the
    classifier, if any, classifies every position).
    """

    classifier_name = "fc"

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.2,
                 global_pool: str = "avg"):
        check_pool(global_pool)
        super().__init__(num_classes=max(num_classes, 1), aux_logits=False, transform_input=False,
                         init_weights=True, dropout=drop_rate)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.fc.in_features
        if num_classes == 0:
            self.fc = nn.Identity()
        if in_chans != 3:
            self.conv1.conv = _new_conv(self.conv1.conv, in_chans=in_chans, init=_googlenet_init)
        self.feature_info = [
            dict(num_chs=64, reduction=2, module="conv1"),
            dict(num_chs=192, reduction=4, module="conv3"),
            dict(num_chs=480, reduction=8, module="inception3b"),
            dict(num_chs=832, reduction=16, module="inception4e"),
            dict(num_chs=1024, reduction=32, module="inception5b"),
        ]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision's order, one module per line (TorchScript cannot loop over a tuple of modules)
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4c(self.inception4b(self.inception4a(x)))
        x = self.maxpool4(self.inception4e(self.inception4d(x)))
        return self.inception5b(self.inception5a(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = self.dropout(torch.flatten(self.avgpool(x), 1))
            return x if pre_logits else self.fc(x)
        x = self.dropout(x)
        return x if pre_logits else self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _new_classifier(self, num_classes: int) -> nn.Module:
        fc = linear_head(self, self.head_hidden_size, num_classes)
        if num_classes > 0:  # torchvision's init of GoogLeNet's Linear layers
            _googlenet_init(fc.weight)
            nn.init.zeros_(fc.bias)
        return fc


def _googlenet_init(weight: torch.Tensor) -> None:
    nn.init.trunc_normal_(weight, mean=0.0, std=0.01, a=-2, b=2)  # torchvision's GoogLeNet init


def _resnet_init(weight: torch.Tensor) -> None:
    nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")  # timm's ResNet init


def _densenet_init(weight: torch.Tensor) -> None:
    nn.init.kaiming_normal_(weight)  # timm's DenseNet init


def _googlenet_entry(pretrained: bool = False, **kwargs) -> GoogLeNet:
    if pretrained:
        raise ValueError("mixlab does not load torchvision's GoogLeNet weights (they need transform_input "
                         "and the auxiliary heads); build with pretrained=False")
    return build(GoogLeNet, kwargs.pop("variant"), False, None, **kwargs)


# ----------------------------------------------------------------------------------------------
# CIFAR adaptation: in-place edits of a built network
# ----------------------------------------------------------------------------------------------

def _new_conv(old: nn.Conv2d, kernel_size: int | None = None, stride: int = 1, in_chans: int | None = None,
              init: Callable[[torch.Tensor], None] = _resnet_init) -> nn.Conv2d:
    """A conv like ``old`` (same channels, bias, device, dtype) with a new kernel/stride, 'same' padding."""
    k = kernel_size or old.kernel_size[0]
    new = nn.Conv2d(in_chans or old.in_channels, old.out_channels, k, stride=stride, padding=k // 2,
                    bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
    init(new.weight)
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def _stride1(model: nn.Module, name: str) -> None:
    """Set the stride-2 conv ``name`` to stride 1; its 'same' padding stays right for stride 1."""
    conv = model.get_submodule(name)
    k = conv.kernel_size[0]
    if not isinstance(conv, nn.Conv2d) or conv.stride != (2, 2) or conv.padding != ((k - 1) // 2,) * 2:
        raise RuntimeError(f"expected a stride-2 conv with symmetric padding at {name}, found {conv}; "
                           "timm's layout changed or the model was built with unsupported options")
    conv.stride = (1, 1)


def _need(model: nn.Module, name: str, cls: type, option_hint: str) -> None:
    if not isinstance(model.get_submodule(name), cls):
        raise ValueError(f"the CIFAR form replaces {name} ({cls.__name__}); it cannot be combined with "
                         f"{option_hint}")


def _adapt_resnet(model) -> dict[str, int]:
    _need(model, "conv1", nn.Conv2d, "stem_type (a deep stem)")
    _need(model, "maxpool", nn.MaxPool2d, "replace_stem_pool or aa_layer")
    model.conv1 = _new_conv(model.conv1, kernel_size=3, init=_resnet_init)
    model.maxpool = nn.Identity()
    return {"conv1": 2, "maxpool": 2}


def _adapt_densenet(model) -> dict[str, int]:
    _need(model, "features.conv0", nn.Conv2d, "stem_type (a deep stem)")
    _need(model, "features.pool0", nn.MaxPool2d, "aa_layer")
    model.features.conv0 = _new_conv(model.features.conv0, kernel_size=3, init=_densenet_init)
    model.features.pool0 = nn.Identity()
    return {"features.conv0": 2, "features.pool0": 2}


def _adapt_regnet(model) -> dict[str, int]:
    # RegNet has no max-pool: its first stage's stride-2 block plays that role.
    _stride1(model, "stem.conv")
    _stride1(model, "s1.b1.conv2.conv")
    _stride1(model, "s1.b1.downsample.conv")  # the shortcut of the same block, no extra reduction
    return {"stem.conv": 2, "s1.b1.conv2.conv": 2}


def _adapt_effnet(model) -> dict[str, int]:
    # MobileNetV1/V2 and EfficientNet: the stem conv and the first block of the second stage.
    _stride1(model, "conv_stem")
    _stride1(model, "blocks.1.0.conv_dw")
    return {"conv_stem": 2, "blocks.1.0.conv_dw": 2}


def _adapt_vgg(model) -> dict[str, int]:
    # VGG's five max-pools bring 32x32 to 1x1, where the 7x7 fc6 conv of the ImageNet head
    # (ConvMlp) would only see an upsampled copy of one vector: drop fc6/fc7 and classify
    # the 512 features directly, as the CIFAR references do.
    ref = model.head.fc.weight if isinstance(model.head.fc, nn.Linear) else next(model.parameters())
    model.pre_logits = nn.Identity()
    model.head = ClassifierHead(model.num_features, model.num_classes, pool_type=model.head.global_pool.pool_type,
                                drop_rate=model.drop_rate, device=ref.device, dtype=ref.dtype)
    if isinstance(model.head.fc, nn.Linear):
        nn.init.normal_(model.head.fc.weight, 0, 0.01)  # timm's VGG init for Linear layers
        nn.init.zeros_(model.head.fc.bias)
    model.head_hidden_size = model.num_features
    return {}


def _adapt_inception_v3(model) -> dict[str, int]:
    # Stride 1 and padding 1 in the stem convs, both stem max-pools removed: a 32x32 image
    # reaches Mixed_5b at 32x32 (35x35 at 299 natively), Mixed_6 at 15x15 (17x17) and
    # Mixed_7 at 7x7 (8x8), so every Inception block sees about its native grid.
    _need(model, "Pool1", nn.MaxPool2d, "other stem options")
    stem = model.Conv2d_1a_3x3.conv
    stem.stride, stem.padding = (1, 1), (1, 1)
    model.Conv2d_2a_3x3.conv.padding = (1, 1)
    model.Conv2d_4a_3x3.conv.padding = (1, 1)
    model.Pool1 = nn.Identity()
    model.Pool2 = nn.Identity()
    return {"Conv2d_1a_3x3": 2, "Pool1": 2, "Pool2": 2}


def _adapt_googlenet(model) -> dict[str, int]:
    model.conv1.conv = _new_conv(model.conv1.conv, kernel_size=3, init=_googlenet_init)
    model.maxpool1 = nn.Identity()
    return {"conv1": 2, "maxpool1": 2}


def _rescale_feature_info(model: nn.Module, removed: dict[str, int]) -> None:
    """Divide each ``feature_info`` reduction by the strides removed at or before its module."""
    names = [n for n, _ in model.named_modules()]
    pos = {n: i for i, n in enumerate(names)}
    for info in model.feature_info:
        mod = info["module"]
        last = max(i for i, n in enumerate(names) if n == mod or n.startswith(mod + "."))
        factor = math.prod(f for name, f in removed.items() if pos[name] <= last)
        info["reduction"] = info["reduction"] // factor


# ----------------------------------------------------------------------------------------------
# The table of baselines
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Baseline:
    """One architecture, registered as ``<name>_imagenet`` and ``<name>_cifar``."""

    name: str
    title: str
    family: str
    paper: str
    model_cls: type
    entry: Callable  # timm's (or mixlab's GoogLeNet) entrypoint fn(pretrained=False, **kwargs)
    timm_name: str | None  # None for torchvision's GoogLeNet
    cifar: str
    adapt: Callable[[nn.Module], dict[str, int]] | None = None  # None: timm options only
    cifar_kwargs: dict = field(default_factory=dict)  # defaults of the CIFAR form (users may override)
    # constructor arguments of parts the adaptation throws away, fixed so they cost nothing to build
    cifar_fixed: dict = field(default_factory=dict)
    imagenet_size: int = 224
    # the CIFAR form's last map at 32x32 (timm's pretrained_cfg["pool_size"]); most adaptations
    # leave a total stride of 8
    cifar_pool_size: Optional[Tuple[int, int]] = (4, 4)
    paper_figures: dict = field(default_factory=dict)


_RESNET_CIFAR = ("stem replaced after building (timm has no such option): 7x7/2 conv -> 3x3/1 conv, "
                 "max-pool removed; total stride 32 -> 8, last map 4x4 at 32x32")
_EFFNET_CIFAR = ("strides set to 1 after building: the stem conv and the first block of stage 2 "
                 "(blocks.1.0); total stride 32 -> 8, last map 4x4 at 32x32")
# the two ViT widths: the same paper, and a CIFAR form from timm's options alone
_VIT_PAPER = ("An Image is Worth 16x16 Words (Dosovitskiy et al., ICLR 2021); {} width from DeiT (Touvron et al., "
              "ICML 2021)")
_VIT_CIFAR = dict(cifar="timm options: img_size=32, patch_size=4 (8x8 = 64 tokens)",
                  cifar_kwargs=dict(img_size=32, patch_size=4),
                  cifar_pool_size=None)  # tokens, no map (as timm's ViT)

BASELINES: tuple[Baseline, ...] = (
    Baseline("vgg16_bn", "VGG-16-BN", CNN,
             "Very Deep Convolutional Networks for Large-Scale Image Recognition (Simonyan & Zisserman, ICLR 2015)",
             VGG, vgg16_bn, "vgg16_bn",
             "ImageNet head (7x7 fc6 conv + fc7, ConvMlp) replaced after building by global pool + one "
             "linear layer on the 512 features; the five max-pools kept (last map 1x1 at 32x32)",
             adapt=_adapt_vgg, cifar_fixed=dict(mlp_ratio=1 / 4096),  # fc6/fc7 1 channel wide, then dropped
             cifar_pool_size=(1, 1),
             paper_figures=dict(params=138e6)),
    Baseline("googlenet", "GoogLeNet (Inception v1)", CNN,
             "Going Deeper with Convolutions (Szegedy et al., CVPR 2015)",
             GoogLeNet, _googlenet_entry, None,
             "torchvision's network; stem changed after building: 7x7/2 conv1 -> 3x3/1, maxpool1 removed; "
             "total stride 32 -> 8, Inception 3/4/5 at 16/8/4 (28/14/7 natively), last map 4x4",
             adapt=_adapt_googlenet, paper_figures=dict(macs=1.5e9)),
    Baseline("inception_v3", "Inception-v3", CNN,
             "Rethinking the Inception Architecture for Computer Vision (Szegedy et al., CVPR 2016)",
             InceptionV3, inception_v3, "inception_v3",
             "stem changed after building (no upsampling): Conv2d_1a 3x3/2 -> 3x3/1, pad 1 on Conv2d_1a/2a/4a, "
             "Pool1 and Pool2 removed; Mixed_5/6/7 at 32/15/7 (35/17/8 natively at 299)",
             adapt=_adapt_inception_v3, imagenet_size=299, cifar_pool_size=(7, 7),
             paper_figures=dict(macs=5e9, top1=78.8)),
    Baseline("resnet18", "ResNet-18", CNN, "Deep Residual Learning for Image Recognition (He et al., CVPR 2016)",
             ResNet, resnet18, "resnet18", _RESNET_CIFAR,
             adapt=_adapt_resnet, paper_figures=dict(macs=1.8e9)),
    Baseline("resnet34", "ResNet-34", CNN, "Deep Residual Learning for Image Recognition (He et al., CVPR 2016)",
             ResNet, resnet34, "resnet34", _RESNET_CIFAR,
             adapt=_adapt_resnet, paper_figures=dict(macs=3.6e9)),
    Baseline("resnet50", "ResNet-50", CNN, "Deep Residual Learning for Image Recognition (He et al., CVPR 2016)",
             ResNet, resnet50, "resnet50", _RESNET_CIFAR,
             adapt=_adapt_resnet, paper_figures=dict(macs=3.8e9)),
    Baseline("seresnet18", "SE-ResNet-18", CNN, "Squeeze-and-Excitation Networks (Hu et al., CVPR 2018)",
             ResNet, seresnet18, "seresnet18", _RESNET_CIFAR, adapt=_adapt_resnet),
    Baseline("densenet121", "DenseNet-121", CNN,
             "Densely Connected Convolutional Networks (Huang et al., CVPR 2017)",
             DenseNet, densenet121, "densenet121",
             "stem replaced after building (timm has no such option): 7x7/2 conv0 -> 3x3/1, pool0 removed; "
             "total stride 32 -> 8, last map 4x4 at 32x32",
             adapt=_adapt_densenet, paper_figures=dict(top1=74.98)),
    Baseline("mobilenetv1", "MobileNetV1", CNN,
             "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications (Howard et al., 2017)",
             EfficientNet, mobilenetv1_100, "mobilenetv1_100", _EFFNET_CIFAR,
             adapt=_adapt_effnet, paper_figures=dict(params=4.2e6, macs=569e6, top1=70.6)),
    Baseline("mobilenetv2", "MobileNetV2", CNN,
             "MobileNetV2: Inverted Residuals and Linear Bottlenecks (Sandler et al., CVPR 2018)",
             EfficientNet, mobilenetv2_100, "mobilenetv2_100", _EFFNET_CIFAR,
             adapt=_adapt_effnet, paper_figures=dict(params=3.4e6, macs=300e6, top1=72.0)),
    Baseline("efficientnet_b0", "EfficientNet-B0", CNN,
             "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks (Tan & Le, ICML 2019)",
             EfficientNet, efficientnet_b0, "efficientnet_b0", _EFFNET_CIFAR,
             adapt=_adapt_effnet, paper_figures=dict(params=5.3e6, macs=0.39e9, top1=77.1)),
    Baseline("regnetx_200mf", "RegNetX-200MF", CNN, "Designing Network Design Spaces (Radosavovic et al., CVPR 2020)",
             RegNet, regnetx_002, "regnetx_002",
             "strides set to 1 after building: the 3x3/2 stem conv and the first block of stage 1 (its conv2 and "
             "shortcut; RegNet has no max-pool, that stride plays its role); total stride 32 -> 8, last map 4x4",
             adapt=_adapt_regnet, paper_figures=dict(params=2.7e6, macs=0.2e9, top1=68.9)),
    Baseline("regnety_400mf", "RegNetY-400MF", CNN, "Designing Network Design Spaces (Radosavovic et al., CVPR 2020)",
             RegNet, regnety_004, "regnety_004",
             "strides set to 1 after building: the 3x3/2 stem conv and the first block of stage 1 (its conv2 and "
             "shortcut; RegNet has no max-pool, that stride plays its role); total stride 32 -> 8, last map 4x4",
             adapt=_adapt_regnet, paper_figures=dict(params=4.3e6, macs=0.4e9, top1=74.1)),
    Baseline("vit_tiny", "ViT-Tiny/16", VIT, _VIT_PAPER.format("Tiny"), VisionTransformer, vit_tiny_patch16_224,
             "vit_tiny_patch16_224", **_VIT_CIFAR, paper_figures=dict(params=5.7e6, top1=72.2)),
    Baseline("vit_small", "ViT-Small/16", VIT, _VIT_PAPER.format("Small"), VisionTransformer, vit_small_patch16_224,
             "vit_small_patch16_224", **_VIT_CIFAR, paper_figures=dict(params=22e6, top1=79.8)),
    Baseline("swin_tiny", "Swin-T", VIT,
             "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows (Liu et al., ICCV 2021)",
             SwinTransformer, swin_tiny_patch4_window7_224, "swin_tiny_patch4_window7_224",
             "timm options: img_size=32, patch_size=2, window_size=4 (stages at 16/8/4/2; the last stage's "
             "window shrinks to its 2x2 map, as timm does)",
             cifar_kwargs=dict(img_size=32, patch_size=2, window_size=4), cifar_pool_size=(2, 2),
             paper_figures=dict(params=28e6, macs=4.5e9, top1=81.3)),
)


def _pretrained_cfg_of(b: Baseline, cifar: bool) -> dict:
    base = get_pretrained_cfg(b.timm_name) if b.timm_name else None
    cfg = dict(first_conv=base.first_conv if base else "conv1.conv",
               classifier=base.classifier if base else "fc", paper_name=b.paper)
    if cifar:
        return dict(cfg, input_size=(3, 32, 32), num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD, crop_pct=1.0,
                    interpolation="bilinear", fixed_input_size=base.fixed_input_size if base else False,
                    pool_size=b.cifar_pool_size)
    size = b.imagenet_size
    return dict(cfg, input_size=(3, size, size), num_classes=1000, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                crop_pct=0.875, interpolation="bilinear", pool_size=(size // 32, size // 32))


# ImageNet forms that alias timm's entrypoints take timm's own pretrained config; the others get
# theirs here, before the entrypoints are registered (timm reads a module's default_cfgs then).
default_cfgs = generate_default_cfgs({
    **{f"{b.name}_cifar": _pretrained_cfg_of(b, cifar=True) for b in BASELINES},
    **{f"{b.name}_imagenet": _pretrained_cfg_of(b, cifar=False) for b in BASELINES if b.timm_name is None},
})

_FEATURE_KWARGS = ("features_only", "out_indices", "feature_cls")


def _build_imagenet(b: Baseline, name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    if b.timm_name is None:
        return b.entry(pretrained=pretrained, variant=name, **kwargs)
    return b.entry(pretrained=pretrained, **kwargs)


def _build_cifar(b: Baseline, name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights (no CIFAR checkpoints are hosted); "
                         f"train it, or fine-tune {b.name}_imagenet")
    if not kwargs.get("pretrained_cfg"):
        kwargs["pretrained_cfg"] = get_pretrained_cfg(name).to_dict()
    moot = sorted(set(b.cifar_fixed) & set(kwargs))
    if moot:
        raise ValueError(f"{name} does not take {', '.join(moot)}: the CIFAR adaptation removes that part")
    kwargs = {**b.cifar_kwargs, **kwargs, **b.cifar_fixed}
    if b.adapt is None:  # timm's options do it all, features_only included
        return _build_imagenet(b, name, False, kwargs)
    features = {k: kwargs.pop(k) for k in _FEATURE_KWARGS if k in kwargs}
    model = _build_imagenet(b, name, False, kwargs)
    _rescale_feature_info(model, b.adapt(model))
    if not features.pop("features_only", False):
        return model
    if features.get("feature_cls", "list") not in ("list", FeatureListNet):
        raise ValueError(f"{name}: features_only supports timm's default feature_cls ('list') only")
    out_indices = features.get("out_indices", tuple(range(len(model.feature_info))))
    # timm flattens the first Sequential level when the tapped modules live inside one
    flatten = any("." in info["module"] for info in model.feature_info)
    pretrained_cfg = model.pretrained_cfg
    model = FeatureListNet(model, out_indices=out_indices, flatten_sequential=flatten)
    model.pretrained_cfg = model.default_cfg = pretrained_cfg
    return model


def _register(b: Baseline, module: str = __name__) -> None:
    """Register ``b``'s two forms as entrypoints of ``module``, whose ``default_cfgs`` must
    hold their pretrained configs (timm reads them from the entrypoint's module)."""
    import sys

    mod = sys.modules[module]

    def imagenet(pretrained=False, **kwargs):
        return _build_imagenet(b, f"{b.name}_imagenet", pretrained, kwargs)

    def cifar(pretrained=False, **kwargs):
        return _build_cifar(b, f"{b.name}_cifar", pretrained, kwargs)

    source = f"timm's ``{b.timm_name}``" if b.timm_name else "torchvision's GoogLeNet (aux_logits=False)"
    size = b.imagenet_size
    for fn, form, doc in ((imagenet, "imagenet", f"{b.title} (ImageNet, {size}x{size}): {source}."),
                          (cifar, "cifar", f"{b.title}, CIFAR form (10 classes, 32x32), built from {source}: "
                                           f"{b.cifar}.")):
        fn.__name__ = fn.__qualname__ = f"{b.name}_{form}"
        fn.__module__ = module
        fn.__doc__ = doc
        setattr(mod, fn.__name__, fn)
        mod.__all__.append(fn.__name__)
    register_model(family=b.family, paper=b.paper, model_cls=b.model_cls, input_size=(3, size, size),
                   num_classes=1000, paper_figures=b.paper_figures, timm_name=b.timm_name)(imagenet)
    register_model(family=b.family, paper=b.paper, model_cls=b.model_cls, input_size=(3, 32, 32),
                   num_classes=10, cifar=b.cifar)(cifar)


for _b in BASELINES:
    _register(_b)
del _b
