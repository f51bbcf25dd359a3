"""AS-MLP ("AS-MLP: An Axial Shifted MLP Architecture for Vision", Lian et al., ICLR 2022).

The network of the official code (svip-lab/AS-MLP, ``models/as_mlp.py``), with the same module
names, so an official state_dict loads as is, and the official CUDA-only cupy shift replaced by
:func:`mixlab.ops.axial_shift` (same result, runs on CPU and GPU, see that module for the
formulation and its timings).

Layout, all in NCHW: 4x4 patch convolution + GroupNorm(1 group); four stages of axial-shifted
blocks, stages 1-3 ending with patch merging (2x2 neighbours concatenated, GroupNorm, 1x1 conv
4C -> 2C without bias); GroupNorm, global average pool, linear head. Every "norm" of the
official model is a GroupNorm with one group (LayerNorm over C, H and W), every channel
projection a 1x1 convolution.

Block: ``x + AxialShift(norm1(x))`` then ``x + Mlp(norm2(x))``, where AxialShift is conv1, norm1,
GELU, then a W-shift branch (shift, conv2_1, GELU) and an H-shift branch (shift, conv2_2, GELU)
whose sum goes through norm2 and conv3.

Ablation switches (the paper's section 4.3), all constructor arguments: ``shift_size``,
``dilation``, ``padding`` (zero / reflect / replicate / circular) and ``connection``
(``parallel``, the paper's default, or ``serial``: the H shift applied to the output of the
W branch instead of to the block input; mixlab's choice of order, the paper does not say which
comes first). With the defaults the model is the official one.
"""
# (no `from __future__ import annotations`: FX copies string annotations into traced code, TorchScript rejects them)

from functools import partial

import torch
from torch import nn
from typing import List

from timm.layers import DropPath, GroupNorm1, Mlp, register_notrace_function, to_2tuple
from timm.models._registry import generate_default_cfgs

from ..data.constants import CIFAR_MEAN, CIFAR_STD
from ..ops.axial_shift import PADDING_MODES, axial_shift
from ..registry import register_model
from ._init import init_trunc_normal_
from ._swin_layout import MergingStage, SwinLayoutNet
from ._timm_api import build

__all__ = ["ASMLP", "AxialShift", "AxialShiftedBlock", "PatchMerging"]

PAPER = "AS-MLP: An Axial Shifted MLP Architecture for Vision (Lian et al., ICLR 2022)"
CONNECTIONS = ("parallel", "serial")


class AxialShift(nn.Module):
    """The token-mixing part of an AS-MLP block (official name and parameter names)."""

    def __init__(self, dim: int, shift_size: int = 5, dilation: int = 1, padding: str = "zero",
                 connection: str = "parallel", as_bias: bool = True, act_layer=nn.GELU):
        super().__init__()
        self.dim = dim
        self.shift_size = shift_size
        self.dilation = dilation
        self.padding = padding
        self.connection = connection
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=as_bias)
        self.conv2_1 = nn.Conv2d(dim, dim, 1, bias=as_bias)  # after the shift along W
        self.conv2_2 = nn.Conv2d(dim, dim, 1, bias=as_bias)  # after the shift along H
        self.conv3 = nn.Conv2d(dim, dim, 1, bias=as_bias)
        self.actn = act_layer()
        self.norm1 = GroupNorm1(dim)
        self.norm2 = GroupNorm1(dim)

    def _shift(self, x, dim: int):
        return axial_shift(x, self.shift_size, dim, self.dilation, self.padding)

    def forward(self, x):
        x = self.actn(self.norm1(self.conv1(x)))
        x_lr = self.actn(self.conv2_1(self._shift(x, 3)))
        if self.connection == "parallel":
            x = x_lr + self.actn(self.conv2_2(self._shift(x, 2)))
        else:
            x = self.actn(self.conv2_2(self._shift(x_lr, 2)))
        return self.conv3(self.norm2(x))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, shift_size={self.shift_size}, dilation={self.dilation}, "
                f"padding={self.padding}, connection={self.connection}")


