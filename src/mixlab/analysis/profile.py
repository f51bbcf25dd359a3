"""Exact parameter counts, MACs/FLOPs and feature shapes of a model (all that `mixlab info`
prints: :func:`describe_model`), and counts written short (:func:`format_count`: 11.17M).

Convention (stated everywhere mixlab prints a number): ``torch.utils.flop_counter`` counts
the floating-point operations of convolutions and matrix products (plus attention kernels),
with one multiply-add = 2 FLOPs; mixlab reports MACs = FLOPs / 2. Element-wise work
(norms, activations, pooling) is not counted, as in the papers' tables.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from .probe import eval_mode, model_device

__all__ = ["count_params", "count_flops", "count_macs", "feature_shapes", "conv_backward_flop_fixed",
           "flop_counter", "counted_forward", "format_count", "input_hw_of", "describe_model", "CONVENTION",
           "registered_params"]

CONVENTION = ("MACs and FLOPs of one forward pass at batch 1, counted by torch.utils.flop_counter "
              "(convolutions and matrix products); FLOPs = 2 x MACs.")

aten = torch.ops.aten


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; buffers such as BatchNorm statistics are not counted."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def registered_params(name: str) -> int:
    """Parameters of the registered model ``name`` with its default arguments."""
    from ..registry import create_model

    with torch.device("meta"):  # no memory, no init compute: counting is instant even at 200M params
        model = create_model(name)
    return count_params(model)[0]


def conv_backward_flop_fixed(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                             transposed, _output_padding, groups, output_mask, out_shape=None) -> int:
    """FLOPs of ``aten.convolution_backward`` counted per group.

    torch's own formula (torch <= 2.15) builds the grad-input and grad-weight counts from
    the full weight shape as if the convolution had one group, so a grouped convolution's
    backward is counted ``groups`` times too high (a depthwise 256-channel conv: 256x); a
    fix is proposed upstream (pytorch PR #183405). Each of the two gradients costs exactly
    the forward's multiply-adds, which is what this counts.
    """
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * int(bool(output_mask[0])) + forward * int(bool(output_mask[1]))


def depthwise_weight_grad_flop(x_shape, grad_out_shape, kh, kw, *_args, out_shape=None, **_kwargs) -> int:
    """FLOPs of ``mixlab::depthwise_weight_grad`` (mixlab's fast depthwise op): the forward's
    multiply-adds, N*C*Ho*Wo*kh*kw, times 2."""
    n, c, ho, wo = grad_out_shape
    return 2 * n * c * ho * wo * kh * kw


def flop_counter(display: bool = False, depth: int | None = None, fix_grouped_backward: bool = True) -> FlopCounterMode:
    """A ``FlopCounterMode`` with mixlab's correction for grouped-conv backward, counting the
    weight gradient of mixlab's fast depthwise op too."""
    from ..ops import depthwise  # noqa: F401  (registers torch.ops.mixlab.depthwise_weight_grad)

    custom = {torch.ops.mixlab.depthwise_weight_grad: depthwise_weight_grad_flop}
    if fix_grouped_backward:
        custom[aten.convolution_backward] = conv_backward_flop_fixed
    return FlopCounterMode(display=display, depth=depth, custom_mapping=custom)


def _example_input(model: nn.Module, input_size, batch_size: int, device) -> torch.Tensor:
    if isinstance(input_size, int):
        input_size = (getattr(model, "in_chans", 3), input_size, input_size)
    elif len(input_size) == 2:
        input_size = (getattr(model, "in_chans", 3), *input_size)
    return torch.zeros(batch_size, *input_size, device=device)


def counted_forward(model: nn.Module, input_size: int | Sequence[int], batch_size: int = 1) -> FlopCounterMode:
    """The counter after one forward pass (eval mode, no grad) at ``input_size`` = N, (H, W) or (C, H, W)."""
    x = _example_input(model, input_size, batch_size, model_device(model))
    with eval_mode(model), flop_counter() as counter:
        model(x)
    return counter


def count_flops(model: nn.Module, input_size: int | Sequence[int], batch_size: int = 1) -> int:
    """FLOPs of one forward pass (eval mode, no grad) at ``input_size`` = N, (H, W) or (C, H, W)."""
    return int(counted_forward(model, input_size, batch_size).get_total_flops())


def count_macs(model: nn.Module, input_size: int | Sequence[int], batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass: FLOPs / 2 (see the module docstring)."""
    return count_flops(model, input_size, batch_size) // 2


def feature_shapes(model: nn.Module, input_size: int | Sequence[int]) -> list[dict]:
    """Shape of each stage's output, for models that declare ``feature_info`` (timm style).

    Returns ``[{"module": name, "shape": [N, C, H, W], "reduction": r, "num_chs": c}, ...]``
    for batch 1, or ``[]`` when the model declares no stages.
    """
    info = getattr(model, "feature_info", None)
    if not info:
        return []
    entries = list(info) if isinstance(info, (list, tuple)) else [info.get_dicts()][0]
    modules = dict(model.named_modules())
    shapes: dict[str, list[int]] = {}
    hooks = []
    for entry in entries:
        name = entry.get("module")
        if name in modules:
            def hook(_m, _inp, out, name=name):
                t = out[0] if isinstance(out, (tuple, list)) else out
                shapes[name] = list(t.shape)
            hooks.append(modules[name].register_forward_hook(hook))
    with eval_mode(model, hooks=hooks):
        model(_example_input(model, input_size, 1, model_device(model)))
    if str(getattr(model, "output_fmt", "NCHW")) in ("NHWC", "Format.NHWC"):
        # Swin-style stages work in (N, H, W, C); report every stage as (N, C, H, W)
        shapes = {k: [v[0], v[3], v[1], v[2]] if len(v) == 4 else v for k, v in shapes.items()}
    return [dict(module=e.get("module"), shape=shapes.get(e.get("module")), reduction=e.get("reduction"),
                 num_chs=e.get("num_chs")) for e in entries if e.get("module") in shapes]


def format_count(n: int | float | None, decimals: int | None = None) -> str:
    """A count with a unit: G, M or K, and a whole number below 1,000 ('-' for None).

    ``decimals``: digits after the point in every unit (``mixlab info``: 3, 11_173_962 ->
    '11.174M'); None: the report's about three figures (11_173_962 -> '11.17M';
    555_422_720 -> '555.4M'; 1_297_829_888 -> '1.30G'; 12_345 -> '12.3K').
    """
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            if decimals is None:
                decimals = 1 if unit == "K" or (unit == "M" and abs(n) >= 1e8) else 2
            return f"{n / scale:.{decimals}f}{unit}"
    return f"{n:.0f}"


def input_hw_of(name: str, img_size=None) -> tuple[int, int]:
    """(H, W) of ``img_size`` given as [N] or [H, W]; None: the registered model's own input size."""
    from ..registry import model_info

    if not img_size:
        return tuple(model_info(name).input_size[1:])
    return (img_size[0], img_size[0]) if len(img_size) == 1 else tuple(img_size[:2])


def describe_model(name: str, img_size=None, num_classes=None, in_chans=None, model_kwargs=None,
                   memory_check: bool = True) -> dict:
    """Everything ``mixlab info`` prints about a registered model, as a dict; ``_model`` is the
    model built (in eval mode) for it. ``memory_check``: refuse a size whose forward pass would
    not fit in the memory free (estimated first, see :mod:`mixlab.analysis.memory`)."""
    from ..registry import create_model, model_info
    from ..train.validation import check_model_kwargs

    info = model_info(name)
    hw = input_hw_of(name, img_size)
    kwargs = dict(model_kwargs or {})
    check_model_kwargs(name, kwargs)

    def build():
        return create_model(name, num_classes=num_classes, in_chans=in_chans,
                            img_size=hw if img_size is not None else None, **kwargs)
    model = build().eval()
    chans = in_chans or getattr(model, "in_chans", info.input_size[0])
    if memory_check:
        from .memory import check_memory, estimate_memory

        check_memory(estimate_memory(build, (1, chans, *hw), "infer"), "cpu",
                     f"a forward pass of {name} at {hw[0]}x{hw[1]}", "give a smaller --img-size",
                     "pass --no-memory-check")
    total, trainable = count_params(model)
    flops = count_flops(model, (chans, *hw))
    with torch.no_grad():
        out = model(torch.zeros(1, chans, *hw))
    out_shape = list(out.shape) if isinstance(out, torch.Tensor) else [list(o.shape) for o in out]
    return dict(
        name=name, family=info.family, paper=info.paper, params=total, trainable_params=trainable,
        macs=flops // 2, flops=flops, input_size=[1, chans, *hw], output_shape=out_shape,
        stages=feature_shapes(model, (chans, *hw)), paper_figures=info.paper_figures,
        model_kwargs=kwargs, convention=CONVENTION, _model=model,
    )
