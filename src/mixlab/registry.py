"""Model registry: mixlab's names, their metadata, and ``create_model``.

Every mixlab model is an entrypoint in timm's registry too (so ``timm.create_model``
works after ``import mixlab``); mixlab keeps its own table beside it with what timm's
pretrained config has no field for: the paper's own figures and the CIFAR adaptation.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import timm
from timm.models import _registry as timm_registry

from .errors import ArgumentError, UnknownNameError, UsageError

__all__ = ["ModelInfo", "register_model", "create_model", "list_models", "model_info", "takes_img_size"]


@dataclass(frozen=True)
class ModelInfo:
    """What mixlab knows about a registered model name."""

    name: str
    entrypoint: Callable[..., Any]
    family: str
    paper: str
    model_cls: type | None = None
    input_size: tuple[int, int, int] = (3, 224, 224)
    num_classes: int = 1000
    # the paper's own figures for this variant, e.g. dict(params=9.0e6, macs=2.4e9, top1=76.8)
    paper_figures: dict = field(default_factory=dict)
    # how the model was adapted to 32x32 inputs, if it was ("" = not a CIFAR form)
    cifar: str = ""
    task: str = "classification"
    timm_name: str | None = None  # set when the name aliases a timm entrypoint


_MODELS: dict[str, ModelInfo] = {}

# Keyword arguments that timm's factory consumes itself, for every model.
_FACTORY_KWARGS = {
    "pretrained_cfg", "pretrained_cfg_overlay", "features_only", "out_indices", "feature_cls",
    "feature_cfg", "output_stride", "cache_dir", "pretrained_strict", "device", "dtype",
    "scriptable", "exportable", "no_jit", "feature_window_size", "flatten_sequential",
}


def register_model(
    *,
    family: str,
    paper: str,
    model_cls: type | None = None,
    input_size: tuple[int, int, int] = (3, 224, 224),
    num_classes: int = 1000,
    paper_figures: dict | None = None,
    cifar: str = "",
    task: str = "classification",
    timm_name: str | None = None,
):
    """Decorator for a model entrypoint ``fn(pretrained=False, **kwargs) -> nn.Module``.

    Registers ``fn.__name__`` in mixlab's table and in timm's registry (unless timm already
    has that exact name, as for aliases that keep timm's name).
    """

    def decorator(fn):
        name = fn.__name__
        if name in _MODELS:
            raise ValueError(f"model name {name!r} is registered twice")
        if not timm_registry.is_model(name):
            timm_registry.register_model(fn)
        _MODELS[name] = ModelInfo(
            name=name, entrypoint=fn, family=family, paper=paper, model_cls=model_cls,
            input_size=tuple(input_size), num_classes=num_classes,
            paper_figures=dict(paper_figures or {}), cifar=cifar, task=task, timm_name=timm_name,
        )
        return fn

    return decorator


def list_models(pattern: str | None = None, family: str | None = None, task: str | None = None) -> list[str]:
    """Registered mixlab model names, sorted, optionally filtered by a shell-style pattern."""
    names = sorted(_MODELS)
    if pattern:
        pat = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        names = [n for n in names if fnmatch.fnmatch(n, pat)]
    if family:
        names = [n for n in names if _MODELS[n].family == family]
    if task:
        names = [n for n in names if _MODELS[n].task == task]
    return names


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a registered name (raises with close matches if unknown)."""
    try:
        return _MODELS[name]
    except KeyError:
        raise _unknown(name) from None


def takes_img_size(name: str) -> bool:
    """Whether the model's class takes ``img_size`` (its layout depends on the input size:
    ViT, Swin, Swin-MLP, AS-MLP...), so a run builds it for its image size."""
    cls = model_info(name).model_cls
    return cls is not None and "img_size" in inspect.signature(cls).parameters


def _unknown(name: str) -> UnknownNameError:
    close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
    if not close:  # fall back to prefix/substring matches ("conv2former" -> conv2former_*)
        close = [n for n in _MODELS if name.lower() in n or n in name.lower()][:5]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return UnknownNameError(f"unknown model {name!r}.{hint} Run `mixlab models` for the full list.")


def _accepted_kwargs(info: ModelInfo) -> set[str] | None:
    """Keyword arguments a model accepts, or None when it takes arbitrary **kwargs."""
    accepted: set[str] = set(_FACTORY_KWARGS)
    targets = [info.entrypoint]
    if info.model_cls is not None:
        targets.append(info.model_cls.__init__)
    for target in targets:
        params = inspect.signature(target).parameters
        for p in params.values():
            if p.kind is p.VAR_KEYWORD:
                if target is info.entrypoint and info.model_cls is not None:
                    continue  # the entrypoint forwards **kwargs to the class: check the class
                return None
            accepted.add(p.name)
    accepted.discard("self")
    return accepted


def create_model(
    name: str,
    pretrained: bool = False,
    num_classes: int | None = None,
    in_chans: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    checkpoint_path: str | None = None,
    official: bool = False,
    **kwargs,
):
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        pretrained: load hosted weights through timm (timm baselines only; mixlab's own
            models have no hosted weights: pass ``checkpoint_path`` instead).
        num_classes, in_chans: override the defaults of the variant.
        img_size: input size; passed to models whose layout depends on it (ViT, Swin,
            Swin-MLP, AS-MLP), checked against the constraints of those that have one.
        checkpoint_path: weights to start from (safetensors or a torch file, read without
            unpickling code, or a ``mixlab train`` run directory), loaded by
            :func:`mixlab.finetune.init_from`: every matching tensor; a classifier of another
            shape (``num_classes``) is left new and position embeddings / relative position
            tables are resampled to ``img_size`` as timm does (printed when that happens);
            a checkpoint of another architecture is refused with the key differences. With
            ``official=True`` the file is a state_dict saved from the paper's official
            implementation, converted as :func:`mixlab.load_official` does.
        **kwargs: architecture arguments of the model (``kernel_size=9``, ``drop_path_rate=0.1``...).
    """
    info = model_info(name)
    if pretrained and info.timm_name is None and info.family != "timm":
        raise UsageError(
            f"mixlab has no hosted weights for {name!r}; build it with pretrained=False and pass "
            "checkpoint_path=FILE (official=True for a state_dict saved from the official code)"
        )
    accepted = _accepted_kwargs(info)
    extra = dict(kwargs)
    if num_classes is not None:
        extra["num_classes"] = num_classes
    if in_chans is not None:
        extra["in_chans"] = in_chans
    if img_size is not None and (accepted is None or "img_size" in accepted):
        extra["img_size"] = img_size
    if accepted is not None:
        bad = sorted(k for k in extra if k not in accepted)
        if bad:
            valid = sorted(accepted - _FACTORY_KWARGS)
            raise ArgumentError(
                f"model {name!r} does not take argument(s) {', '.join(bad)}; "
                f"it takes: {', '.join(valid)}"
            )
    try:
        model = timm.create_model(info.timm_name or name, pretrained=pretrained, **extra)
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError) as e:
        # given architecture arguments or a size, a model that cannot be built was given
        # arguments it cannot take (dim=-4: torch's "negative dimension"): say so, naming them;
        # without any, it is a bug and keeps its traceback
        given = dict(kwargs, **({"img_size": img_size} if img_size is not None else {}))
        if not given or isinstance(e, UsageError):
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shown = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ArgumentError(f"{name} cannot be built with {shown}: {type(e).__name__}: {reason[:300]}") from e
    if img_size is not None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        check = getattr(model, "check_input_size", None)
        if check is not None:
            try:
                check(*size)
            except ValueError as e:  # the model's own message: which sizes it takes
                raise UsageError(f"{name} cannot take {size[0]}x{size[1]} inputs: {e}") from None
    if checkpoint_path is not None:
        from .finetune import init_from

        report = init_from(model, checkpoint_path, official=official, say=None)
        if report.resized or report.new:  # say what did not come from the file as it was
            for line in report.lines():
                print(line)
    elif official:
        raise UsageError("official=True needs checkpoint_path=FILE")
    return model
