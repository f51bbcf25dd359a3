"""Type and range checks of a training configuration, before any data is read or model built.

:func:`check_config` walks every key of a resolved configuration (classification or
segmentation) and raises :class:`~mixlab.errors.UsageError` naming the key, the value and
what is allowed (``optimizer.lr must be a number > 0, got -0.5``). Values are normalised
where the reading is unambiguous: a whole float (``16.0``) becomes an int, and a number
written as text (``"1e-3"``, which YAML 1.1 reads as a string) becomes a float; anything
else of the wrong type (``epochs: 1.7``, ``hflip: "yes"``, ``betas: 0.9``) is refused rather
than truncated or guessed.

``model_kwargs`` are checked against the model's signature (:func:`check_model_kwargs`)
and by building the model on the meta device (no memory, no data), so ``dim=abc`` or
``dim=-4`` is reported with the argument named instead of torch's traceback.
"""
from __future__ import annotations

import inspect
import math
import re
import warnings
from typing import Any, Callable

from ..errors import UsageError

__all__ = ["check_config", "check_model_kwargs", "check_model_builds", "show"]


def show(value: Any) -> str:
    """A value as the user wrote it in YAML: null, true, 'text', [1, 2]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _fail(key: str, what: str, value: Any, hint: str = "") -> UsageError:
    return UsageError(f"{key} must be {what}, got {show(value)}" + (f" ({hint})" if hint else ""))


# ----------------------------------------------------------------------------- value checkers
# Each takes (value, key) and returns the (normalised) value or raises a UsageError.

def _as_number(value, key: str, what: str):
    if isinstance(value, bool) or value is None:
        raise _fail(key, what, value)
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
        try:
            number = float(value)
        except ValueError:
            raise _fail(key, what, value) from None
        if not math.isfinite(number):
            raise _fail(key, what, value)
        return number
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise _fail(key, what, value)
        return value
    raise _fail(key, what, value)


def _range_text(lo, hi, lo_open, hi_open) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return ""


def number(lo=None, hi=None, lo_open=False, hi_open=False, null=False, hint: str = "") -> Callable:
    """A real number in the given range (bounds inclusive unless ``*_open``)."""
    what = " ".join(p for p in ("a number", _range_text(lo, hi, lo_open, hi_open)) if p)
    what = f"null or {what}" if null else what

    def check(value, key):
        if value is None and null:
            return None
        x = _as_number(value, key, what)
        below = lo is not None and (x <= lo if lo_open else x < lo)
        above = hi is not None and (x >= hi if hi_open else x > hi)
        if below or above:
            raise _fail(key, what, value, hint)
        return float(x) if isinstance(x, str) else x

    return check


def whole(lo=None, hi=None, null=False, hint: str = "") -> Callable:
    """A whole number (an int, or a float with no fraction such as 16.0) in [lo, hi]."""
    what = " ".join(p for p in ("a whole number", _range_text(lo, hi, False, False)) if p)
    what = f"null or {what}" if null else what

    def check(value, key):
        if value is None and null:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (isinstance(value, float) and not value.is_integer()):
            raise _fail(key, what, value, hint or ("it is not rounded: write the whole number you mean"
                                                   if isinstance(value, float) and math.isfinite(value) else ""))
        x = int(value)
        if (lo is not None and x < lo) or (hi is not None and x > hi):
            raise _fail(key, what, value, hint)
        return x

    return check


def boolean(value, key):
    if isinstance(value, bool):
        return value
    raise _fail(key, "true or false", value)


def choice(*options, null=False) -> Callable:
    what = ("null, " if null else "") + ", ".join(str(o) for o in options)
    what = f"one of {what}"

    def check(value, key):
        if value is None and null:
            return None
        if isinstance(value, str) and value in options:
            return value
        raise _fail(key, what, value)

    return check


def auto_bool(value, key):
    if value == "auto" or isinstance(value, bool):
        return value
    raise _fail(key, "auto, true or false", value)


def _of_type(kind: type, what: str) -> Callable:
    """A check that takes values of one Python type, and none where ``null``; ``what`` names the
    values taken in the error."""
    def checker(null: bool = True) -> Callable:
        def check(value, key):
            if value is None and null:
                return None
            if isinstance(value, kind):
                return value
            raise _fail(key, what + (" or null" if null else ""), value)

        return check

    return checker


text = _of_type(str, "a text")
mapping = _of_type(dict, "a mapping (key: value)")
maybe_bool = _of_type(bool, "true or false")


def path(value, key):
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return value
    raise _fail(key, "null or a path", value)


def pair(element: Callable, ordered: bool = True, null: bool = False, what: str = "[min, max]") -> Callable:
    """A list of two values checked by ``element``, min <= max when ``ordered``."""

    def check(value, key):
        if value is None and null:
            return None
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise _fail(key, f"{'null or ' if null else ''}a list {what}", value)
        a, b = (element(v, f"{key}[{i}]") for i, v in enumerate(value))
        if ordered and a > b:
            raise _fail(key, f"{what} with min <= max", value)
        return [a, b]

    return check


def numbers(length: int, element: Callable, null: bool = False) -> Callable:
    def check(value, key):
        if value is None and null:
            return None
        if not isinstance(value, (list, tuple)) or len(value) != length:
            raise _fail(key, f"{'null or ' if null else ''}a list of {length} numbers (one per RGB channel)", value)
        return [element(v, f"{key}[{i}]") for i, v in enumerate(value)]

    return check


def image_size(square_only: bool) -> Callable:
    what = "null or a whole number >= 1" + ("" if square_only else " or [H, W]")

    def check(value, key):
        if value is None:
            return None
        if isinstance(value, (list, tuple)) and not square_only:
            if len(value) != 2:
                raise _fail(key, what, value)
            return [whole(lo=1)(v, f"{key}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, (list, tuple)):
            raise _fail(key, what, value)
        try:
            return whole(lo=1)(value, key)
        except UsageError:
            raise _fail(key, what, value) from None

    return check


def device(value, key):
    """auto, cpu, cuda or cuda:N, and a CUDA device only where torch sees one."""
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise _fail(key, "one of auto, cpu, cuda, cuda:N", value)
    if value.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"{key} is {value}, but torch sees no CUDA device here; use cpu (or auto)")
        if ":" in value and int(value.split(":")[1]) >= torch.cuda.device_count():
            raise UsageError(f"{key} is {value}, but torch sees {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return value


def mask_values(value, key):
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(key, "null or a non-empty list of pixel values, e.g. [255] or [1, 2]", value)
    return [whole(lo=0, hi=65535)(v, f"{key}[{i}]") for i, v in enumerate(value)]


def loss_name(value, key):
    from ..seg.losses import LOSSES, build_loss

    if not isinstance(value, str):
        raise _fail(key, f"one of {', '.join(LOSSES)}", value)
    try:
        build_loss(value)  # aliases such as BCEDiceLoss are taken
    except ValueError:
        raise _fail(key, f"one of {', '.join(LOSSES)}", value) from None
    return value


PROBABILITY = number(0, 1)
RATE = number(0, 1, hi_open=True)

_COMMON: dict[str, Callable] = {
    "model": text(null=True), "model_kwargs": mapping(), "seed": whole(lo=0), "epochs": whole(lo=1),
    "batch_size": whole(lo=1), "drop_last": boolean,
    "optimizer.name": choice("adamw", "adamw_tfa", "adam", "sgd"), "optimizer.lr": number(0, lo_open=True),
    "optimizer.weight_decay": number(0), "optimizer.momentum": number(0, 1), "optimizer.nesterov": boolean,
    "optimizer.betas": pair(number(0, 1, hi_open=True), ordered=False, what="[beta1, beta2]"),
    "optimizer.eps": number(0, lo_open=True), "optimizer.fused": auto_bool,
    "schedule.name": choice("constant", "cosine", "onecycle"), "schedule.warmup_epochs": number(0),
    "schedule.min_lr": number(0), "schedule.per_epoch": boolean,
    "drop_path_rate": number(0, 1, hi_open=True, null=True), "clip_grad": number(0, lo_open=True, null=True),
    "ema.enabled": boolean, "ema.decay": number(0, 1, lo_open=True, hi_open=True),
    "device": device, "precision": choice("auto", "fp32", "bf16", "fp16"), "channels_last": auto_bool,
    "fast_depthwise": auto_bool, "fast_gelu": auto_bool, "fast_layernorm": auto_bool, "fast_pointwise": auto_bool, "fast_dense_conv": auto_bool, "fast_resample": auto_bool, "fast_bn_relu": auto_bool, "autotune": boolean, "picked": mapping(), "compile": auto_bool,
    "num_threads": whole(lo=1, null=True), "select": choice("best_val", "last"), "progress": boolean,
    "description": text(), "recipe": text(), "task": choice("classification", "segmentation"),
    "init": path, "freeze_backbone": boolean, "log.every_n_steps": whole(lo=1), "memory_check": boolean,
}

CLASSIFICATION: dict[str, Callable] = {
    **_COMMON, "num_classes": whole(lo=2, null=True), "img_size": image_size(square_only=True),
    "eval_batch_size": whole(lo=1),
    "shuffle_buffer": whole(lo=1, null=True, hint="images in tf.data's shuffle buffer, or null for a full shuffle"),
    "data.dataset": choice("cifar10", "cifar100", "folder"), "data.root": path, "data.val_split": RATE,
    "data.val_seed": whole(lo=0), "data.val_holdout": choice("random", "first", "first_or_random", "test"),
    "data.resize": whole(lo=1, null=True, hint="the side, in pixels, every image is resized to"),
    "data.on_bad_image": choice("error", "skip"), "data.mean": numbers(3, number(), null=True),
    "data.std": numbers(3, number(0, lo_open=True), null=True), "data.download": boolean,
    "data.release_order": maybe_bool(),
    "loss.label_smoothing": RATE,
    "augment.crop_padding": whole(lo=0), "augment.crop_pad_mode": choice("constant", "reflect"),
    "augment.hflip": PROBABILITY, "augment.vflip": PROBABILITY,
    "augment.rrc_scale": pair(number(0, 1, lo_open=True), null=True),
    "augment.rrc_ratio": pair(number(0, lo_open=True)), "augment.rotate": number(0, 180),
    "augment.randaugment_n": whole(lo=0), "augment.randaugment_m": whole(lo=0, hi=30),
    "augment.color_jitter": number(0), "augment.random_erasing": PROBABILITY,
    "augment.erasing_mode": choice("noise", "zero"), "augment.mixup_alpha": number(0),
    "augment.cutmix_alpha": number(0), "augment.mix_prob": PROBABILITY,
}

SEGMENTATION: dict[str, Callable] = {
    **_COMMON, "num_classes": whole(lo=1, null=True), "img_size": image_size(square_only=False),
    "eval_batch_size": whole(lo=1, null=True),
    "data.root": path, "data.val_split": RATE, "data.split_seed": whole(lo=0),
    "data.train_split_file": path, "data.val_split_file": path, "data.test_split": number(0, 1, hi_open=True),
    "data.test_split_file": path,
    "data.mean": numbers(3, number()), "data.std": numbers(3, number(0, lo_open=True)),
    "data.mask_threshold": whole(lo=0, hi=65534, null=True,
                                 hint="a mask pixel is foreground when its value is above it"),
    "data.mask_values": mask_values,
    "loss.name": loss_name,
    "augment.hflip": PROBABILITY, "augment.vflip": PROBABILITY, "augment.rot90": boolean,
    "augment.crop_scale": pair(number(0, 1, lo_open=True), null=True), "augment.crop_p": PROBABILITY,
    "augment.brightness": number(0), "augment.contrast": number(0),
    "threshold": number(0, 1, lo_open=True, hi_open=True),
}


def _walk(cfg: dict, prefix: str = ""):
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("model_kwargs", "picked"):
            yield from _walk(value, dotted + ".")
        else:
            yield dotted, value


def _set(cfg: dict, dotted: str, value) -> None:
    node = cfg
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    node[last] = value


def check_config(cfg: dict) -> None:
    """Check (and normalise in place) every value of a resolved configuration; raises
    :class:`UsageError` naming the first bad key, its value and what is allowed."""
    task = cfg.get("task", "classification")
    spec = SEGMENTATION if task == "segmentation" else CLASSIFICATION
    for key, value in list(_walk(cfg)):
        check = spec.get(key)
        if check is None:
            continue  # keys are checked against the defaults when merged (resolve_config)
        new = check(value, key)
        if new is not value:
            _set(cfg, key, new)
    kwargs = cfg.get("model_kwargs") or {}
    if cfg.get("model"):
        check_model_kwargs(cfg["model"], kwargs, where="model_kwargs")


# ----------------------------------------------------------------------------- model arguments

def _kind(annotation, default) -> tuple[str, str | None, bool] | None:
    """(kind, element kind, None allowed) an argument expects, from its annotation or, without
    a simple one, its default: kind int/float/bool/str/seq; None when it cannot be told."""
    text_ = annotation if isinstance(annotation, str) else (
        annotation.__name__ if isinstance(annotation, type) else
        ("" if annotation is inspect.Parameter.empty else str(annotation)))
    text_ = text_.replace("typing.", "").replace(" ", "")
    optional = False
    m = re.fullmatch(r"Optional\[(.+)\]", text_) or re.fullmatch(r"(.+)\|None", text_)
    if m:
        text_, optional = m.group(1), True
    if text_ in ("int", "float", "bool", "str"):
        return text_, None, optional or default is None
    m = re.fullmatch(r"(?:Sequence|Tuple|List|tuple|list)\[(int|float)(?:,\.\.\.)?\]", text_)
    if m:
        return "seq", m.group(1), optional or default is None
    if text_:
        return None
    if isinstance(default, bool):
        return "bool", None, False
    if isinstance(default, (int, float, str)):
        return type(default).__name__, None, False
    if isinstance(default, (list, tuple)) and default and all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in default):
        return "seq", "int", False
    return None


def _parameters(name: str) -> dict[str, inspect.Parameter]:
    """The model's keyword arguments: its class's ``__init__`` then its entrypoint's own."""
    from ..registry import model_info

    info = model_info(name)
    params: dict[str, inspect.Parameter] = {}
    for target in (info.model_cls.__init__ if info.model_cls is not None else None, info.entrypoint):
        if target is None:
            continue
        for p in inspect.signature(target).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params[p.name] = p
    return params