class AxialShiftedBlock(nn.Module):
    def __init__(self, dim: int, shift_size: int = 5, dilation: int = 1, padding: str = "zero",
                 connection: str = "parallel", mlp_ratio: float = 4.0, as_bias: bool = True,
                 drop: float = 0.0, drop_path: float = 0.0, act_layer=nn.GELU):
        super().__init__()
        self.norm1 = GroupNorm1(dim)
        self.axial_shift = AxialShift(dim, shift_size, dilation, padding, connection, as_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = GroupNorm1(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop, use_conv=True)

    def forward(self, x):
        x = x + self.drop_path(self.axial_shift(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated in the official order, GroupNorm, 1x1 conv 4C -> 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.norm = GroupNorm1(4 * dim)
        self.reduction = nn.Conv2d(4 * dim, 2 * dim, 1, bias=False)

    def forward(self, x):
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], 1)
        return self.reduction(self.norm(x))


class ASMLPStage(MergingStage):
    """Blocks, then (stages 1-3) patch merging: the official ``BasicLayer`` and its key names."""

    def __init__(self, dim: int, depth: int, downsample: bool, drop_path, **block_kwargs):
        super().__init__([AxialShiftedBlock(dim, drop_path=drop_path[i], **block_kwargs) for i in range(depth)],
                         PatchMerging(dim) if downsample else None)


class ASMLP(SwinLayoutNet):
    """AS-MLP.

    Features (``forward_intermediates``, ``features_only``): each stage's output before patch
    merging; ``norm=True`` applies the final norm to the last.

    Args:
        img_size: the size the model is built for; any height and width that are multiples of
            ``patch_size * 2 ** (len(depths) - 1)`` are accepted at run time.
        patch_size, in_chans, num_classes, embed_dim, depths, mlp_ratio, as_bias, drop_rate,
            drop_path_rate, patch_norm: as in the official model.
        shift_size: channel groups of the axial shift (5 in the paper's models).
        dilation: spacing of the shift offsets (paper ablation; 1 = official).
        padding: ``zero`` (official), ``reflect``, ``replicate`` or ``circular``.
        connection: ``parallel`` (official) or ``serial`` horizontal and vertical shifts.
        global_pool: ``avg`` or ``''`` (no pooling: the classifier, if any, classifies every
            position of the normalised map; NCHW out).
    """

    def __init__(self, img_size=224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths=(2, 2, 6, 2), shift_size: int = 5, dilation: int = 1,
                 padding: str = "zero", connection: str = "parallel", mlp_ratio: float = 4.0,
                 as_bias: bool = True, drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 patch_norm: bool = True, global_pool: str = "avg"):
        if padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {', '.join(PADDING_MODES)}, got {padding!r}")
        if connection not in CONNECTIONS:
            raise ValueError(f"connection must be one of {', '.join(CONNECTIONS)}, got {connection!r}")
        if int(shift_size) != shift_size or shift_size < 1 or int(dilation) != dilation or dilation < 1:
            raise ValueError(f"shift_size and dilation must be positive integers, got {shift_size!r}, {dilation!r}")
        shift_size, dilation = int(shift_size), int(dilation)
        _check_size(*to_2tuple(img_size), patch_size, len(depths), shift_size, dilation, padding)
        block_kwargs = dict(shift_size=shift_size, dilation=dilation, padding=padding, connection=connection,
                            mlp_ratio=mlp_ratio, as_bias=as_bias, drop=drop_rate)

        def stage(i: int, dim: int, drop_path: List[float], downsample: bool) -> ASMLPStage:
            return ASMLPStage(dim, len(drop_path), downsample, drop_path, **block_kwargs)

        super().__init__(stage, img_size, patch_size, in_chans, num_classes, embed_dim, depths, drop_rate,
                         drop_path_rate, GroupNorm1, patch_norm, global_pool, output_fmt="NCHW")
        self.shift_size, self.dilation, self.padding = shift_size, dilation, padding
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # the official init touches Linear and LayerNorm only: its 1x1 convolutions keep
        # PyTorch's default init, and so do mixlab's
        if isinstance(m, nn.Linear):
            init_trunc_normal_(m)

    def check_input_size(self, h: int, w: int) -> None:
        """Raise ValueError unless (h, w) is a size this model can take."""
        _check_size(h, w, self.patch_size, self.num_layers, self.shift_size, self.dilation, self.padding)

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        return checked_input(x, self.patch_size, self.num_layers, self.shift_size, self.dilation, self.padding)

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean((2, 3))
            return x if pre_logits else self.head(x)
        return x if pre_logits else self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _check_size(h: int, w: int, patch_size: int, num_layers: int, shift_size: int, dilation: int,
                padding: str) -> None:
    mult = patch_size * 2 ** (num_layers - 1)
    if h <= 0 or w <= 0 or h % mult or w % mult:
        raise ValueError(f"AS-MLP with patch {patch_size} and {num_layers} stages needs height and "
                         f"width that are multiples of {mult}, got {h}x{w}")
    last = min(h, w) // mult
    pad = (shift_size // 2) * dilation
    if (padding == "reflect" and pad >= last) or (padding == "circular" and pad > last):
        bound = "larger than" if padding == "reflect" else "at least"
        raise ValueError(f"{padding} padding with shift_size {shift_size} and dilation {dilation} "
                         f"pads {pad} positions, so the last stage's map must be {bound} {pad}; got "
                         f"{last} for a {h}x{w} input (use a larger input, or a smaller shift or dilation)")


# one leaf call for FX (it reads the input size), so traced models still check it; its name has no
# leading "_" because FX's autowrap skips such names
@register_notrace_function
def checked_input(x: torch.Tensor, patch_size: int, num_layers: int, shift_size: int, dilation: int,
                  padding: str) -> torch.Tensor:
    _check_size(x.shape[-2], x.shape[-1], patch_size, num_layers, shift_size, dilation, padding)
    return x


def _cfg(input_size=(3, 224, 224), num_classes=1000, crop_pct=0.9, pool_size=(7, 7), **kwargs):
    return dict(input_size=input_size, num_classes=num_classes, pool_size=pool_size, crop_pct=crop_pct,
                interpolation="bicubic", first_conv="patch_embed.proj", classifier="head",
                paper_name=PAPER, **kwargs)


default_cfgs = generate_default_cfgs({
    "asmlp_t": _cfg(),
    "asmlp_s": _cfg(),
    "asmlp_b": _cfg(),
    "asmlp_t_cifar": _cfg(input_size=(3, 32, 32), num_classes=10, pool_size=(2, 2), mean=CIFAR_MEAN, std=CIFAR_STD,
                          crop_pct=1.0),
})


def _create(variant: str, pretrained: bool, defaults: dict, **kwargs):
    # features come from forward_intermediates: the stage outputs sit inside layers.i (before merging)
    feature_cfg = dict(feature_cls="getter", out_indices=(0, 1, 2, 3))
    return build(ASMLP, variant, pretrained, feature_cfg, **{**defaults, **kwargs})


_register = partial(register_model, family="asmlp", paper=PAPER, model_cls=ASMLP)


@_register(paper_figures=dict(params=28e6, macs=4.4e9, top1=81.3, throughput=1047))
def asmlp_t(pretrained=False, **kwargs):
    """AS-MLP-T: C=96, depths (2, 2, 6, 2), shift 5, 224x224 (official drop_path_rate 0.2 for training)."""
    return _create("asmlp_t", pretrained, dict(embed_dim=96, depths=(2, 2, 6, 2)), **kwargs)


@_register(paper_figures=dict(params=50e6, macs=8.5e9, top1=83.1, throughput=619))
def asmlp_s(pretrained=False, **kwargs):
    """AS-MLP-S: C=96, depths (2, 2, 18, 2), shift 5, 224x224 (official drop_path_rate 0.3 for training)."""
    return _create("asmlp_s", pretrained, dict(embed_dim=96, depths=(2, 2, 18, 2)), **kwargs)


@_register(paper_figures=dict(params=88e6, macs=15.2e9, top1=83.3, throughput=455))
def asmlp_b(pretrained=False, **kwargs):
    """AS-MLP-B: C=128, depths (2, 2, 18, 2), shift 5, 224x224 (official drop_path_rate 0.5 for training)."""
    return _create("asmlp_b", pretrained, dict(embed_dim=128, depths=(2, 2, 18, 2)), **kwargs)


@_register(input_size=(3, 32, 32), num_classes=10,
           cifar="AS-MLP-T blocks (C=96, depths 2-2-6-2, shift 5) with patch 2 instead of 4: stages at 16/8/4/2 "
                 "instead of 8/4/2/1, so every stage keeps a map the axial shifts can move along")
def asmlp_t_cifar(pretrained=False, **kwargs):
    """AS-MLP-T for 32x32 inputs and 10 classes.

    Patch 4 (the ImageNet stem) would leave a 1x1 map in the last stage, where every shift is
    either the identity or all zeros, and a 2x2 map in stage 3. Patch 2 gives 16x16, 8x8, 4x4 and
    2x2 maps, the same four stages and widths as AS-MLP-T, at about a quarter of the MACs that
    patch 1 would cost; inputs must be multiples of 16.
    """
    defaults = dict(embed_dim=96, depths=(2, 2, 6, 2), patch_size=2, img_size=32, num_classes=10)
    return _create("asmlp_t_cifar", pretrained, defaults, **kwargs)
