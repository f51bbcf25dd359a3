"""Swin-MLP (microsoft/Swin-Transformer, ``models/swin_mlp.py``; the Swin Transformer paper's MLP variant).

Swin Transformer with window attention replaced by a spatial MLP: inside each window, a grouped
1x1 ``Conv1d`` across the window's tokens (one group per head, so each head of C / heads channels
has its own token-mixing matrix). Every second block works on shifted windows, made by zero
padding the map by ``window - shift`` on the top/left and ``shift`` on the bottom/right
(``shift = window // 2``) instead of the cyclic shift of Swin Transformer, then cropping back.
A stage whose map is no larger than the window uses one window covering the whole map and no
shift, as in the official code.

mixlab keeps the official module and parameter names (``layers.i.blocks.j.spatial_mlp``,
``layers.i.downsample`` at the end of stages 1-3...), so official checkpoints load without
renaming. Tensors flow as (B, H, W, C) between blocks instead of the official (B, H*W, C), which
lets one model take any input size the windows admit instead of only its build size.

The spatial MLP's weights depend on the window size of each stage, which depends on the size
the model is built for (``img_size``): a model built for 256 has 8x8 windows in all four stages;
at run time the map of stage i must be a multiple of that stage's window, and check_input_size
says which sizes that allows.
"""
# (no `from __future__ import annotations`: FX copies string annotations into traced code, TorchScript rejects them)

import math
from functools import partial
from typing import List, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, Mlp, register_notrace_function, to_2tuple
from timm.models._registry import generate_default_cfgs

from ..data.constants import CIFAR_MEAN, CIFAR_STD
from ..registry import register_model
from ._init import init_trunc_normal_
from ._swin_layout import MergingStage, SwinLayoutNet
from ._timm_api import build

__all__ = ["SwinMLP", "SwinMLPBlock", "PatchMerging", "window_partition", "window_reverse"]

PAPER = "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows (Liu et al., ICCV 2021), Swin-MLP"


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/window * W/window, window, window, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