def _check_argument(key: str, p: inspect.Parameter, value):
    """The value, normalised, or a UsageError naming the argument, its value and what it takes."""
    default = None if p.default is inspect.Parameter.empty else p.default
    kind = _kind(p.annotation, default)
    if kind is None or (value is None and kind[2]):
        return value
    what, element, _ = kind
    hint = "" if p.default is inspect.Parameter.empty else f"its default is {show(default)}"
    # a size argument (an int with a positive default, or with none: dim, depth) must be >= 1;
    # num_classes comes from the data set and may be 0 in timm (no head)
    positive = p.name != "num_classes" and (default is None or (
        isinstance(default, int) and not isinstance(default, bool) and default >= 1) or (
        isinstance(default, (list, tuple)) and all(isinstance(v, int) and v >= 1 for v in default)))
    non_negative = isinstance(default, (int, float)) and not isinstance(default, bool) and default >= 0
    if what == "int":
        return whole(lo=1 if positive else (0 if non_negative else None), hint=hint)(value, key)
    if what == "float":
        if p.name.endswith("_rate"):
            return number(0, 1, hi_open=True, hint=hint)(value, key)
        return number(0 if non_negative else None, hint=hint)(value, key)
    if what == "bool":
        return boolean(value, key)
    if what == "str":
        if not isinstance(value, str):
            raise _fail(key, "a text", value, hint)
        return value
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(key, f"a list of {'whole numbers' if element == 'int' else 'numbers'}", value, hint)
    check = whole(lo=1 if positive else None) if element == "int" else number()
    return [check(v, f"{key}[{i}]") for i, v in enumerate(value)]


