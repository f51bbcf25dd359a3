"""What mixlab's own families share to meet timm's model contract (timm's tests/test_models.py).

* ``device=`` / ``dtype=``: timm's ``create_model`` passes them to the model class, which builds
  every layer there (``create_model(name, device="meta")`` allocates nothing);
* a head replaced by ``reset_classifier`` lives on the model's device and dtype and keeps its
  train/eval mode;
* ``global_pool`` is ``"avg"`` or ``""`` (no pooling: the head's per-position part runs on the
  map and the classifier, if any, classifies every position).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn
from timm.models._builder import build_model_with_cfg

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
