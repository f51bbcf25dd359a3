"""Any ``features_only`` backbone (mixlab's or timm's) as a Mask R-CNN backbone.

    image -> backbone stages (timm's features_only) -> NCHW maps at strides s_1 < ... < s_n
          -> torchvision's FeaturePyramidNetwork (+ LastLevelMaxPool: one more level at 2 s_n)
          -> OrderedDict {"0": ..., "1": ..., ..., "pool": ...}, every map ``out_channels`` wide

Hierarchical backbones (ResNet, ConvMLP, Conv2Former, AS-MLP, Swin-MLP) give their stages
as they are; maps a model returns channels-last (timm's Swin: ``output_fmt`` NHWC) are
permuted to NCHW. An isotropic backbone (ConvMixer, ViT: every stage at one stride s) gets a
simple feature pyramid from its last map, as ViTDet builds one: transposed 2x2 convolutions up
to the finer strides, max pooling down to the coarser ones, and a bilinear resize where the
ratio is not a power of two (ConvMixer's patch 7).

torchvision's ``AnchorGenerator`` and ``MultiScaleRoIAlign`` infer each level's stride from the
ratio of the image size to the map size, rounded to a power of two by ``MultiScaleRoIAlign``:
so every level here has a power-of-two stride (checked when the backbone is built).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from ..errors import UsageError

__all__ = ["create_feature_backbone", "BackboneFPN", "SimplePyramid", "group_norm", "freeze_stages",
           "load_backbone_weights"]

DEFAULT_PYRAMID_STRIDES = (4, 8, 16, 32)  # ViTDet's levels (it adds 64 by pooling, as LastLevelMaxPool does)


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with up to ``groups`` groups (fewer when ``channels`` is small)."""
    g = math.gcd(groups, channels)
    return nn.GroupNorm(g, channels)


def _is_power_of_two(x: float) -> bool:
    return x > 0 and float(x).is_integer() and (int(x) & (int(x) - 1)) == 0


def create_feature_backbone(name: str, default_img_size: int | None = None, **kwargs) -> nn.Module:
    """``features_only`` form of a registered mixlab model or any timm model; a clear error
    naming the model when it has none. ``default_img_size``: the input size given to mixlab
    models whose layout depends on it (AS-MLP, Swin-MLP) unless ``kwargs`` has one."""
    import timm

    from .. import registry

    if name in registry.list_models():
        if default_img_size is not None and registry.takes_img_size(name):
            kwargs.setdefault("img_size", default_img_size)
        create = partial(registry.create_model, name, features_only=True)
    elif timm.is_model(name):
        create = partial(timm.create_model, name, features_only=True)
    else:
        raise registry._unknown(name)
    try:
        try:
            model = create(**kwargs)
        except IndexError:
            # timm's default out_indices name five maps: a shallower model (a ConvMixer of
            # depth 2) has fewer; its last map is what a pyramid is built from anyway
            if "out_indices" in kwargs:
                raise
            model = create(out_indices=(-1,), **kwargs)
    except (RuntimeError, TypeError, AttributeError, NotImplementedError, AssertionError, IndexError) as e:
        if isinstance(e, TypeError) and "feature" not in str(e):
            raise  # a wrong architecture argument: its own message names it
        raise UsageError(f"backbone {name!r} has no features_only form (timm's feature extraction: the model "
                         f"cannot return its stage feature maps): {type(e).__name__}: {str(e).splitlines()[0][:200]}. "
                         "Pick a backbone listed by `mixlab models` or any timm model with features_only") from None
    info = getattr(model, "feature_info", None)
    if info is None or not hasattr(info, "reduction"):
        raise UsageError(f"backbone {name!r} has no features_only form: built with features_only=True it "
                         "declares no feature_info (stage strides and channels), so its stage maps cannot feed "
                         "a feature pyramid")
    return model


def _default_indices(reductions: list[int], levels: int = 4) -> list[int]:
    """The last ``levels`` stages with distinct strides (the last stage of each stride)."""
    last_of = {}
    for i, r in enumerate(reductions):
        last_of[r] = i
    return sorted(last_of.values())[-levels:]