def check_model_kwargs(model: str, kwargs: dict, where: str = "--model-kwargs") -> None:
    """Refuse model arguments the model does not take or of the wrong type or sign, naming them
    (``where``: how the user gave them, e.g. ``model_kwargs`` or ``--model-kwargs``); whole
    floats (``dim=16.0``) are turned into ints in ``kwargs``."""
    from ..errors import ArgumentError

    if not isinstance(kwargs, dict):
        raise _fail(where, "a mapping of argument names to values", kwargs)
    params = _parameters(model)
    from ..registry import _accepted_kwargs, model_info

    accepted = _accepted_kwargs(model_info(model))
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise UsageError(f"{where}: {show(key)} is not an argument name")
        if accepted is not None and key not in accepted:
            valid = sorted(k for k in params if k not in ("pretrained", "device", "dtype"))
            raise ArgumentError(f"{where}: model {model!r} does not take argument {key}; it takes: {', '.join(valid)}")
        if key in params:
            kwargs[key] = _check_argument(f"{where} {key}" if where.startswith("--") else f"{where}.{key}",
                                          params[key], value)


def check_model_builds(cfg: dict, where: str = "model_kwargs") -> None:
    """Build the configured model on the meta device (no memory is allocated, nothing is
    computed) and run a batch of one through it, so that arguments the signature cannot judge
    (``dims`` that do not fit together, a window larger than the image...) are refused now,
    before any data is read, naming the arguments."""
    import torch

    from ..registry import create_model, model_info

    from ..registry import _accepted_kwargs

    kwargs = dict(cfg.get("model_kwargs") or {})
    info = model_info(cfg["model"])
    if cfg.get("drop_path_rate") is not None:
        accepted = _accepted_kwargs(info)
        if accepted is not None and "drop_path_rate" not in accepted:
            raise UsageError(f"{cfg['model']} has no stochastic depth (it takes no drop_path_rate): set "
                             f"drop_path_rate to null for it, got {show(cfg['drop_path_rate'])}")
        kwargs["drop_path_rate"] = cfg["drop_path_rate"]
    size = cfg.get("img_size")
    hw = tuple(info.input_size[1:]) if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    given = dict(kwargs, **({"img_size": size} if size is not None else {}))
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = create_model(cfg["model"], num_classes=cfg.get("num_classes"),
                                 img_size=None if size is None else hw, **kwargs)
            with torch.no_grad():
                model.eval()(torch.empty(1, getattr(model, "in_chans", info.input_size[0]), *hw))
    except NotImplementedError:
        return  # an operation without a meta kernel: the real build will tell
    except UsageError:
        raise  # create_model's own message names the arguments or the size
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError, AssertionError, IndexError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{cfg['model']} cannot be built with {where} {show(given)}: {type(e).__name__}: "
                         f"{reason[:300]}") from None
