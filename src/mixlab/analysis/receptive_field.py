"""Receptive fields: utilisation counts of stacked dilated convolutions, the HDC rules,
the convolutional stack of a model, and the effective receptive field from input gradients.

Utilisation count (the dilated-convolution seed's computation): for one output pixel of a
stack of KxK convolutions with dilation rates r_1..r_n, how many paths lead from each input
pixel to it. The KxK all-ones kernel is separable, so the 2-D count is the outer product of
the 1-D counts, and the 1-D count is the product of the polynomials sum_t x^(t r_i).
Pixels inside the receptive field whose count is 0 are never read: the gridding effect.

HDC (hybrid dilated convolution; Wang et al., "Understanding Convolution for Semantic
Segmentation", WACV 2018): (1) the rates have no common factor greater than 1, and (2) with
M_n = r_n and M_i = max(M_{i+1} - 2 r_i, M_{i+1} - 2 (M_{i+1} - r_i), r_i), M_2 <= K, so the
largest gap between used pixels after the first layer can still be covered by the
first layer's kernel. The rules hold per group of layers; HDC repeats groups in a sawtooth
([1, 2, 5, 1, 2, 5]), so :func:`hdc_check` checks each sawtooth group as well as the whole
stack, and the whole stack's counts for gridding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .probe import eval_mode, model_device
from ..errors import UsageError

__all__ = [
    "utilisation_counts", "rf_size", "gridding_share", "sawtooth_groups", "hdc_check", "rf_report",
    "SpatialLayer", "model_spatial_layers", "stack_counts", "model_rf_report",
    "input_gradient_map", "effective_rf", "mass_square_side", "count_colour_map", "plot_rf_counts", "plot_model_rf",
    "plot_erf",
]


# ---------------------------------------------------------------------------- dilated stacks

def _check_stack(kernel_size: int, dilations: Sequence[int]) -> list[int]:
    if int(kernel_size) != kernel_size or kernel_size < 1:
        raise UsageError(f"kernel size must be a positive integer, got {kernel_size}")
    rates = [int(r) for r in dilations]
    if not rates:
        raise UsageError("give at least one dilation rate")
    if any(r < 1 or r != d for r, d in zip(rates, dilations)):
        raise UsageError(f"dilation rates must be positive integers, got {list(dilations)}")
    return rates


def rf_size(kernel_size: int, dilations: Sequence[int]) -> int:
    """Side of the receptive field of a stride-1 stack: 1 + (K - 1) * sum(r_i)."""
    rates = _check_stack(kernel_size, dilations)
    return 1 + (kernel_size - 1) * sum(rates)


def utilisation_counts(kernel_size: int, dilations: Sequence[int], size: int | None = None) -> np.ndarray:
    """Integer matrix: how many times each input pixel is used by the centre output pixel.

    ``size`` pads the receptive field (centred; an odd surplus goes to the bottom/right)
    to a ``size x size`` input window; by default the window is the receptive field itself.
    """
    rates = _check_stack(kernel_size, dilations)
    one_d = np.ones(1, dtype=np.int64)
    for r in rates:
        taps = np.zeros((kernel_size - 1) * r + 1, dtype=np.int64)
        taps[::r] = 1
        one_d = np.convolve(one_d, taps)
    counts = np.outer(one_d, one_d)
    side = counts.shape[0]
    if size is not None:
        if size < side:
            raise UsageError(f"--size {size} is smaller than the receptive field ({side}x{side})")
        before = (size - side) // 2
        counts = np.pad(counts, (before, size - side - before))
    return counts


def gridding_share(counts: np.ndarray) -> float:
    """Share of the pixels inside the receptive field's bounding box that are never used."""
    rows, cols = np.nonzero(counts)
    if rows.size == 0:
        return 0.0
    box = counts[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    return float((box == 0).sum() / box.size)


def sawtooth_groups(dilations: Sequence[int]) -> list[list[int]]:
    """The stack's sawtooth groups: a group ends where the next rate does not rise
    ([1, 2, 5, 1, 2, 5] -> [[1, 2, 5], [1, 2, 5]]; [2, 2, 2] -> [[2], [2], [2]])."""
    rates = [int(r) for r in dilations]
    groups = [[rates[0]]]
    for r in rates[1:]:
        if r > groups[-1][-1]:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _hdc_rules(rates: list[int], kernel_size: int) -> dict:
    """Wang et al.'s two rules for one group of layers (see the module docstring)."""
    n = len(rates)
    M = [0] * n
    M[-1] = rates[-1]
    for i in range(n - 2, -1, -1):
        nxt = M[i + 1]
        M[i] = max(nxt - 2 * rates[i], nxt - 2 * (nxt - rates[i]), rates[i])
    gcd = reduce(math.gcd, rates)
    m2 = M[1] if n >= 2 else None
    m2_ok = True if m2 is None else m2 <= kernel_size
    return dict(rates=list(rates), common_factor=gcd, no_common_factor=gcd == 1, M=M, M2=m2, m2_ok=m2_ok,
                passes=(gcd == 1) and m2_ok)


def _rule_failures(rules: dict, kernel_size: int) -> list[str]:
    out = []
    if not rules["no_common_factor"]:
        out.append(f"rule 1 (no common factor > 1) fails: gcd {rules['common_factor']}")
    if not rules["m2_ok"]:
        out.append(f"rule 2 (M_2 <= K) fails: M_2 = {rules['M2']} > K = {kernel_size}")
    return out


def hdc_check(dilations: Sequence[int], kernel_size: int) -> dict:
    """Wang et al.'s HDC rules for a stack of KxK convolutions with these rates.

    The rules are stated for one group of layers, and HDC stacks groups in a sawtooth
    ([1, 2, 5, 1, 2, 5]: the group [1, 2, 5] twice). Applied to such a whole stack at once,
    rule 2 fails (M_2 = 5 > 3) although nothing grids, so the stack is read both ways: as one
    group, and as its sawtooth groups (:func:`sawtooth_groups`); either reading passing means
    every group covers its receptive field, and so does their stack. The utilisation counts
    of the whole stack are checked too (no pixel of the receptive field left unused).

    Returns the whole stack's rules at the top level (``common_factor``, ``no_common_factor``,
    ``M`` = M_1..M_n, ``M2``, ``m2_ok``; M_2 is None for one layer), ``groups`` (the rules of
    each sawtooth group), ``passes_as_stack`` / ``passes_as_groups``, ``gridding_share``,
    ``passes`` (a reading passes and nothing grids) and ``failures`` (when it fails: which
    rule failed where, one line each).
    """
    rates = _check_stack(kernel_size, dilations)
    k = int(kernel_size)
    stack = _hdc_rules(rates, k)
    groups = [_hdc_rules(g, k) for g in sawtooth_groups(rates)]
    as_groups = all(g["passes"] for g in groups)
    share = gridding_share(utilisation_counts(k, rates))
    passes = (stack["passes"] or as_groups) and share == 0.0
    failures: list[str] = []
    if not passes:
        failures += [f"whole stack {rates}: {f}" for f in _rule_failures(stack, k)]
        if len(groups) > 1:
            seen = []
            for g in groups:
                if g["rates"] in seen:
                    continue
                seen.append(g["rates"])
                failures += [f"sawtooth group {g['rates']}: {f}" for f in _rule_failures(g, k)]
        if share > 0:
            failures.append(f"whole stack {rates}: {100 * share:.1f}% of its receptive field is never used (gridding)")
    return dict(rates=rates, kernel_size=k, common_factor=stack["common_factor"],
                no_common_factor=stack["no_common_factor"], M=stack["M"], M2=stack["M2"], m2_ok=stack["m2_ok"],
                passes_as_stack=stack["passes"], groups=groups, passes_as_groups=as_groups,
                gridding_share=share, passes=passes, failures=failures)


def rf_report(kernel_size: int, dilations: Sequence[int], size: int | None = None) -> dict:
    """Everything ``mixlab rf --kernel K --dilations ...`` shows, as plain numbers."""
    counts = utilisation_counts(kernel_size, dilations, size)
    return dict(kernel_size=int(kernel_size), dilations=[int(r) for r in dilations],
                rf_size=rf_size(kernel_size, dilations), window=int(counts.shape[0]),
                gridding_share=gridding_share(counts), max_count=int(counts.max()),
                hdc=hdc_check(dilations, kernel_size), counts=counts.tolist())


# ---------------------------------------------------------------------------- models

@dataclass
class SpatialLayer:
    """A convolution or pooling that moves information across pixels, as it ran."""

    name: str
    kind: str  # stem | depthwise | downsample | conv | pool
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad: tuple[int, int]  # top and left padding
    in_size: tuple[int, int]
    out_size: tuple[int, int]

    def as_dict(self) -> dict:
        return dict(name=self.name, kind=self.kind, kernel=list(self.kernel), stride=list(self.stride),
                    dilation=list(self.dilation), pad=list(self.pad), in_size=list(self.in_size),
                    out_size=list(self.out_size))


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _leading_pad(module: nn.Module, kernel, dilation, stride) -> tuple[int, int]:
    pad = module.padding
    if pad == "valid":
        return (0, 0)
    if pad == "same":  # torch puts the odd extra pixel at the end
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))  # type: ignore[return-value]
    return _pair(pad)


