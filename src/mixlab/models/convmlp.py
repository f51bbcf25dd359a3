"""ConvMLP ("ConvMLP: Hierarchical Convolutional MLPs for Vision", Li et al., 2021).

The network, as the official code (SHI-Labs/Convolutional-MLPs) builds it:

* a convolutional tokenizer: three 3x3 conv-BN-ReLU (the first with stride 2), then a
  3x3 stride-2 max-pool (reduction 4);
* a convolutional stage of residual 1x1-3x3-1x1 conv-BN-ReLU bottlenecks, then a 3x3
  stride-2 conv to ``dims[0]`` channels (reduction 8);
* three Conv-MLP stages. A block is ``x + MLP(LN(x))``, then ``DWConv3x3(LN(x))`` (no
  residual around this "connect" conv), then ``x + MLP(LN(x))``; stages are joined by
  3x3 stride-2 convs (reductions 16 and 32);
* a head of LayerNorm, global average pooling and a linear classifier.

Module names and parameter shapes are the official ones, so an official state_dict loads
as it is (:func:`mixlab.load_official`, or ``create_model(name, checkpoint_path=FILE,
official=True)``). Two internal differences that do not change any key: the stages carry
NCHW tensors between them (the Conv-MLP blocks still run channels-last inside), and the
residual loop of the convolutional stage lives in its ``conv_blocks`` container, so that
``conv_stages.conv_blocks`` and ``stages.N.blocks`` output the multi-scale features.

Input sizes: every stride-2 layer is a 3x3 window padded by 1, which rounds the size up
(``ceil(n / 2)``) and never drops a row or column, so ConvMLP takes any height and width
(32x32 ends at 1x1, 224x224 at 7x7, 37x53 at 2x2).

Stochastic depth follows the official code: each Conv-MLP stage ramps the drop rate
linearly from 0 to ``drop_path_rate`` (0.1 there, hard-coded) over its own blocks.

Dense features (``features_only=True``): the end of each resolution, i.e. the
convolutional stage's blocks (reduction 4, ``channels``) and each Conv-MLP stage's blocks
before its downsample (reductions 8, 16, 32). The official detection backbone taps the
same channels and strides but at other points (the tokenizer output, the first downsample
conv output, and the outputs *after* the downsamples of stages 1 and 3).
"""
# (no `from __future__ import annotations`: FX copies string annotations into traced code, TorchScript rejects them)

from typing import List, Optional, Sequence, Union

import torch
from torch import nn
from timm.layers import DropPath, Mlp, register_notrace_function
from timm.models._features import feature_take_indices
from timm.models._registry import generate_default_cfgs

from ..registry import register_model
from ._init import init_trunc_normal_
from ._timm_api import ClassifierApi, IntermediatesApi, build, check_pool

__all__ = ["ConvMLP", "ConvTokenizer", "ConvStage", "ConvMLPBlock", "ConvMLPStage"]

PAPER = "ConvMLP: Hierarchical Convolutional MLPs for Vision (Li, Hassani, Walton & Shi, arXiv:2109.04454, 2021)"


class ConvTokenizer(nn.Module):
    """Three 3x3 conv-BN-ReLU (first one stride 2) and a 3x3 stride-2 max-pool: reduction 4."""

    def __init__(self, in_chans: int = 3, embedding_dim: int = 64):
        super().__init__()
        half = embedding_dim // 2
        self.block = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, embedding_dim, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(embedding_dim),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ResidualBlocks(nn.ModuleList):
    """Blocks applied in turn, each with an identity shortcut around it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = x + block(x)
        return x


def _bottleneck(dim: int, hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(dim, hidden_dim, 1, bias=False),
        nn.BatchNorm2d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden_dim, dim, 1, bias=False),
        nn.BatchNorm2d(dim),
        nn.ReLU(inplace=True),
    )


class ConvStage(nn.Module):
    """Residual 1x1-3x3-1x1 bottlenecks at ``dim`` channels, then a 3x3 stride-2 conv to ``out_dim``."""

    def __init__(self, num_blocks: int = 2, dim: int = 64, hidden_dim: int = 128, out_dim: int = 128):
        super().__init__()
        self.conv_blocks = ResidualBlocks([_bottleneck(dim, hidden_dim) for _ in range(num_blocks)])
        self.downsample = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.conv_blocks(x))


class ConvMLPBlock(nn.Module):
    """Channel MLP, depthwise 3x3 "connect" conv, channel MLP, on channels-last (N, H, W, C) input.

    The official code calls this class ``ConvMLPStage``.
    """

    def __init__(self, dim: int, mlp_ratio: float = 2.0, drop_path: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.channel_mlp1 = Mlp(dim, hidden, act_layer=nn.GELU)
        self.norm2 = nn.LayerNorm(dim)
        self.connect = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.connect_norm = nn.LayerNorm(dim)
        self.channel_mlp2 = Mlp(dim, hidden, act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.channel_mlp1(self.norm1(x)))
        # the paper's block has no shortcut around the depthwise conv
        x = self.connect(self.connect_norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.channel_mlp2(self.norm2(x)))
        return x


class ChannelsLastBlocks(nn.Sequential):
    """Runs channels-last blocks on an NCHW tensor and returns NCHW."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for block in self:
            x = block(x)
        return x.permute(0, 3, 1, 2)


