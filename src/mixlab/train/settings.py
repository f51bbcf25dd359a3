"""The run's device and its speed settings: device, precision, channels_last, fast depthwise
convolution, mixlab's GELU, LayerNorm, BatchNorm + ReLU and resampling kernels, 1x1 and dense KxK convolutions, torch.compile (measured on the CPU by :mod:`mixlab.train.cpu_defaults`)."""
from __future__ import annotations

import torch
from torch import nn

from .cpu_defaults import cpu_has_bf16, has_spatial_conv
from .distributed import Distributed
from ..errors import UsageError


def pick_device(name: str, dist: Distributed) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("device cuda was asked for, but torch sees no CUDA device; use --device cpu")
        if dist.enabled and name == "cuda":
            name = f"cuda:{dist.local_rank}"
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    """The precision when not measured (CUDA, DDP, short runs): bf16 where the device has it."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def pick_channels_last(value, model: nn.Module) -> bool:
    return bool(value) if value != "auto" else has_spatial_conv(model)


def pick_run_settings(cfg: dict, model: nn.Module, device: torch.device, dist: Distributed, batch, loss_fn,
                      total_steps: int, say=print) -> dict:
    """precision, channels_last and fast_depthwise for this run, recorded in ``cfg['picked']``
    (config.yaml) so that a resumed run uses the same. On the CPU the settings left on auto are
    measured (:mod:`mixlab.train.cpu_defaults`); the fast depthwise op is switched on in
    ``model`` when picked. ``batch``: a callable giving an (inputs, targets) batch of the real
    shape for timing."""
    from ..ops.depthwise import use_fast_depthwise
    from .cpu_defaults import resolve_cpu_settings

    fast_gelu = _fast_gelu(cfg, model, device, say)
    fast_layernorm = _fast_layernorm(cfg, model, device, say)
    # before the 1x1 convolutions: the resampling op takes over a 1x1 head (UNeXt's) that it fuses
    fast_resample = _fast_resample(cfg, model, device, say)
    # after the GELU pairs and the resampling layers, which take their BatchNorms (as mixlab bench orders them)
    fast_bn_relu = _fast_bn_relu(cfg, model, device, say)
    fast_pointwise = _fast_pointwise(cfg, model, device, say)
    fast_dense_conv = _fast_dense_conv(cfg, model, device, say)
    if device.type == "cpu":
        p = resolve_cpu_settings(cfg, model, batch, loss_fn, total_steps, say, measure=not dist.enabled)
    else:  # CUDA keeps cuDNN's depthwise convolution
        p = cfg.get("picked") or dict(precision=pick_precision(cfg["precision"], device),
                                      channels_last=pick_channels_last(cfg["channels_last"], model),
                                      fast_depthwise=False, compile=cfg.get("compile") is True,
                                      how="device defaults", figures={})
    p["fast_gelu"] = fast_gelu
    p["fast_layernorm"] = fast_layernorm
    p["fast_pointwise"] = fast_pointwise
    p["fast_dense_conv"] = fast_dense_conv
    p["fast_resample"] = fast_resample
    p["fast_bn_relu"] = fast_bn_relu
    cfg["picked"] = p
    if p["fast_depthwise"] and device.type == "cpu":
        use_fast_depthwise(model)
    return p


def _fast_gelu(cfg: dict, model: nn.Module, device: torch.device, say) -> bool:
    """Whether this run uses mixlab's GELU kernels (:mod:`mixlab.ops.gelu`), switching ``model``'s
    GELUs when it does, before the CPU settings are timed (so the timings include them). A
    resumed run follows its record (runs recorded before the option existed did not use them)."""
    from ..ops.gelu import fast_gelu_available, use_fast_gelu

    return _cpu_kernel(cfg, "fast_gelu", model, device, say, fast_gelu_available,
                       lambda m: sum(use_fast_gelu(m)), "GELU and BatchNorm run as aten's operations")


def _fast_layernorm(cfg: dict, model: nn.Module, device: torch.device, say) -> bool:
    """Whether this run uses mixlab's LayerNorm kernel (:mod:`mixlab.ops.layernorm`), as
    :func:`_fast_gelu` decides for the GELU kernels."""
    from ..ops.layernorm import fast_layernorm_available, use_fast_layernorm

    return _cpu_kernel(cfg, "fast_layernorm", model, device, say, fast_layernorm_available, use_fast_layernorm,
                       "LayerNorm runs as aten's operation")


def _fast_pointwise(cfg: dict, model: nn.Module, device: torch.device, say) -> bool:
    """Whether this run's 1x1 convolutions take their weight gradient from :mod:`mixlab.ops.pointwise`
    (pure torch: available wherever torch is)."""
    from ..ops.pointwise import use_fast_pointwise

    return _cpu_kernel(cfg, "fast_pointwise", model, device, say, lambda: True, use_fast_pointwise, "")


def _fast_dense_conv(cfg: dict, model: nn.Module, device: torch.device, say) -> bool:
    """Whether this run's dense KxK convolutions run as :mod:`mixlab.ops.dense_conv` (the fastest
    of aten's, a gathered weight gradient and Winograd's per shape; available wherever torch is:
    without a C++ compiler Winograd's is left out)."""
    from ..ops.dense_conv import use_fast_dense_conv

    return _cpu_kernel(cfg, "fast_dense_conv", model, device, say, lambda: True, use_fast_dense_conv, "")


def _fast_bn_relu(cfg: dict, model: nn.Module, device: torch.device, say) -> bool:
    """Whether this run fuses its BatchNorm + ReLU pairs (:mod:`mixlab.ops.bn_relu`), as
    :func:`_fast_gelu` decides."""
    from ..ops.bn_relu import fast_bn_relu_available, use_fast_bn_relu

    return _cpu_kernel(cfg, "fast_bn_relu", model, device, say, fast_bn_relu_available, use_fast_bn_relu,
                       "BatchNorm and ReLU run as aten's operations")


def _fast_resample(cfg: dict, model: nn.Module, device: torch.device, say) -> bool:
    """Whether this run fuses the resampling layers its model names (:mod:`mixlab.ops.resample`:
    UNeXt's BatchNorm + max-pool + ReLU, BatchNorm + upsample + ReLU + skip, and upsample + ReLU + 1x1
    head), as :func:`_fast_gelu` decides."""
    from ..ops.resample import fast_resample_available, use_fast_resample

    return _cpu_kernel(cfg, "fast_resample", model, device, say, fast_resample_available, use_fast_resample,
                       "these layers run as aten's operations")


def _cpu_kernel(cfg: dict, key: str, model: nn.Module, device: torch.device, say, available, switch,
                fallback: str) -> bool:
    """On for a CPU run unless ``cfg[key]`` is false or the kernel cannot be built here; a resumed
    run follows ``cfg['picked'][key]``. Switches ``model`` when on; False where nothing in it applies."""
    from .cpu_defaults import _as_bool

    if cfg.get("picked"):
        use = bool(cfg["picked"].get(key, False))
    else:
        wanted = _as_bool(cfg.get(key, "auto"), key)
        if wanted is False or device.type != "cpu":
            return False
        if not available():
            if wanted is True:
                say(f"{key}=true was asked for, but the kernel is not available here (see the message above): "
                    f"{fallback}")
            return False
        use = True
    return use and switch(model) > 0