class SimplePyramid(nn.Module):
    """Maps at ``strides`` from one map at stride ``in_stride`` (ViTDet's simple feature pyramid):
    each finer level by transposed 2x2 convolutions (GroupNorm + GELU between two of them),
    each coarser one by 2x2 max pooling, and a bilinear resize where the ratio is not a power of
    two. The output sizes are ceil(image size / stride), the sizes a strided backbone gives."""

    def __init__(self, channels: int, in_stride: int, strides=DEFAULT_PYRAMID_STRIDES):
        super().__init__()
        self.in_stride, self.strides = int(in_stride), tuple(int(s) for s in strides)
        self.levels = nn.ModuleList()
        for s in self.strides:
            if not _is_power_of_two(s):
                raise UsageError(f"pyramid strides must be powers of two (torchvision's RoIAlign rounds to them), "
                                 f"got {s}")
            ratio = self.in_stride / s
            layers: list[nn.Module] = []
            if ratio >= 2 and _is_power_of_two(ratio):
                for i in range(int(math.log2(ratio))):
                    if i:
                        layers += [group_norm(channels), nn.GELU()]
                    layers.append(nn.ConvTranspose2d(channels, channels, 2, stride=2))
            elif ratio <= 0.5 and _is_power_of_two(1 / ratio):
                layers.append(nn.MaxPool2d(int(1 / ratio), int(1 / ratio), ceil_mode=True))
            self.levels.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor, image_hw: tuple[int, int]) -> list[torch.Tensor]:
        out = []
        for s, level in zip(self.strides, self.levels):
            y = level(x)
            size = (math.ceil(image_hw[0] / s), math.ceil(image_hw[1] / s))
            if tuple(y.shape[-2:]) != size:  # a ratio that is no power of two, or a map cut short by the stem
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            out.append(y)
        return out


class BackboneFPN(nn.Module):
    """A features_only backbone + (simple pyramid) + FPN, returning torchvision's level dict.

    Args:
        body: a features_only model (timm's FeatureListNet / FeatureGetterNet ...).
        out_indices: which of its feature maps feed the pyramid (default: the last four with
            distinct strides); ignored for isotropic backbones (their last map is used).
        out_channels: FPN width; ``norm``: "gn" for GroupNorm in the FPN, None for none.
        pyramid_strides: the levels of an isotropic backbone's simple pyramid.
    """

    def __init__(self, body: nn.Module, out_channels: int = 256, out_indices=None, norm: str | None = "gn",
                 pyramid_strides=DEFAULT_PYRAMID_STRIDES, name: str = "backbone"):
        super().__init__()
        info = body.feature_info
        reductions, channels = list(info.reduction()), list(info.channels())
        self.body = body
        fmt = getattr(body, "output_fmt", "NCHW")
        self.channels_last_out = str(getattr(fmt, "value", fmt)).upper() == "NHWC"
        self.isotropic = len(reductions) > 0 and len(set(reductions)) == 1
        if self.isotropic:
            self.indices = [len(reductions) - 1]
            self.pyramid = SimplePyramid(channels[-1], reductions[-1], pyramid_strides)
            self.strides = list(self.pyramid.strides)
            in_channels = [channels[-1]] * len(self.strides)
        else:
            idx = list(out_indices) if out_indices else _default_indices(reductions)
            bad = [i for i in idx if not -len(reductions) <= i < len(reductions)]
            if bad:
                raise UsageError(f"out_indices {idx} of {name}: it has {len(reductions)} feature maps "
                                 f"(strides {reductions})")
            idx = [i % len(reductions) for i in idx]
            strides = [reductions[i] for i in idx]
            if any(b <= a for a, b in zip(strides, strides[1:])):
                raise UsageError(f"the feature maps {idx} of {name} have strides {strides}; a feature pyramid needs "
                                 "strictly increasing strides (set detector.out_indices)")
            if not all(_is_power_of_two(s) for s in strides):
                raise UsageError(f"the feature maps {idx} of {name} have strides {strides}; torchvision's RoIAlign "
                                 "needs power-of-two strides (set detector.out_indices to maps that have them)")
            self.indices, self.strides, self.pyramid = idx, strides, None
            in_channels = [channels[i] for i in idx]
        norm_layer = partial(group_norm) if norm == "gn" else None
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool(),
                                         norm_layer=norm_layer)
        self.out_channels = out_channels
        self.level_names = [str(i) for i in range(len(in_channels))]
        self.frozen_norms: list[nn.Module] = []  # set by freeze_stages (plain list: not submodules)

    @property
    def feature_strides(self) -> list[int]:
        """The strides of the FPN's levels, the pooled one last."""
        return [*self.strides, 2 * self.strides[-1]]

    def stage_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The NCHW maps that reach the FPN (after the simple pyramid, for isotropic backbones)."""
        feats = self.body(x)
        if isinstance(feats, dict):
            feats = list(feats.values())
        feats = [feats[i] for i in self.indices]
        if self.channels_last_out:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        if self.pyramid is not None:
            feats = self.pyramid(feats[0], tuple(x.shape[-2:]))
        return feats

    def train(self, mode: bool = True):
        """As nn.Module's, but the BatchNorm layers of frozen stages stay in eval mode."""
        super().train(mode)
        for m in self.frozen_norms:
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        maps = OrderedDict((n, f) for n, f in zip(self.level_names, self.stage_maps(x)))
        return self.fpn(maps)