class ConvDownsample(nn.Module):
    """3x3 stride-2 conv between Conv-MLP stages (NCHW in and out)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.downsample = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x)


class ConvMLPStage(nn.Module):
    """Conv-MLP blocks, then (except in the last stage) a downsample. Official name: ``BasicStage``."""

    def __init__(self, num_blocks: int, dim: int, out_dim: Optional[int], mlp_ratio: float, drop_path_rate: float):
        super().__init__()
        # the official code restarts the stochastic-depth ramp in every stage
        rates = torch.linspace(0, drop_path_rate, num_blocks, device="cpu").tolist()
        self.blocks = ChannelsLastBlocks(*[ConvMLPBlock(dim, mlp_ratio, rate) for rate in rates])
        self.downsample_mlp = ConvDownsample(dim, out_dim) if out_dim is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample_mlp(self.blocks(x))


class ConvMLP(ClassifierApi, IntermediatesApi, nn.Module):
    """ConvMLP classifier (NCHW in, logits out).

    Features (``forward_intermediates``, ``features_only``): the convolutional stage's blocks and
    each Conv-MLP stage's blocks, before its downsample; ``norm=True`` applies the head's
    LayerNorm to the last.

    Args:
        blocks: Conv-MLP blocks per stage.
        dims: channels of the Conv-MLP stages.
        mlp_ratios: hidden width of each stage's channel MLPs, as a multiple of its channels.
        channels: channels of the tokenizer and the convolutional stage.
        n_conv_blocks: residual bottlenecks in the convolutional stage.
        in_chans, num_classes: input channels and classes (``num_classes=0``: no classifier).
        global_pool: ``"avg"`` (the paper's head) or ``""``: no pooling, the head's LayerNorm
            normalises every position and the classifier (if any) classifies each, NCHW out.
        drop_rate: dropout before the classifier (not in the official code; default 0).
        drop_path_rate: stochastic depth at the end of each stage's ramp (official: 0.1).
    """

    def __init__(
        self,
        blocks: Sequence[int] = (2, 4, 2),
        dims: Sequence[int] = (128, 256, 512),
        mlp_ratios: Sequence[float] = (2, 2, 2),
        channels: int = 64,
        n_conv_blocks: int = 2,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ):
        super().__init__()
        if not len(blocks) == len(dims) == len(mlp_ratios):
            raise ValueError(f"blocks, dims and mlp_ratios must have the same length, got {len(blocks)}, "
                             f"{len(dims)} and {len(mlp_ratios)}")
        check_pool(global_pool)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = dims[-1]

        self.tokenizer = ConvTokenizer(in_chans, channels)
        self.conv_stages = ConvStage(n_conv_blocks, dim=channels, hidden_dim=dims[0], out_dim=dims[0])
        self.stages = nn.ModuleList([
            ConvMLPStage(blocks[i], dims[i], dims[i + 1] if i + 1 < len(dims) else None, mlp_ratios[i],
                         drop_path_rate)
            for i in range(len(dims))
        ])
        self.norm = nn.LayerNorm(dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        self.feature_info = [dict(num_chs=channels, reduction=4, module="conv_stages.conv_blocks")]
        self.feature_info += [dict(num_chs=d, reduction=8 * 2 ** i, module=f"stages.{i}.blocks")
                              for i, d in enumerate(dims)]
        self.apply(_init_weights)

    # -- sizes -----------------------------------------------------------------------------
    def check_input_size(self, height: int, width: int) -> None:
        """ConvMLP takes any positive size (its stride-2 layers are padded 3x3 windows)."""
        _check_size(height, width)

    # -- forward -----------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stage outputs before the head: (N, dims[-1], ceil(H/32), ceil(W/32))."""
        x = self.tokenizer(checked_input(x))
        x = self.conv_stages(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.permute(0, 2, 3, 1))  # per-position LayerNorm, as the official head
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        if not pre_logits:
            x = self.head(x)
        return x if self.global_pool == "avg" else x.permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- features (forward_intermediates: _timm_api.IntermediatesApi) ----------------------------
    def _stage_count(self) -> int:
        return 1 + len(self.stages)

    def _stage_outputs(self, x: torch.Tensor, last: int) -> List[torch.Tensor]:
        """The convolutional stage's blocks, then each Conv-MLP stage's blocks (before its downsample)."""
        outputs = [self.conv_stages.conv_blocks(self.tokenizer(checked_input(x)))]
        downsample = self.conv_stages.downsample
        for stage in self.stages[:last]:
            outputs.append(stage.blocks(downsample(outputs[-1])))
            downsample = stage.downsample_mlp
        return outputs

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The head's LayerNorm, on an NCHW map."""
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        """Drop what the features ``indices`` do not need; returns their absolute indices."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        if max_index < len(self.feature_info) - 1:
            self.stages = self.stages[:max_index]
            if max_index == 0:
                self.conv_stages.downsample = nn.Identity()
            else:
                self.stages[-1].downsample_mlp = nn.Identity()
            prune_norm = prune_head = True  # the head is sized for the last stage
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices


def _check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"ConvMLP needs a height and width of at least 1 pixel, got {height}x{width}")


# one leaf call for FX (it reads the input size), so traced models still check it; its name has no
# leading "_" because FX's autowrap skips such names
@register_notrace_function
def checked_input(x: torch.Tensor) -> torch.Tensor:
    _check_size(x.shape[-2], x.shape[-1])
    return x


def _init_weights(m: nn.Module) -> None:
    """The official initialisation (conv biases keep PyTorch's default, as there; the official code
    also sets the norms to ones and zeros, which is PyTorch's own init of them)."""
    if isinstance(m, nn.Linear):
        init_trunc_normal_(m)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


# -- configurations ------------------------------------------------------------------------------

def _cfg(**kwargs):
    return dict(input_size=(3, 224, 224), num_classes=1000, pool_size=(7, 7), crop_pct=0.875,
                first_conv="tokenizer.block.0", classifier="head", paper_name=PAPER, **kwargs)


default_cfgs = generate_default_cfgs({
    "convmlp_s": _cfg(),
    "convmlp_m": _cfg(),
    "convmlp_l": _cfg(),
})


def _create(variant: str, pretrained: bool, defaults: dict, **kwargs) -> ConvMLP:
    return build(ConvMLP, variant, pretrained, dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
                 **{**defaults, **kwargs})


@register_model(family="convmlp", paper=PAPER, model_cls=ConvMLP,
                paper_figures=dict(params=9.0e6, macs=2.4e9, top1=76.8))
def convmlp_s(pretrained=False, **kwargs):
    """ConvMLP-S: blocks (2, 4, 2), dims (128, 256, 512), mlp ratio 2, 64 channels, 2 conv blocks."""
    defaults = dict(blocks=(2, 4, 2), dims=(128, 256, 512), mlp_ratios=(2, 2, 2), channels=64, n_conv_blocks=2)
    return _create("convmlp_s", pretrained, defaults, **kwargs)


@register_model(family="convmlp", paper=PAPER, model_cls=ConvMLP,
                paper_figures=dict(params=17.4e6, macs=3.9e9, top1=79.0))
def convmlp_m(pretrained=False, **kwargs):
    """ConvMLP-M: blocks (3, 6, 3), dims (128, 256, 512), mlp ratio 3, 64 channels, 3 conv blocks."""
    defaults = dict(blocks=(3, 6, 3), dims=(128, 256, 512), mlp_ratios=(3, 3, 3), channels=64, n_conv_blocks=3)
    return _create("convmlp_m", pretrained, defaults, **kwargs)


@register_model(family="convmlp", paper=PAPER, model_cls=ConvMLP,
                paper_figures=dict(params=42.7e6, macs=9.9e9, top1=80.2))
def convmlp_l(pretrained=False, **kwargs):
    """ConvMLP-L: blocks (4, 8, 3), dims (192, 384, 768), mlp ratio 3, 96 channels, 3 conv blocks."""
    defaults = dict(blocks=(4, 8, 3), dims=(192, 384, 768), mlp_ratios=(3, 3, 3), channels=96, n_conv_blocks=3)
    return _create("convmlp_l", pretrained, defaults, **kwargs)