class SwinMLPBlock(nn.Module):
    """Norm, (shifted-)window spatial MLP, residual; norm, channel MLP, residual. (B, H, W, C) in and out."""

    def __init__(self, dim: int, input_resolution, num_heads: int, window_size: int = 7, shift_size: int = 0,
                 mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"the channels ({dim}) must split evenly into {num_heads} heads")
        self.dim, self.num_heads = dim, num_heads
        if min(input_resolution) <= window_size:
            # the official rule: a map no larger than the window is one window, not shifted
            window_size, shift_size = min(input_resolution), 0
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size), got {shift_size} for window {window_size}")
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = norm_layer(dim)
        tokens = num_heads * window_size ** 2
        self.spatial_mlp = nn.Conv1d(tokens, tokens, kernel_size=1, groups=num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def _spatial_mix(self, x):
        ws, shift, heads = self.window_size, self.shift_size, self.num_heads
        if shift > 0:  # (left, right, top, bottom) = (ws - shift, shift, ws - shift, shift), zeros
            x = F.pad(x, (0, 0, ws - shift, shift, ws - shift, shift))
        _, hp, wp, c = x.shape
        win = window_partition(x, ws).view(-1, ws * ws, heads, c // heads)
        win = win.transpose(1, 2).reshape(-1, heads * ws * ws, c // heads)
        win = self.spatial_mlp(win)
        win = win.view(-1, heads, ws * ws, c // heads).transpose(1, 2).reshape(-1, ws, ws, c)
        x = window_reverse(win, ws, hp, wp)
        if shift > 0:
            x = x[:, ws - shift:hp - shift, ws - shift:wp - shift, :]
        return x

    def forward(self, x):
        x = x + self.drop_path(self._spatial_mix(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}")


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated in the official order, LayerNorm, linear 4C -> 2C. (B, H, W, C)."""

    def __init__(self, dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class SwinMLPStage(MergingStage):
    """Blocks (window, then shifted window, ...), then patch merging for stages 1-3 (official ``BasicLayer``)."""

    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio, drop, drop_path, downsample):
        super().__init__([
            SwinMLPBlock(dim, input_resolution, num_heads, window_size,
                         shift_size=0 if i % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio, drop=drop,
                         drop_path=drop_path[i])
            for i in range(depth)], PatchMerging(dim) if downsample else None)


class SwinMLP(SwinLayoutNet):
    """Swin-MLP.

    ``forward_features`` gives the normalised (B, H/32, W/32, C') map, NHWC as timm's Swin. Features
    (``forward_intermediates``, ``features_only``): each stage's output before patch merging, NCHW
    (or NHWC with ``output_fmt="NHWC"``); ``norm=True`` applies the final norm to the last.

    Args:
        img_size: the size the model is built for; it fixes each stage's window (and so the
            spatial MLP's weight shapes). Every stage's map must be a multiple of the window.
        patch_size, in_chans, num_classes, embed_dim, depths, num_heads, window_size, mlp_ratio,
            drop_rate, drop_path_rate, patch_norm: as in the official model (its ``ape`` option,
            unused by every released variant, is not implemented).
        global_pool: ``avg`` or ``''``.
    """

    feature_fmts = ("NCHW", "NHWC")

    def __init__(self, img_size=224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size: int = 7,
                 mlp_ratio: float = 4.0, drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 patch_norm: bool = True, global_pool: str = "avg"):
        if len(num_heads) != len(depths):
            raise ValueError(f"num_heads ({len(num_heads)} values) needs one value per stage ({len(depths)})")
        h, w = to_2tuple(img_size)
        multiple = patch_size * 2 ** (len(depths) - 1)
        if h % multiple or w % multiple:
            raise ValueError(f"Swin-MLP with patch {patch_size} and {len(depths)} stages is built for sizes that "
                             f"are multiples of {multiple}, got img_size {h}x{w}")
        grid = (h // patch_size, w // patch_size)

        def stage(i: int, dim: int, drop_path: List[float], downsample: bool) -> SwinMLPStage:
            res = (grid[0] // 2 ** i, grid[1] // 2 ** i)
            return SwinMLPStage(dim, res, len(drop_path), num_heads[i], window_size, mlp_ratio, drop_rate, drop_path,
                                downsample)

        super().__init__(stage, img_size, patch_size, in_chans, num_classes, embed_dim, depths, drop_rate,
                         drop_path_rate, nn.LayerNorm, patch_norm, global_pool, output_fmt="NHWC")
        self._set_size_rule()
        self.check_input_size(h, w)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # the official init; its LayerNorms' ones and zeros are PyTorch's own
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            init_trunc_normal_(m)

    def stage_windows(self) -> List[int]:
        return [stage.blocks[0].window_size if len(stage.blocks) else 1 for stage in self.layers]

    def input_multiple(self) -> int:
        """Height and width must be multiples of this (the patch, the merges and every stage's window)."""
        mult = self.patch_size * 2 ** (self.num_layers - 1)
        for i, ws in enumerate(self.stage_windows()):
            mult = math.lcm(mult, self.patch_size * 2 ** i * ws)
        return mult

    def _set_size_rule(self) -> None:
        # plain attributes the forward's size check reads (TorchScript and FX cannot run the methods above)
        self.size_multiple = self.input_multiple()
        self.size_rule = (f"this Swin-MLP (built for {self.img_size[0]}x{self.img_size[1]}: patch {self.patch_size}, "
                          f"windows {tuple(self.stage_windows())} per stage)")

    def check_input_size(self, h: int, w: int) -> None:
        """Raise ValueError unless (h, w) is a size this model can take."""
        _check_size(h, w, self.size_multiple, self.size_rule)

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        return checked_input(x, self.size_multiple, self.size_rule)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        self._set_size_rule()  # the windows of the stages left
        return take_indices

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean((1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _check_size(h: int, w: int, multiple: int, rule: str) -> None:
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
        raise ValueError(
            f"{rule} needs height and width that are multiples of {multiple}, got {h}x{w} (every stage's map must "
            f"be a whole number of windows; build the model for the size you need with img_size=, and a "
            f"window_size that divides its stage maps)")


# one leaf call for FX (it reads the input size), so traced models still check it; its name has no
# leading "_" because FX's autowrap skips such names
@register_notrace_function
def checked_input(x: torch.Tensor, multiple: int, rule: str) -> torch.Tensor:
    _check_size(x.shape[-2], x.shape[-1], multiple, rule)
    return x


def _cfg(input_size=(3, 224, 224), num_classes=1000, crop_pct=0.9, pool_size=(7, 7), **kwargs):
    return dict(input_size=input_size, num_classes=num_classes, pool_size=pool_size, crop_pct=crop_pct,
                interpolation="bicubic", fixed_input_size=True, first_conv="patch_embed.proj", classifier="head",
                paper_name=PAPER, **kwargs)


default_cfgs = generate_default_cfgs({
    "swin_mlp_tiny_c24": _cfg(input_size=(3, 256, 256), pool_size=(8, 8)),
    "swin_mlp_tiny_c12": _cfg(input_size=(3, 256, 256), pool_size=(8, 8)),
    "swin_mlp_tiny_c6": _cfg(input_size=(3, 256, 256), pool_size=(8, 8)),
    "swin_mlp_base": _cfg(),
    "swin_mlp_tiny_cifar": _cfg(input_size=(3, 32, 32), num_classes=10, pool_size=(2, 2), mean=CIFAR_MEAN,
                                std=CIFAR_STD, crop_pct=1.0),
})


def _create(variant: str, pretrained: bool, defaults: dict, **kwargs):
    # features come from forward_intermediates: the stage outputs sit inside layers.i (before merging)
    feature_cfg = dict(feature_cls="getter", out_indices=(0, 1, 2, 3))
    return build(SwinMLP, variant, pretrained, feature_cfg, **{**defaults, **kwargs})


_register = partial(register_model, family="swin_mlp", paper=PAPER, model_cls=SwinMLP)
_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), window_size=8, img_size=256)


@_register(input_size=(3, 256, 256), paper_figures=dict(params=20e6, macs=4.0e9, top1=79.4, throughput=807))
def swin_mlp_tiny_c24(pretrained=False, **kwargs):
    """SwinMLP-T/C24: 24 channels per head (heads 4-8-16-32), window 8, 256x256 (official drop_path_rate 0.2)."""
    return _create("swin_mlp_tiny_c24", pretrained, dict(_TINY, num_heads=(4, 8, 16, 32)), **kwargs)


@_register(input_size=(3, 256, 256), paper_figures=dict(params=21e6, macs=4.0e9, top1=79.6, throughput=792))
def swin_mlp_tiny_c12(pretrained=False, **kwargs):
    """SwinMLP-T/C12: 12 channels per head (heads 8-16-32-64), window 8, 256x256."""
    return _create("swin_mlp_tiny_c12", pretrained, dict(_TINY, num_heads=(8, 16, 32, 64)), **kwargs)


@_register(input_size=(3, 256, 256), paper_figures=dict(params=23e6, macs=4.0e9, top1=79.7, throughput=766))
def swin_mlp_tiny_c6(pretrained=False, **kwargs):
    """SwinMLP-T/C6: 6 channels per head (heads 16-32-64-128), window 8, 256x256."""
    return _create("swin_mlp_tiny_c6", pretrained, dict(_TINY, num_heads=(16, 32, 64, 128)), **kwargs)


@_register(paper_figures=dict(params=61e6, macs=10.4e9, top1=81.3, throughput=409))
def swin_mlp_base(pretrained=False, **kwargs):
    """SwinMLP-B: C=128, depths 2-2-18-2, heads 4-8-16-32 (C32), window 7, 224x224."""
    defaults = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7, img_size=224)
    return _create("swin_mlp_base", pretrained, defaults, **kwargs)


@_register(input_size=(3, 32, 32), num_classes=10,
           cifar="SwinMLP-T/C24 blocks (C=96, depths 2-2-6-2, heads 4-8-16-32) with patch 2 and window 4: maps of "
                 "16/8/4/2 tokens, 4x4 windows (shifted) in stages 1-2, one whole-map window in stages 3-4")
def swin_mlp_tiny_cifar(pretrained=False, **kwargs):
    """SwinMLP-T/C24 for 32x32 inputs and 10 classes.

    Patch 4 would leave 8x8 tokens in stage 1 and a 1x1 map in stage 4. Patch 2 gives 16x16,
    8x8, 4x4 and 2x2 maps; window 4 then gives 4x4 windows (16 tokens mixed per head) with the
    official shifted-window alternation in stages 1 and 2, while stages 3 and 4 are no larger
    than the window and become a single unshifted window over the whole map, the same rule the
    official 256x256 model applies to its 8x8 last stage. Inputs must be multiples of 32.
    """
    defaults = dict(_TINY, num_heads=(4, 8, 16, 32), patch_size=2, window_size=4, img_size=32, num_classes=10)
    return _create("swin_mlp_tiny_cifar", pretrained, defaults, **kwargs)