def freeze_stages(backbone: BackboneFPN, trainable_stages: int | None) -> int:
    """Freeze the backbone up to its last ``trainable_stages`` feature stages (None: train it
    all; 0: freeze all of it). Parameters are frozen in their registration order up to the
    first parameter of the first trainable stage's module; frozen BatchNorm layers keep their
    statistics (they stay in eval mode). Returns the number of frozen parameters."""
    if trainable_stages is None:
        return 0
    body = backbone.body
    modules = [d["module"] for d in body.feature_info.get_dicts()]
    trainable_stages = int(trainable_stages)
    if not 0 <= trainable_stages <= len(modules):
        raise UsageError(f"detector.trainable_stages must be between 0 and {len(modules)} (the backbone's feature "
                         f"stages), or null for all, got {trainable_stages}")
    names = [n for n, _ in body.named_parameters()]

    def norm(n: str) -> str:
        n = n[len("model."):] if n.startswith("model.") else n
        return n.replace("_", ".")

    stop = len(names)
    if trainable_stages > 0:
        first = norm(modules[len(modules) - trainable_stages]) + "."
        stop = next((i for i, n in enumerate(names) if norm(n).startswith(first)), None)
        if stop is None:
            raise UsageError(f"cannot find the parameters of stage {modules[len(modules) - trainable_stages]!r} "
                             "in the backbone to freeze the stages before it; use detector.trainable_stages=null")
    frozen = set(names[:stop])
    for n, p in body.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    frozen_modules = [m for n, m in body.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                      and all(p.requires_grad is False for p in m.parameters(recurse=False))
                      and any(True for _ in m.parameters(recurse=False))]
    backbone.frozen_norms = frozen_modules
    return sum(p.numel() for n, p in body.named_parameters() if n in frozen)


def load_backbone_weights(backbone: BackboneFPN, state_dict: dict[str, torch.Tensor], source: str) -> int:
    """Load a classifier's weights (a mixlab run's, or a state_dict file) into the backbone's
    stages: its names are matched after dropping the features_only wrapper's ``model.`` prefix,
    a Mask R-CNN run's ``backbone.body.`` prefix, and reading ``_`` as ``.`` (timm flattens
    ``stages.0`` to ``stages_0``); the classifier head is left out. Every backbone tensor must be
    found, with its shape. Returns the number of tensors loaded."""
    def key(n: str) -> str:
        for prefix in ("backbone.body.", "model."):
            if n.startswith(prefix):
                n = n[len(prefix):]
        return n.replace("_", ".")

    given: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        given.setdefault(key(k), v)
    own = backbone.body.state_dict()
    missing, shape, load = [], [], {}
    for k, v in own.items():
        src = given.get(key(k))
        if src is None:
            missing.append(k)
        elif tuple(src.shape) != tuple(v.shape):
            shape.append(f"{k}: file {tuple(src.shape)} vs backbone {tuple(v.shape)}")
        else:
            load[k] = src
    if missing or shape:
        few = (missing[:5] + shape[:5])
        raise UsageError(f"--init {source} does not fit the backbone: {len(missing)} tensor(s) missing, "
                         f"{len(shape)} of another shape ({'; '.join(few)}); is it a checkpoint of another model?")
    backbone.body.load_state_dict(load, strict=True)
    return len(load)