def model_spatial_layers(model: nn.Module, input_size, stop_at: str | None = None) -> list[SpatialLayer]:
    """The Conv2d/pooling layers that mix pixels (kernel or stride > 1), in execution order.

    Runs one forward on the meta device when the model lives there, else on a zero batch of
    one. ``stop_at`` names a module: layers that run after it finishes are left out (the
    classifier head's convolutions, when ``stop_at`` is the last spatial stage).
    """
    from .viz import example_input, stem_conv

    stem_name = stem_conv(model)[0]
    calls: list[tuple[str, nn.Module, tuple, tuple]] = []
    finished: list[int] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            def hook(mod, inp, out, name=name):
                calls.append((name, mod, tuple(inp[0].shape[-2:]), tuple(out.shape[-2:])))
            hooks.append(module.register_forward_hook(hook))
        if stop_at is not None and name == stop_at:
            hooks.append(module.register_forward_hook(lambda *_: finished.append(len(calls))))
    with eval_mode(model, hooks=hooks):
        model(example_input(model, input_size))
    if stop_at is not None:
        if not finished:
            raise ValueError(f"module {stop_at!r} did not run in the forward pass")
        calls = calls[: finished[-1]]
    layers = []
    for name, mod, in_size, out_size in calls:
        kernel, stride = _pair(mod.kernel_size), _pair(mod.stride)
        dilation = _pair(getattr(mod, "dilation", 1))
        if kernel == (1, 1) and stride == (1, 1):
            continue
        if isinstance(mod, nn.Conv2d):
            pad = _leading_pad(mod, kernel, dilation, stride)
            if name == stem_name:
                kind = "stem"
            elif mod.groups == mod.in_channels == mod.out_channels:
                kind = "depthwise"
            elif stride != (1, 1):
                kind = "downsample"
            else:
                kind = "conv"
        else:
            pad, kind = _pair(mod.padding), "pool"
        layers.append(SpatialLayer(name, kind, kernel, stride, dilation, pad, in_size, out_size))
    return layers


