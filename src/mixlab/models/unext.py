"""UNeXt ("UNeXt: MLP-based Rapid Medical Image Segmentation Network", Valanarasu & Patel, MICCAI 2022).

The network as the official code (jeya-maria-jose/UNeXt-pytorch, ``archs.py``, classes
``UNext`` and ``UNext_S``) builds it, channels C1..C5:

* three convolutional encoder stages ``relu(maxpool2(bn(conv3x3(x))))`` to C1, C2, C3
  (reductions 2, 4, 8);
* two tokenized-MLP stages: an overlapping patch embedding (3x3 stride-2 conv to C4, then
  C5, and a LayerNorm over the tokens), one shifted block ``x + shiftedMLP(LN(x))`` and a
  LayerNorm (reductions 16 and 32). The shifted MLP shifts ``shift_size`` = 5 channel
  groups by -2..2 positions along the height, applies a token-wise linear layer, a 3x3
  depthwise conv, GELU, shifts along the width, and a second linear layer;
* a decoder mirroring it: ``relu(upsample2(bn(conv3x3(x)))) + skip`` back up to C4, C3
  (each followed by a shifted block and a LayerNorm), C2, C1; then a last
  conv-upsample-ReLU at C1 and a 1x1 conv to ``num_classes`` logits at full resolution.

The official ``UNext`` uses C1..C5 = 16, 32, 128, 160, 256 (1,471,921 parameters for one
class; the paper's text gives C1, C2 = 32, 64, but the released code and its parameter count
are what this reproduces) and ``UNext_S`` 8, 16, 32, 64, 128 (253,561).

The shift is :func:`mixlab.ops.axial_shift` (zero filling), whose grouping (``torch.chunk``:
groups of ``ceil(C / 5)`` channels, the last one smaller) and offsets (group ``g`` moves by
``g - 2``, ``out[h] = in[h - offset]``) are the official pad / chunk / roll / narrow result.

Module names and parameter shapes are the official ones, so an official state_dict loads
as it is (:func:`mixlab.load_official`). Differences that change no key and no output:
``in_chans`` is honoured (the official first conv always takes 3 channels), the stage
outputs pass through parameter-free ``taps`` (hook points for stage shapes and features),
and the whole network runs channels-last (input, activations and conv weights; the official
code runs NCHW and copies every token map back to NCHW), and in eval mode each BatchNorm is
folded into the conv before it (not in TorchScript, nor in a model built under timm's
scriptable/exportable layer config); on CPU this makes it about 2x faster than the official
implementation, with outputs equal to it within float32 rounding (tested to 1e-5).

timm's model API: ``forward_features`` is the decoder output before the 1x1 head (the head is
``final``); ``features_only`` gives the five encoder outputs, with the decoder pruned away.

Input sizes: the encoder halves the size five times and the decoder doubles it back and
adds the skips, so height and width must be multiples of 32.
"""
# (no `from __future__ import annotations`: FX copies string annotations into traced code, TorchScript rejects them)

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, is_exportable, is_scriptable, register_notrace_function
from timm.models._features import feature_take_indices
from timm.models._registry import generate_default_cfgs

from ..data.constants import IMAGENET_MEAN, IMAGENET_STD
from ..ops import axial_shift
from ..registry import register_model
from ._init import init_trunc_normal_
from ._timm_api import ClassifierApi, IntermediatesApi, build, check_pool, device_dtype

__all__ = ["UNeXt", "ShiftedMLP", "ShiftedBlock", "OverlapPatchEmbed", "DWConv"]

PAPER = "UNeXt: MLP-based Rapid Medical Image Segmentation Network (Valanarasu & Patel, MICCAI 2022)"


