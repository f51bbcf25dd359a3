"""What mixlab's own families share to meet timm's model contract (timm's tests/test_models.py).

* ``device=`` / ``dtype=``: timm's ``create_model`` passes them to the model class, which builds
  every layer there (``create_model(name, device="meta")`` allocates nothing);
* a head replaced by ``reset_classifier`` lives on the model's device and dtype and keeps its
  train/eval mode;
* ``global_pool`` is ``"avg"`` or ``""`` (no pooling: the head's per-position part runs on the
  map and the classifier, if any, classifies every position);
* ``get_classifier`` / ``reset_classifier`` (:class:`ClassifierApi`) and ``forward_intermediates``
  (:class:`IntermediatesApi`), written once for the families.

``forward`` is not shared: FX (timm's and torchvision's feature extraction) wraps a model's no-trace
functions (its ``checked_input``) only in the module that defines the traced ``forward``, so each
family defines its own.
"""
# (no `from __future__ import annotations`: the families inherit these methods, and FX and TorchScript
# read their annotations)

from contextlib import nullcontext
from typing import List, Optional, Tuple, Union

import torch
from torch import nn
from timm.models._builder import build_model_with_cfg
from timm.models._features import feature_take_indices

POOLS = ("avg", "")


def build(model_cls: type, variant: str, pretrained: bool, feature_cfg: Optional[dict], device=None, dtype=None,
          **kwargs) -> nn.Module:
    """timm's ``build_model_with_cfg`` with ``device`` / ``dtype`` honoured: the model is built under
    ``torch.device(device)`` (so ``device="meta"`` allocates nothing and the initialisation runs where
    the weights live), then cast to ``dtype``. Building in a device context rather than passing
    ``device=`` to every layer keeps the model classes free of it, and works with timm layers of
    timm versions that do not take it."""
    with torch.device(device) if device is not None else nullcontext():
        model = build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)
    return model if dtype is None else model.to(dtype)


def check_pool(global_pool: str) -> str:
    if global_pool not in POOLS:
        raise ValueError(f"global_pool must be 'avg' (global average) or '' (no pooling), got {global_pool!r}")
    return global_pool


def device_dtype(module: nn.Module) -> dict:
    """``dict(device=..., dtype=...)`` of the module's first parameter (``None`` each if it has none).

    timm >= 1.0.30 has the same as ``timm.layers.get_device_dtype``; mixlab supports timm 1.0.x.
    """
    p = next(module.parameters(), None)
    return dict(device=None if p is None else p.device, dtype=None if p is None else p.dtype)


def linear_head(model: nn.Module, in_features: int, num_classes: int) -> nn.Module:
    """A new classifier for ``model``: Linear where the model lives (PyTorch's default init, as before),
    or Identity for ``num_classes=0``; in the model's train/eval mode."""
    head = nn.Linear(in_features, num_classes, **device_dtype(model)) if num_classes > 0 else nn.Identity()
    return head.train(model.training)


def new_pool(old: str, new: Optional[str]) -> str:
    """The pooling after ``reset_classifier(..., global_pool=new)`` (``None`` keeps the current one)."""
    return old if new is None else check_pool(new)


class ClassifierApi:
    """timm's ``get_classifier`` / ``reset_classifier`` for a model whose classifier is the attribute
    ``classifier_name``: a Linear on ``head_hidden_size`` features (Identity for no classes), after
    the pooling ``global_pool`` names."""

    classifier_name = "head"

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.global_pool = new_pool(self.global_pool, global_pool)
        self.num_classes = num_classes
        setattr(self, self.classifier_name, self._new_classifier(num_classes))

    def _new_classifier(self, num_classes: int) -> nn.Module:
        """The classifier ``reset_classifier`` puts in place."""
        return linear_head(self, self.head_hidden_size, num_classes)


class IntermediatesApi:
    """timm's ``forward_intermediates`` for a network whose features (``feature_info``) are the
    outputs of its stages, in order. A family defines:

    * ``_stage_count()``: how many stages the network runs now (fewer after
      ``prune_intermediate_layers``); integer and negative ``indices`` count from its end;
    * ``_stage_outputs(x, last)``: checks the input and runs the network up to stage ``last``,
      returning the stage outputs ``0..last`` in the model's layout (its ``output_fmt``, NCHW if
      it has none);
    * optionally ``_final_norm(x)``, the norm ``norm=True`` applies to the last stage's output
      (none by default), ``_features_end(outputs)``, ``forward_features``'s result from all the
      stage outputs (the last one by default), and ``feature_fmts``, the layouts it can return.
    """

    feature_fmts = ("NCHW",)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's intermediate-feature API: ``(forward_features(x), features)``, where feature ``i`` is
        ``feature_info[i]``; ``norm=True`` applies the network's final norm (if it has one) to the last
        stage's output; with ``stop_early`` the network stops at the deepest feature taken, and the
        first item is that stage's output."""
        if output_fmt not in self.feature_fmts:
            raise ValueError(f"{type(self).__name__} returns {' or '.join(self.feature_fmts)} features only, "
                             f"got output_fmt={output_fmt!r}")
        num_stages = self._stage_count()
        take_indices, max_index = feature_take_indices(num_stages, indices)
        outputs = self._stage_outputs(x, max_index if stop_early or intermediates_only else num_stages - 1)
        last = len(self.feature_info) - 1  # the built network's last stage, the one the final norm follows
        intermediates = []
        for i in take_indices:
            feature = self._final_norm(outputs[i]) if norm and i == last else outputs[i]
            intermediates.append(self._as_feature(feature, output_fmt))
        if intermediates_only:
            return intermediates
        return (self._features_end(outputs) if len(outputs) == num_stages else outputs[-1]), intermediates

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _features_end(self, outputs: List[torch.Tensor]) -> torch.Tensor:
        return outputs[-1]

    def _as_feature(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        # the one layout change the families need: channels-last maps (Swin-MLP's) asked for as NCHW
        if output_fmt == "NCHW" and getattr(self, "output_fmt", "NCHW") == "NHWC":
            return x.permute(0, 3, 1, 2).contiguous()
        return x