def stack_counts(layers: Sequence[SpatialLayer], frame: bool = False) -> np.ndarray:
    """Path counts from each input pixel to one output pixel through ``layers``.

    ``frame=False``: the unpadded receptive field (square side = the theoretical RF).
    ``frame=True``: the count map of the centre pixel of the last layer's real output in
    the real input frame, with padding and borders applied (the RF as the model sees it).
    Counts are float64: deep stacks exceed int64 path counts.
    """
    if not layers:
        raise ValueError("no spatial layers to compose")
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    if frame:
        h, w = layers[-1].out_size
        x = torch.zeros(1, 1, h, w, dtype=torch.float64)
        x[0, 0, h // 2, w // 2] = 1.0
    for layer in reversed(layers):
        ones = torch.ones(1, 1, *layer.kernel, dtype=torch.float64)
        x = torch.nn.functional.conv_transpose2d(x, ones, stride=layer.stride, dilation=layer.dilation)
        if frame:  # full output index p + pad <-> input pixel p; clip to the real input
            (ph, pw), (ih, iw) = layer.pad, layer.in_size
            x = torch.nn.functional.pad(x, (0, max(0, pw + iw - x.shape[-1]), 0, max(0, ph + ih - x.shape[-2])))
            x = x[..., ph: ph + ih, pw: pw + iw]
    return x[0, 0].numpy()


def model_rf_report(model: nn.Module, input_size, target: str | None = None) -> dict:
    """The receptive field of a model's convolutional stem + depthwise stack.

    Defined for models that have depthwise convolutions (ConvMixer, Conv2Former, ConvMLP...).
    Also measures, on the model as it is (random or trained weights, eval mode), which input
    pixels the centre of the last spatial map depends on at all: when that support is wider
    than the convolutions' receptive field, the model mixes pixels in other ways too
    (attention, token MLPs, shifts, normalisation or gating over space), and ``note`` says so.
    """
    from .viz import find_spatial_target

    target = target or find_spatial_target(model, input_size)["name"]
    layers = model_spatial_layers(model, input_size, stop_at=target)
    if not any(layer.kind == "depthwise" for layer in layers):
        raise UsageError(
            f"{type(model).__name__} has no depthwise convolution before {target!r}: the stem + depthwise "
            "receptive field is defined for convolutional mixers (ConvMixer, Conv2Former, ConvMLP...); "
            "use `mixlab rf --effective` to measure where any model looks")
    counts = stack_counts(layers)
    jump = int(np.prod([layer.stride[0] for layer in layers]))
    report = dict(target=target, input_size=list(layers[0].in_size), layers=[layer.as_dict() for layer in layers],
                  rf_size=int(counts.shape[0]),
                  jump=jump, gridding_share=gridding_share(counts), max_count=float(counts.max()),
                  counts=counts)
    on_meta = any(p.is_meta for p in model.parameters())
    if not on_meta:
        framed = stack_counts(layers, frame=True)
        grad = input_gradient_map(model, None, input_size, target=target, n_random=1)
        conv_box, grad_box = _bbox(framed > 0), _bbox(grad > 0)
        wider = grad_box is not None and conv_box is not None and (
            grad_box[0] < conv_box[0] or grad_box[1] > conv_box[1]
            or grad_box[2] < conv_box[2] or grad_box[3] > conv_box[3])
        report.update(conv_box=conv_box, measured_box=grad_box, frame_counts=framed)
        report["note"] = ("the centre output depends on pixels outside the convolutions' receptive field: "
                          "this model also mixes pixels by other means, so its real receptive field is wider"
                          if wider else "")
    return report


def _bbox(mask: np.ndarray) -> list[int] | None:
    """[top, bottom, left, right] (inclusive) of the True pixels, or None."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return [int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())]


# ---------------------------------------------------------------------------- effective RF

def input_gradient_map(model: nn.Module, images: torch.Tensor | None, input_size, target: str | None = None,
                       n_random: int = 8, seed: int = 0) -> np.ndarray:
    """Mean |d (centre of the last spatial map, summed over channels) / d input|, summed over
    input channels: an (H, W) map (Luo et al., "Understanding the Effective Receptive Field").

    ``images`` are already normalised model inputs; ``None`` draws ``n_random`` N(0, 1) inputs.
    """
    from .viz import capture_spatial, example_input, find_spatial_target

    info = find_spatial_target(model, input_size, target)
    target = info["name"]
    if images is None:
        gen = torch.Generator().manual_seed(seed)
        shape = example_input(model, input_size).shape[1:]
        images = torch.randn(n_random, *shape, generator=gen)
    device = model_device(model)
    total = None
    with eval_mode(model, grad=True):
        for chunk in images.split(16):
            x = chunk.to(device).float().requires_grad_(True)
            with capture_spatial(model, target, input_size, info) as cap:
                model(x)
            fmap = cap.nchw()  # (N, C, h, w)
            h, w = fmap.shape[-2:]
            fmap[:, :, h // 2, w // 2].sum().backward()
            g = x.grad.detach().abs().sum(1).sum(0).double().cpu()
            total = g if total is None else total + g
    return (total / len(images)).numpy()


def mass_square_side(grad_map: np.ndarray, fraction: float, centre: tuple[float, float] | None = None) -> int:
    """Side of the smallest square centred on ``centre`` (default: the map's centre of mass)
    holding ``fraction`` of the map's total mass (in pixels, odd)."""
    total = grad_map.sum()
    if total <= 0:
        return 0
    h, w = grad_map.shape
    if centre is None:
        ys, xs = np.mgrid[0:h, 0:w]
        centre = (float((ys * grad_map).sum() / total), float((xs * grad_map).sum() / total))
    cy, cx = round(centre[0]), round(centre[1])
    ys, xs = np.mgrid[0:h, 0:w]
    dist = np.maximum(np.abs(ys - cy), np.abs(xs - cx)).ravel()
    order = np.argsort(dist, kind="stable")
    cum = np.cumsum(grad_map.ravel()[order])
    k = int(np.searchsorted(cum, fraction * total - 1e-12 * total))
    return 2 * int(dist[order][min(k, len(order) - 1)]) + 1


def effective_rf(model: nn.Module, images: torch.Tensor | None, input_size, target: str | None = None,
                 n_random: int = 8) -> dict:
    """The effective receptive field: the gradient map and the sides of the centred squares
    holding 50 / 90 / 95 % of its mass, with the theoretical RF when the model has one."""
    from .viz import find_spatial_target

    target = target or find_spatial_target(model, input_size)["name"]
    grad = input_gradient_map(model, images, input_size, target=target, n_random=n_random)
    h, w = grad.shape
    total = grad.sum()
    ys, xs = np.mgrid[0:h, 0:w]
    centre = (float((ys * grad).sum() / total), float((xs * grad).sum() / total)) if total > 0 else (h / 2, w / 2)
    out = dict(target=target, input_size=[h, w], n_images=int(len(images) if images is not None else n_random),
               centre=list(centre), map=grad,
               side_50=mass_square_side(grad, 0.5, centre), side_90=mass_square_side(grad, 0.9, centre),
               side_95=mass_square_side(grad, 0.95, centre))
    try:
        layers = model_spatial_layers(model, input_size, stop_at=target)
        framed = stack_counts(layers, frame=True) if layers else None
    except ValueError:
        framed = None
    if framed is not None and framed.shape == grad.shape:
        inside = framed > 0
        out["theoretical_box"] = _bbox(inside)
        out["mass_inside_theoretical"] = float(grad[inside].sum() / total) if total > 0 else 0.0
    return out


# ---------------------------------------------------------------------------- figures

def _rules_text(rules: dict, kernel_size: int) -> str:
    rule1 = f"gcd {rules['common_factor']}{'' if rules['no_common_factor'] else ' (FAIL)'}"
    if rules["M2"] is None:
        return f"{rule1}, M_2 n/a (one layer)"
    return f"{rule1}, M_2 = {rules['M2']} {'<=' if rules['m2_ok'] else '> (FAIL)'} K = {kernel_size}"


def _rf_caption(report: dict) -> str:
    hdc = report["hdc"]
    k = hdc["kernel_size"]
    parts = []
    distinct = {tuple(g["rates"]): g for g in hdc["groups"]}
    if len(hdc["groups"]) > 1:
        parts.append("groups " + "; ".join(f"{list(r)}: {_rules_text(g, k)}" for r, g in distinct.items()))
    parts.append(f"{'whole stack: ' if len(hdc['groups']) > 1 else ''}{_rules_text(hdc, k)}")
    verdict = "passes" if hdc["passes"] else "fails"
    return (f"receptive field {report['rf_size']}x{report['rf_size']}, never used inside it: "
            f"{100 * report['gridding_share']:.1f}%\nHDC {verdict}: " + "; ".join(parts))


# The dilated-convolution seed draws its count matrix with a colour map running from white
# (0: never used) through blue to red (the largest count).
SEED_COUNT_COLOURS = ("white", "blue", "red")


def count_colour_map(name: str = "seed"):
    """``seed``: the seed's white -> blue -> red map; any other name: matplotlib's map of that name."""
    from matplotlib import colormaps
    from matplotlib.colors import LinearSegmentedColormap

    if name == "seed":
        return LinearSegmentedColormap.from_list("seed_counts", SEED_COUNT_COLOURS)
    if name not in colormaps:
        raise UsageError(f"unknown colour map {name!r}: use 'seed' (white -> blue -> red) or a matplotlib "
                         "colour map name such as viridis or magma")
    return colormaps[name]


def plot_rf_counts(report: dict, dpi: int = 100, cmap: str = "seed"):
    """The utilisation-count matrix with each count written in its cell, on a colour scale from
    0 (pixels never used, white in the seed's map; also white in any other map) to the largest
    count. Matrix side: 0.5 in per cell up to 10 in, +1.5 in each way."""
    from .viz import _figure, _wrap

    counts = np.asarray(report["counts"])
    n = counts.shape[0]
    side = min(n * 0.5, 10.0)
    fig = _figure(side + 1.5, side + 1.5, dpi)
    ax = fig.subplots()
    shown = np.ma.masked_equal(counts, 0)
    im = ax.imshow(shown, cmap=count_colour_map(cmap), interpolation="nearest", vmin=0,
                   vmax=max(int(counts.max()), 1))
    ax.set_facecolor("white")
    cell = side / n
    digits = len(str(int(counts.max())))
    if cell >= 0.2:
        fs = min(10.0, cell * 72 / (0.62 * digits + 0.6))
        cmap_obj, vmax = im.get_cmap(), float(counts.max())
        for (i, j), v in np.ndenumerate(counts):
            if v == 0:
                color = "0.6"
            else:  # dark text on the light end of the colour map, light text on the dark end
                r, g, b, _ = cmap_obj(v / max(vmax, 1e-9))
                color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=fs, color=color)
    ticks = np.arange(n)
    centre = (n - 1) / 2
    step = max(1, n // 10)
    ax.set_xticks(ticks[::step])
    ax.set_yticks(ticks[::step])
    ax.set_xticklabels([f"{t - centre:+g}" for t in ticks[::step]], fontsize=8)
    ax.set_yticklabels([f"{t - centre:+g}" for t in ticks[::step]], fontsize=8)
    ax.set_xlabel("input column offset from the output pixel")
    ax.set_ylabel("input row offset")
    cb = fig.colorbar(im, ax=ax, shrink=0.8, pad=0.02)
    cb.set_label("times the pixel is used (paths to the output pixel)")
    rates = ", ".join(str(r) for r in report["dilations"])
    ax.set_title(_wrap(f"Utilisation counts: {report['kernel_size']}x{report['kernel_size']} kernels, "
                       f"dilations [{rates}]\n{_rf_caption(report)}", side + 0.5, 10, 4), fontsize=10)
    return fig


def _stack_summary(layers: Sequence[dict]) -> str:
    parts: list[str] = []
    last, count = None, 0
    for layer in layers:
        k, s, d = layer["kernel"], layer["stride"], layer["dilation"]
        desc = f"{layer['kind']} {k[0]}x{k[1]}" + (f"/{s[0]}" if s[0] > 1 else "") + (f" d{d[0]}" if d[0] > 1 else "")
        if desc == last:
            count += 1
            continue
        if last is not None:
            parts.append(f"{count} x {last}" if count > 1 else last)
        last, count = desc, 1
    if last is not None:
        parts.append(f"{count} x {last}" if count > 1 else last)
    return " + ".join(parts)


def plot_model_rf(report: dict, model_name: str, dpi: int = 100, cmap: str = "magma"):
    """A model's stem + depthwise-stack path counts at input resolution (7.5 x 6.5 in)."""
    from .viz import _figure, _wrap

    counts = np.asarray(report["counts"], dtype=float)
    n = counts.shape[0]
    fig = _figure(7.5, 6.5, dpi)
    ax = fig.subplots()
    from matplotlib.colors import LogNorm

    positive = counts[counts > 0]
    log = positive.size and positive.max() / positive.min() > 1e3
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if log else None
    im = ax.imshow(np.ma.masked_equal(counts, 0), cmap=cmap, norm=norm, interpolation="nearest",
                   extent=(-n / 2, n / 2, n / 2, -n / 2))
    ax.set_facecolor("white")
    if report.get("input_size"):  # how the receptive field compares with the whole picture
        from matplotlib.patches import Rectangle

        ih, iw = report["input_size"]
        ax.add_patch(Rectangle((-iw / 2, -ih / 2), iw, ih, fill=False, edgecolor="cyan", linestyle="--",
                               linewidth=1.2, label=f"input image size ({ih}x{iw})"))
        ax.set_xlim(-max(n, iw) / 2 - 0.5, max(n, iw) / 2 + 0.5)
        ax.set_ylim(max(n, ih) / 2 + 0.5, -max(n, ih) / 2 - 0.5)
        ax.legend(loc="lower right", fontsize=8, framealpha=0.7)
    ax.set_xlabel("input column offset (pixels)")
    ax.set_ylabel("input row offset (pixels)")
    cb = fig.colorbar(im, ax=ax, shrink=0.8, pad=0.02)
    cb.set_label("paths from the pixel to one output unit" + (" (log scale)" if log else ""))
    lines = [f"{model_name}: receptive field of one '{report['target']}' unit = {n}x{n} input pixels",
             _stack_summary(report["layers"]) + f"; unused inside the RF: {100 * report['gridding_share']:.1f}%"]
    if report.get("note"):
        lines.append("note: " + report["note"])
    ax.set_title(_wrap("\n".join(lines), 5.75, 9, 4), fontsize=9)
    return fig


def plot_erf(report: dict, model_name: str, image_source: str, dpi: int = 100, cmap: str = "inferno"):
    """The effective receptive field: mean |input gradient| of the centre unit of the last
    spatial map, scaled to its max, with the 90 %-mass square and the theoretical RF (7 x 6.25 in)."""
    from matplotlib.patches import Rectangle

    from .viz import _figure, _wrap

    grad = np.asarray(report["map"], dtype=float)
    peak = grad.max() if grad.max() > 0 else 1.0
    fig = _figure(7.0, 6.25, dpi)
    ax = fig.subplots()
    im = ax.imshow(grad / peak, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    cy, cx = report["centre"]
    half = report["side_90"] / 2
    ax.add_patch(Rectangle((round(cx) - half, round(cy) - half), 2 * half, 2 * half, fill=False,
                           edgecolor="cyan", linewidth=1.5, label=f"90% of the mass: {report['side_90']} px"))
    box = report.get("theoretical_box")
    if box is not None:
        t, b, l, r = box
        ax.add_patch(Rectangle((l - 0.5, t - 0.5), r - l + 1, b - t + 1, fill=False, edgecolor="white",
                               linestyle="--", linewidth=1.2, label="theoretical receptive field"))
    ax.legend(loc="lower right", fontsize=8, framealpha=0.7)
    ax.set_xlabel("input column (pixels)")
    ax.set_ylabel("input row (pixels)")
    cb = fig.colorbar(im, ax=ax, shrink=0.8, pad=0.02)
    cb.set_label("mean |d centre unit / d pixel| (scaled to max)")
    extra = (f", {100 * report['mass_inside_theoretical']:.0f}% inside the theoretical RF"
             if "mass_inside_theoretical" in report else "")
    ax.set_title(_wrap(f"Effective receptive field of {model_name}, centre unit of '{report['target']}', "
                       f"over {report['n_images']} {image_source}\n50% / 90% / 95% of the gradient within "
                       f"{report['side_50']} / {report['side_90']} / {report['side_95']} px squares{extra}",
                       5.75, 9, 4), fontsize=9)
    return fig