def _init_weights(m: nn.Module) -> None:
    """The official initialisation of the token stages (the plain convs keep PyTorch's; the official
    code also sets the LayerNorms to ones and zeros, which is PyTorch's own init of them)."""
    if isinstance(m, nn.Linear):
        init_trunc_normal_(m)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _tokens_as_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) view in channels-last memory (no copy)."""
    return x.reshape(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)


def _map_as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); free when ``x`` is channels-last."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """Run the whole network channels-last.

    On CPU (torch 2.x, oneDNN) this is what makes UNeXt fast: in NCHW the 3-channel first
    conv, the 2x2 max-pools and the bilinear upsamplings are each 3-15x slower than in
    channels-last, and the token stages are channels-last anyway (their tokens are (B, H*W, C)).
    """
    return x.contiguous(memory_format=torch.channels_last)


def _conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, fold: bool) -> torch.Tensor:
    """``bn(conv(x))``; with running statistics in use (eval mode) and ``fold``, the BatchNorm is
    folded into the conv's weights, which skips one pass over the (largest, full-resolution)
    activations."""
    if not fold or bn.training or bn.running_mean is None:
        return bn(conv(x))
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = -bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _pool_relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(F.max_pool2d(x, 2, 2), inplace=True)


def _conv_bn_pool_relu(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, fold: bool) -> torch.Tensor:
    """An encoder stage, ``relu(maxpool2(bn(conv(x))))``; in training, BatchNorm, pool and ReLU as one
    op where ``bn`` offers it (``mixlab.ops.use_fast_resample``)."""
    fused = getattr(bn, "forward_pool_relu", None)
    if fused is not None and bn.training:
        return fused(conv(x))
    return _pool_relu(_conv_bn(x, conv, bn, fold))


def _conv_bn_up(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, fold: bool, skip: torch.Tensor) -> torch.Tensor:
    """A decoder stage, ``relu(upsample2(bn(conv(x)))) + skip``; in training, BatchNorm, upsampling,
    ReLU and the sum as one op where ``bn`` offers it (``mixlab.ops.use_fast_resample``)."""
    fused = getattr(bn, "forward_upsample_relu_add", None)
    if fused is not None and bn.training:
        return fused(conv(x), skip)
    return UNeXt._up(_conv_bn(x, conv, bn, fold), skip)


class DWConv(nn.Module):
    """3x3 depthwise conv on a token sequence (the official wrapper, kept for its key names)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return _map_as_tokens(self.dwconv(_tokens_as_map(x, h, w)))


class ShiftedMLP(nn.Module):
    """Shift along H -> linear -> depthwise conv -> GELU -> shift along W -> linear (official ``shiftmlp``)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 drop: float = 0.0, shift_size: int = 5):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)
        self.shift_size = shift_size

    def _shift(self, x: torch.Tensor, h: int, w: int, dim: int) -> torch.Tensor:
        return _map_as_tokens(axial_shift(_tokens_as_map(x, h, w), self.shift_size, dim))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.fc1(self._shift(x, h, w, dim=2))
        x = self.drop(self.act(self.dwconv(x, h, w)))
        x = self.fc2(self._shift(x, h, w, dim=3))
        return self.drop(x)


class ShiftedBlock(nn.Module):
    """``x + drop_path(ShiftedMLP(LayerNorm(x)))`` (official ``shiftedBlock``; its norm is ``norm2``)."""

    def __init__(self, dim: int, mlp_ratio: float = 1.0, drop: float = 0.0, drop_path: float = 0.0,
                 shift_size: int = 5):
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ShiftedMLP(dim, int(dim * mlp_ratio), drop=drop, shift_size=shift_size)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class OverlapPatchEmbed(nn.Module):
    """3x3 stride-2 conv to tokens, then LayerNorm; returns (tokens, H, W)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 3, stride: int = 2):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2], x.shape[-1]
        return self.norm(_map_as_tokens(x)), h, w


class ShiftedBlocks(nn.ModuleList):
    """Shifted blocks applied in turn to (B, H*W, C) tokens of an H x W map (official: a ModuleList)."""

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        for block in self:
            x = block(x, h, w)
        return x


