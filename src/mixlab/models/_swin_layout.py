"""Swin Transformer's layout, which AS-MLP and Swin-MLP keep with the official module names.

A patch embedding (``patch_embed``, then ``pos_drop``), stages ``layers.i`` of blocks
(``layers.i.blocks``) that end, all but the last, in patch merging (``layers.i.downsample``), a
final norm (``norm``) and a linear classifier (``head``). Channels double and the map halves at
each merge. The features are the stage outputs before merging.

A family gives the stages, the norm and the layout its blocks work in (``output_fmt``: NCHW for
AS-MLP, NHWC for Swin-MLP), and defines ``_checked(x)`` (its input-size check, an FX leaf),
``check_input_size``, ``forward_head`` and ``forward``.
"""
# (no `from __future__ import annotations`: FX copies string annotations into traced code, TorchScript rejects them)

from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import nn
from timm.layers import PatchEmbed, to_2tuple
from timm.models._features import feature_take_indices

from ._timm_api import ClassifierApi, IntermediatesApi, check_pool

__all__ = ["MergingStage", "SwinLayoutNet"]


class MergingStage(nn.Module):
    """A stage's blocks, then (all but the last stage) patch merging: the official ``BasicLayer``'s keys.

    ``blocks`` is a Sequential (the same state_dict keys as the official ModuleList) so that the
    stage output before merging can be hooked as a feature map.
    """

    def __init__(self, blocks: Sequence[nn.Module], downsample: Optional[nn.Module]):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        return self.downsample(x) if self.downsample is not None else x


class SwinLayoutNet(ClassifierApi, IntermediatesApi, nn.Module):
    """The layout's network (see the module docstring).

    Args:
        stage: ``stage(i, dim, drop_path, downsample)`` builds stage ``i`` at ``dim`` channels, one
            block per stochastic-depth rate in ``drop_path``, merging at its end if ``downsample``.
        norm_layer: the norm of the patch embedding (if ``patch_norm``) and the final norm.
        output_fmt: the layout of the maps between the layers, ``"NCHW"`` or ``"NHWC"``.
        The others: as in the official models (``drop_path_rate``: the last block's stochastic
        depth, on a linear ramp over all blocks).
    """

    def __init__(self, stage: Callable[[int, int, List[float], bool], nn.Module], img_size, patch_size: int,
                 in_chans: int, num_classes: int, embed_dim: int, depths: Sequence[int], drop_rate: float,
                 drop_path_rate: float, norm_layer: Callable[[int], nn.Module], patch_norm: bool, global_pool: str,
                 output_fmt: str):
        super().__init__()
        check_pool(global_pool)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (self.num_layers - 1))
        self.global_pool = global_pool
        self.output_fmt = output_fmt
        self.img_size = to_2tuple(img_size)

        self.patch_embed = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                      norm_layer=norm_layer if patch_norm else None, output_fmt=output_fmt)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # works under a meta device too
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i, depth in enumerate(depths):
            dim = embed_dim * 2 ** i
            self.layers.append(stage(i, dim, dpr[sum(depths[:i]):sum(depths[:i + 1])], i < self.num_layers - 1))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"layers.{i}.blocks"))
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's normalised map, in the model's layout (``output_fmt``)."""
        x = self.pos_drop(self.patch_embed(self._checked(x)))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    # -- features (forward_intermediates: _timm_api.IntermediatesApi) ----------------------------
    def _stage_count(self) -> int:
        return len(self.layers)

    def _stage_outputs(self, x: torch.Tensor, last: int) -> List[torch.Tensor]:
        """Each stage's blocks' output, before its patch merging."""
        x = self.pos_drop(self.patch_embed(self._checked(x)))
        outputs = [self.layers[0].blocks(x)]
        for merging, stage in zip(self.layers[:last], self.layers[1:last + 1]):
            outputs.append(stage.blocks(merging.downsample(outputs[-1])))
        return outputs

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def _features_end(self, outputs: List[torch.Tensor]) -> torch.Tensor:
        return self.norm(outputs[-1])

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Keep the stages up to the deepest of the features ``indices``, without its patch merging;
        the final norm goes with ``prune_norm`` or with the last stage. Returns the absolute indices."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        self.layers[-1].downsample = None
        if prune_norm or max_index < self.num_layers - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices
