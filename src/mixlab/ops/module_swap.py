"""Switching a built model's modules to mixlab's subclasses in place (and back)."""
from __future__ import annotations

from typing import Callable

from torch import nn
from torch.fx import _symbolic_trace as _fx
from torch.nn.modules import module as _module


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


def hooked(*modules: nn.Module) -> bool:
    """Whether any of ``modules`` has a forward or backward hook: a fused path that would skip
    calling them steps aside."""
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


def global_hooks() -> bool:
    """Whether a global module hook is registered (``nn.modules.module.register_module_*_hook``)."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def fx_tracing() -> bool:
    """Whether torch.fx is symbolically tracing (fused paths then step aside for aten's operations).
    ``is_fx_symbolic_tracing``, where torch has it: ``is_fx_tracing`` warns on its first call."""
    probe = getattr(_fx, "is_fx_symbolic_tracing", None) or _fx.is_fx_tracing
    return probe()