class UNeXt(ClassifierApi, IntermediatesApi, nn.Module):
    """UNeXt: convolutional encoder, shifted-MLP bottleneck, convolutional decoder with skips.

    Features (``forward_intermediates``, ``features_only``): the five encoder outputs
    ``feature_info[i]``. ``forward_intermediates`` returns ``(forward_features output, features)``,
    as timm's models do; with ``stop_early`` short of the last encoder stage, the deepest encoder
    output stands in for the decoder output (the decoder is skipped); ``norm`` has no effect.

    Args:
        num_classes: output channels (independent sigmoid logits; 1 for binary masks).
        in_chans: input channels.
        dims: channels C1..C5 of the five resolutions (reductions 2, 4, 8, 16, 32).
        shift_size: channel groups of the shifted MLP (offsets -shift_size//2 .. shift_size//2).
        mlp_ratio: hidden width of the shifted MLP over its input width (1 in the official code).
        drop_rate: dropout inside the shifted MLPs.
        drop_path_rate: stochastic depth; as the official code, the 16x16 blocks (``block1``,
            ``dblock1``) get 0 and the others ``drop_path_rate / 2``.
    """

    classifier_name = "final"  # the official name of the 1x1 output conv
    # what mixlab.ops.use_fast_resample may fuse (training only; same state_dict): the encoders'
    # BatchNorms with the max-pool and ReLU after them, the decoders' with the upsampling, ReLU and
    # skip sum after them, and the head with the upsampling and ReLU before it
    resample_fusions = {"pool_relu": ("ebn1", "ebn2", "ebn3"), "upsample_relu_add": ("dbn1", "dbn2", "dbn3", "dbn4"),
                        "upsample_relu": ("final",)}

    def __init__(self, num_classes: int = 1, in_chans: int = 3, dims: Sequence[int] = (16, 32, 128, 160, 256),
                 shift_size: int = 5, mlp_ratio: float = 1.0, drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if len(dims) != 5:
            raise ValueError(f"dims must give the 5 channel counts C1..C5, got {tuple(dims)}")
        c1, c2, c3, c4, c5 = dims
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.dims = tuple(dims)
        self.num_features = self.head_hidden_size = c1
        # eval-mode BatchNorm folding reads BatchNorm buffers that TorchScript types as Optional: off in
        # models built for scripting or export (timm's layer config, as timm picks its layers)
        self.fold_bn = not (is_scriptable() or is_exportable())
        self.encoder_only = -1  # >= 0 after prune_intermediate_layers: the last encoder stage kept
        # the official code spaces 3 rates over its 4 blocks and uses the first two
        dpr = [drop_path_rate * i / 2 for i in range(3)]

        def block(dim, rate):
            return ShiftedBlocks([ShiftedBlock(dim, mlp_ratio, drop_rate, rate, shift_size)])

        self.encoder1 = nn.Conv2d(in_chans, c1, 3, stride=1, padding=1)
        self.encoder2 = nn.Conv2d(c1, c2, 3, stride=1, padding=1)
        self.encoder3 = nn.Conv2d(c2, c3, 3, stride=1, padding=1)
        self.ebn1, self.ebn2, self.ebn3 = nn.BatchNorm2d(c1), nn.BatchNorm2d(c2), nn.BatchNorm2d(c3)
        self.norm3, self.norm4 = nn.LayerNorm(c4), nn.LayerNorm(c5)
        self.dnorm3, self.dnorm4 = nn.LayerNorm(c4), nn.LayerNorm(c3)
        self.block1 = block(c4, dpr[0])
        self.block2 = block(c5, dpr[1])
        self.dblock1 = block(c4, dpr[0])
        self.dblock2 = block(c3, dpr[1])
        self.patch_embed3 = OverlapPatchEmbed(c3, c4)
        self.patch_embed4 = OverlapPatchEmbed(c4, c5)
        self.decoder1 = nn.Conv2d(c5, c4, 3, stride=1, padding=1)
        self.decoder2 = nn.Conv2d(c4, c3, 3, stride=1, padding=1)
        self.decoder3 = nn.Conv2d(c3, c2, 3, stride=1, padding=1)
        self.decoder4 = nn.Conv2d(c2, c1, 3, stride=1, padding=1)
        self.decoder5 = nn.Conv2d(c1, c1, 3, stride=1, padding=1)
        self.dbn1, self.dbn2, self.dbn3, self.dbn4 = (nn.BatchNorm2d(c) for c in (c4, c3, c2, c1))
        self.final = nn.Conv2d(c1, num_classes, kernel_size=1) if num_classes > 0 else nn.Identity()
        # parameter-free hook points at the five encoder outputs (stage shapes, hook features)
        self.taps = nn.ModuleList([nn.Identity() for _ in range(5)])
        self.feature_info = [dict(num_chs=c, reduction=2 ** (i + 1), module=f"taps.{i}") for i, c in enumerate(dims)]
        for m in (self.block1, self.block2, self.dblock1, self.dblock2, self.patch_embed3, self.patch_embed4):
            m.apply(_init_weights)
        # conv weights stored channels-last like the activations: otherwise every call copies
        # each weight into that layout first (~1.5 ms of a ~10 ms CPU forward)
        self.to(memory_format=torch.channels_last)

    # -- sizes -------------------------------------------------------------------------------
    def check_input_size(self, height: int, width: int) -> None:
        """Five halvings on the way down and skips on the way up: multiples of 32 only."""
        _check_size(height, width)

    # -- head --------------------------------------------------------------------------------
    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the 1x1 output conv. ``global_pool`` does not apply to a dense head: timm's values
        ('avg', '') are taken and change nothing, anything else is refused as on the other families."""
        if global_pool is not None:
            check_pool(global_pool)
        self.num_classes = num_classes
        if num_classes > 0:
            final = nn.Conv2d(self.num_features, num_classes, kernel_size=1, **device_dtype(self))
            self.final = final.to(memory_format=torch.channels_last).train(self.training)
        else:
            self.final = nn.Identity()

    # -- forward -----------------------------------------------------------------------------
    # Written out module by module, with no helper that takes a module, because TorchScript can
    # compile neither; ``x if torch.jit.is_scripting() else y`` is compiled as ``x`` alone, so
    # the eval-mode BatchNorm folding of ``_conv_bn`` runs everywhere but in TorchScript.
    def _encode(self, x: torch.Tensor, upto: int = 4) -> List[torch.Tensor]:
        """The encoder outputs at reductions 2, 4, 8, 16, 32 (up to index ``upto``)."""
        fold = self.fold_bn
        x = (_pool_relu(self.ebn1(self.encoder1(x))) if torch.jit.is_scripting()
             else _conv_bn_pool_relu(x, self.encoder1, self.ebn1, fold))
        feats = [self.taps[0](x)]
        if upto == 0:
            return feats
        x = feats[-1]
        x = (_pool_relu(self.ebn2(self.encoder2(x))) if torch.jit.is_scripting()
             else _conv_bn_pool_relu(x, self.encoder2, self.ebn2, fold))
        feats.append(self.taps[1](x))
        if upto == 1:
            return feats
        x = feats[-1]
        x = (_pool_relu(self.ebn3(self.encoder3(x))) if torch.jit.is_scripting()
             else _conv_bn_pool_relu(x, self.encoder3, self.ebn3, fold))
        feats.append(self.taps[2](x))
        if upto == 2:
            return feats
        t, h, w = self.patch_embed3(feats[-1])
        feats.append(self.taps[3](_tokens_as_map(self.norm3(self.block1(t, h, w)), h, w)))
        if upto == 3:
            return feats
        t, h, w = self.patch_embed4(feats[-1])
        feats.append(self.taps[4](_tokens_as_map(self.norm4(self.block2(t, h, w)), h, w)))
        return feats

    @staticmethod
    def _up(x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``relu(upsample2x(x)) + skip``, reusing the upsampled buffer where autograd allows."""
        x = F.relu(F.interpolate(x, scale_factor=2.0, mode="bilinear"), inplace=True)
        if skip is None:
            return x
        # relu's backward reads its output, so the in-place add is for inference only
        return x + skip if torch.is_grad_enabled() else x.add_(skip)

    def _decode(self, feats: List[torch.Tensor], last_up: bool = True) -> torch.Tensor:
        fold = self.fold_bn
        x = feats[4]
        x = (self._up(self.dbn1(self.decoder1(x)), feats[3]) if torch.jit.is_scripting()
             else _conv_bn_up(x, self.decoder1, self.dbn1, fold, feats[3]))
        h, w = x.shape[-2], x.shape[-1]
        x = _tokens_as_map(self.dnorm3(self.dblock1(_map_as_tokens(x), h, w)), h, w)
        x = (self._up(self.dbn2(self.decoder2(x)), feats[2]) if torch.jit.is_scripting()
             else _conv_bn_up(x, self.decoder2, self.dbn2, fold, feats[2]))
        h, w = x.shape[-2], x.shape[-1]
        x = _tokens_as_map(self.dnorm4(self.dblock2(_map_as_tokens(x), h, w)), h, w)
        x = (self._up(self.dbn3(self.decoder3(x)), feats[1]) if torch.jit.is_scripting()
             else _conv_bn_up(x, self.decoder3, self.dbn3, fold, feats[1]))
        x = (self._up(self.dbn4(self.decoder4(x)), feats[0]) if torch.jit.is_scripting()
             else _conv_bn_up(x, self.decoder4, self.dbn4, fold, feats[0]))
        x = self.decoder5(x)
        return self._up(x) if last_up else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder output before the 1x1 head: (B, C1, H, W) (after ``prune_intermediate_layers``:
        the deepest encoder feature kept)."""
        x = _channels_last(checked_input(x))
        if self.encoder_only >= 0:
            return self._encode(x, self.encoder_only)[-1]
        return self._decode(self._encode(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.final(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x)) if torch.jit.is_scripting() else self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # in training, the last upsampling, its ReLU and the 1x1 head as one op where the head offers
        # it (mixlab.ops.use_fast_resample): the full-resolution C1 map is then never written
        fused = getattr(self.final, "forward_upsampled", None)
        if fused is None or not self.training or self.encoder_only >= 0:
            return self.forward_head(self.forward_features(x))
        return fused(self._decode(self._encode(_channels_last(checked_input(x))), last_up=False))

    # -- features (forward_intermediates: _timm_api.IntermediatesApi) ----------------------------
    def _stage_count(self) -> int:
        return self.encoder_only + 1 if self.encoder_only >= 0 else len(self.feature_info)

    def _stage_outputs(self, x: torch.Tensor, last: int) -> List[torch.Tensor]:
        return self._encode(_channels_last(checked_input(x)), last)

    def _features_end(self, outputs: List[torch.Tensor]) -> torch.Tensor:
        return outputs[-1] if self.encoder_only >= 0 else self._decode(outputs)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Keep the encoder up to the deepest of the features ``indices``; the decoder and the 1x1
        output conv (UNeXt's head) go with ``prune_head`` or when a stage it needs goes. The
        pruned model's ``forward_features`` is then that deepest encoder feature. ``prune_norm``
        does nothing: UNeXt has no final norm."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        last = len(self.feature_info) - 1
        if not prune_head and max_index == last:
            return take_indices
        stages = ((), ("encoder2", "ebn2"), ("encoder3", "ebn3"), ("patch_embed3", "block1", "norm3"),
                  ("patch_embed4", "block2", "norm4"))
        dropped = [n for stage in stages[max_index + 1:] for n in stage]
        dropped += ["decoder1", "decoder2", "decoder3", "decoder4", "decoder5", "dbn1", "dbn2", "dbn3", "dbn4",
                    "dblock1", "dblock2", "dnorm3", "dnorm4"]
        for name in dropped:
            setattr(self, name, nn.Identity())
        self.reset_classifier(0)
        self.encoder_only = max_index
        self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        return take_indices


def _check_size(height: int, width: int) -> None:
    if height < 32 or width < 32 or height % 32 or width % 32:
        raise ValueError(f"UNeXt needs a height and width that are multiples of 32, got {height}x{width}")


# one leaf call for FX (it reads the input size), so traced models still check it; its name has no
# leading "_" because FX's autowrap skips such names
@register_notrace_function
def checked_input(x: torch.Tensor) -> torch.Tensor:
    _check_size(x.shape[-2], x.shape[-1])
    return x


# -- configurations ------------------------------------------------------------------------------

def _cfg(**kwargs):
    return dict(input_size=(3, 256, 256), num_classes=1, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                first_conv="encoder1", classifier="final", paper_name=PAPER, **kwargs)


default_cfgs = generate_default_cfgs({
    "unext": _cfg(),
    "unext_s": _cfg(),
})


def _create(variant: str, pretrained: bool, defaults: dict, **kwargs) -> UNeXt:
    return build(UNeXt, variant, pretrained, dict(out_indices=(0, 1, 2, 3, 4), feature_cls="getter"),
                 **{**defaults, **kwargs})


@register_model(family="unext", paper=PAPER, model_cls=UNeXt, input_size=(3, 256, 256), num_classes=1,
                # the paper's "0.57 GFLOPs" are multiply-adds (flop_counter: 0.562 G MACs at 256x256)
                paper_figures=dict(params=1.47e6, macs=0.57e9, iou_busi=66.95, dice_busi=79.37),
                task="segmentation")
def unext(pretrained=False, **kwargs):
    """UNeXt (official ``UNext``): C1..C5 = 16, 32, 128, 160, 256; 256x256 inputs in the paper."""
    return _create("unext", pretrained, dict(dims=(16, 32, 128, 160, 256)), **kwargs)


@register_model(family="unext", paper=PAPER, model_cls=UNeXt, input_size=(3, 256, 256), num_classes=1,
                paper_figures=dict(), task="segmentation")
def unext_s(pretrained=False, **kwargs):
    """UNeXt-S (official ``UNext_S``, the smaller model of the official code): C1..C5 = 8, 16, 32, 64, 128."""
    return _create("unext_s", pretrained, dict(dims=(8, 16, 32, 64, 128)), **kwargs)
