"""Switching a built model's modules to mixlab's subclasses in place (and back)."""
from __future__ import annotations

from typing import Callable

from torch import nn


def swap_classes(model: nn.Module, new_class: Callable[[nn.Module], type | None]) -> int:
    """Give every module ``m`` of ``model`` the class ``new_class(m)`` where that is not None, in
    place: the module objects, their parameters, buffers, hooks and state_dict keys stay; only the
    class changes. Returns how many modules were switched."""
    n = 0
    for m in model.modules():
        cls = new_class(m)
        if cls is not None:
            m.__class__ = cls
            n += 1
    return n


def by_exact_type(mapping: dict[type, type]) -> Callable[[nn.Module], type | None]:
    """``new_class`` for :func:`swap_classes`: modules of exactly a key's class (not subclasses,
    whose forward may differ) become its value."""
    return lambda m: mapping.get(type(m))
