"""Looking inside models: filter and kernel grids, feature maps, saliency (Grad-CAM, input gradients).

Layer finding works on any timm-style model (mixlab's and timm's): the stem is the model's
``pretrained_cfg["first_conv"]`` or its first ``Conv2d``; depthwise convolutions are the
``Conv2d`` with ``groups == in_channels == out_channels``; the last spatial stage is the
last module (in completion order) whose output is a spatial map, in NCHW, NHWC or token
(N, L, C) layout, told apart by how its sizes divide the input size.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas (no pyplot
state) at fixed sizes: a figure's pixel size depends only on what it shows and ``dpi``.
"""
from __future__ import annotations

import contextlib
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .probe import eval_mode, model_device
from ..errors import UsageError

__all__ = [
    "example_input", "input_hw", "stem_conv", "conv_layers", "depthwise_convs", "kernel_layer",
    "weight_tiles", "grid_shape", "tile_mosaic", "spatial_layout", "find_spatial_target", "spatial_candidates",
    "capture_spatial", "gradcam", "input_gradients", "feature_maps", "default_feature_layers",
    "plot_weight_grid", "plot_features", "plot_saliency", "save_figure",
]


# ---------------------------------------------------------------------------- model plumbing

def input_hw(model: nn.Module, input_size=None) -> tuple[int, int]:
    """(H, W) from an int, (H, W), (C, H, W), or the model's pretrained_cfg input size."""
    if input_size is None:
        input_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
    if isinstance(input_size, int):
        return (input_size, input_size)
    return (int(input_size[-2]), int(input_size[-1]))


def example_input(model: nn.Module, input_size=None, batch_size: int = 1) -> torch.Tensor:
    chans = getattr(model, "in_chans", None) or stem_conv(model)[1].in_channels
    return torch.zeros(batch_size, chans, *input_hw(model, input_size), device=model_device(model))


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def stem_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The patch-embedding / stem convolution: timm's ``first_conv`` if it names a Conv2d,
    else the first Conv2d the model registers."""
    modules = dict(model.named_modules())
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if isinstance(first, str) and isinstance(modules.get(first), nn.Conv2d):
        return first, modules[first]
    convs = conv_layers(model)
    if not convs:
        raise UsageError(f"{type(model).__name__} has no Conv2d: there are no stem filters to show")
    return convs[0]


def depthwise_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Depthwise convolutions with a kernel larger than 1x1, in registration order."""
    return [(n, m) for n, m in conv_layers(model)
            if m.groups == m.in_channels == m.out_channels and m.kernel_size[0] * m.kernel_size[1] > 1]


def kernel_layer(model: nn.Module, layer: str | None = None, block: int | None = None) -> tuple[str, nn.Conv2d]:
    """The convolution whose kernels ``viz kernels`` shows: ``layer`` by name, or depthwise
    convolution number ``block`` (from 0), or by default the seed's choice: the middle one,
    rounding down ((n - 1) // 2: the 4th of ConvMixer-256/8's 8, the Keras seed's layer 26)."""
    if layer not in (None, "auto"):
        convs = dict(conv_layers(model))
        if layer not in convs:
            raise UsageError(f"{layer!r} is not a Conv2d of {type(model).__name__}; "
                             "run with --list-layers for the names")
        return layer, convs[layer]
    dws = depthwise_convs(model)
    if not dws:
        raise UsageError(f"{type(model).__name__} has no depthwise convolution with a kernel larger than 1x1; "
                         "pick a convolution with --layer NAME (see --list-layers)")
    if block is None:
        return dws[(len(dws) - 1) // 2]
    if not -len(dws) <= block < len(dws):
        raise UsageError(f"--block {block} is out of range: the model has {len(dws)} depthwise convolutions "
                         f"(blocks 0..{len(dws) - 1})")
    return dws[block]


# ---------------------------------------------------------------------------- weights as tiles

NORMALIZE = ("global", "tile")


def weight_tiles(weight: torch.Tensor, normalize: str = "global") -> tuple[np.ndarray, str]:
    """One tile per output channel, min-max scaled to [0, 1].

    ``normalize``: ``global`` scales all tiles with one min and max, those of the whole weight
    tensor (what the Keras ConvMixer seed does before drawing, so tiles compare with each
    other); ``tile`` scales each tile by its own min and max (each shows its full contrast).
    Returns ``(tiles, mode)``: ``rgb`` (O, kh, kw, 3) when each filter sees 3 input channels,
    ``single`` (O, kh, kw) when it sees one, else ``strongest`` (O, kh, kw): the slice of
    the input channel with the largest norm, per filter (scaled, with ``global``, by the
    min and max of those slices).
    """
    if normalize not in NORMALIZE:
        raise UsageError(f"normalize must be 'global' (one min-max over the whole tensor, as the seed) or 'tile' "
                         f"(each tile on its own), got {normalize!r}")
    w = weight.detach().float().cpu()
    if w.dim() != 4:
        raise ValueError(f"expected a Conv2d weight (O, I, kh, kw), got shape {tuple(w.shape)}")
    fan_in = w.shape[1]
    if fan_in == 3:
        tiles, mode = w.permute(0, 2, 3, 1), "rgb"
    elif fan_in == 1:
        tiles, mode = w[:, 0], "single"
    else:
        strongest = w.flatten(2).norm(dim=2).argmax(dim=1)
        tiles, mode = w[torch.arange(w.shape[0]), strongest], "strongest"
    flat = tiles.reshape(tiles.shape[0], -1)
    if normalize == "global":
        lo, hi = flat.min().expand(flat.shape[0]), flat.max().expand(flat.shape[0])
    else:
        lo, hi = flat.min(1).values, flat.max(1).values
    span = (hi - lo).clamp_min(1e-12)
    norm = (flat - lo[:, None]) / span[:, None]
    norm[hi - lo < 1e-12] = 0.5  # a constant filter (or tensor) has no contrast to show
    return norm.reshape(tiles.shape).numpy(), mode


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of a near-square grid: cols = ceil(sqrt(n)); 256 -> 16 x 16."""
    if n < 1:
        raise ValueError("nothing to show: zero tiles")
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


# ---------------------------------------------------------------------------- spatial outputs

def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _grid_ok(h: int, w: int, hw: tuple[int, int]) -> bool:
    """A map of h x w can come from an H x W input by one reduction factor (within rounding)."""
    if h < 1 or w < 1 or h > hw[0] or w > hw[1]:
        return False
    rh, rw = hw[0] / h, hw[1] / w
    return abs(rh - rw) <= 0.15 * max(rh, rw)


def spatial_layout(shape: Sequence[int], hw: tuple[int, int], prefix_tokens: int = 0,
                   channels: int | None = None) -> dict | None:
    """How a module output of ``shape`` lays out space, for an ``hw`` input.

    Returns ``dict(layout="nchw"|"nhwc"|"tokens", h=, w=, c=, prefix=)`` or None when the
    tensor is not a spatial map. ``channels`` breaks NCHW/NHWC ties (e.g. N x 8 x 8 x 8).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4:
        _, a, b, c = shape
        nchw, nhwc = _grid_ok(b, c, hw), _grid_ok(a, b, hw)
        if nchw and nhwc:
            nchw = channels is None or channels == a
            nhwc = not nchw
        if nchw:
            return dict(layout="nchw", h=b, w=c, c=a, prefix=0)
        if nhwc:
            return dict(layout="nhwc", h=a, w=b, c=c, prefix=0)
        return None
    if len(shape) == 3:
        _, length, c = shape
        for p in dict.fromkeys((prefix_tokens, 0)):
            n = length - p
            if n < 1:
                continue
            r = math.sqrt(hw[0] * hw[1] / n)
            h, w = round(hw[0] / r), round(hw[1] / r)
            if h * w == n and _grid_ok(h, w, hw):
                return dict(layout="tokens", h=h, w=w, c=c, prefix=p)
    return None


def _to_nchw(t: torch.Tensor, info: dict) -> torch.Tensor:
    if info["layout"] == "nchw":
        return t
    if info["layout"] == "nhwc":
        return t.permute(0, 3, 1, 2)
    t = t[:, info["prefix"]:]
    return t.transpose(1, 2).reshape(t.shape[0], info["c"], info["h"], info["w"])


def spatial_candidates(model: nn.Module, input_size=None) -> list[dict]:
    """Every module whose output is a spatial map with more than one pixel, in the order
    the modules finish (one forward on a batch of 1; meta models run on meta)."""
    hw = input_hw(model, input_size)
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    found: dict[str, dict] = {}
    order: list[str] = []
    hooks = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod, _inp, out, name=name):
            t = _first_tensor(out)
            if t is None:
                return
            channels = getattr(mod, "out_channels", None) or getattr(mod, "num_features", None)
            info = spatial_layout(t.shape, hw, prefix, channels if isinstance(channels, int) else None)
            if info is not None and info["h"] * info["w"] > 1:
                found[name] = dict(name=name, type=type(mod).__name__, shape=list(t.shape), **info)
                if name in order:
                    order.remove(name)
                order.append(name)
        hooks.append(module.register_forward_hook(hook))
    with eval_mode(model, hooks=hooks):
        model(example_input(model, hw))
    return [found[n] for n in order]


def find_spatial_target(model: nn.Module, input_size=None, layer: str | None = None) -> dict:
    """The last spatial stage (Grad-CAM's layer), or the named ``layer`` if it is spatial."""
    cands = spatial_candidates(model, input_size)
    if layer not in (None, "auto"):
        for c in cands:
            if c["name"] == layer:
                return c
        if layer not in dict(model.named_modules()):
            raise UsageError(f"{layer!r} is not a module of {type(model).__name__}; run with --list-layers")
        raise UsageError(f"module {layer!r} does not output a spatial map (N,C,H,W / N,H,W,C / tokens) "
                         "with more than one pixel; run with --list-layers")
    if not cands:
        raise UsageError(f"{type(model).__name__} has no module producing a spatial map with more than one "
                         "pixel at this input size")
    return cands[-1]


@dataclass
class _Capture:
    info: dict
    output: torch.Tensor | None = None

    def nchw(self, t: torch.Tensor | None = None) -> torch.Tensor:
        return _to_nchw(self.output if t is None else t, self.info)


@contextmanager
def capture_spatial(model: nn.Module, name: str, input_size=None, info: dict | None = None) -> Iterator[_Capture]:
    """Keep the output of module ``name`` during the forward passes in the block.

    ``info`` is the module's entry from :func:`spatial_candidates` (found with one extra
    forward when not given). The hook hands the rest of the network a clone, so in-place
    operations after the module (``x += shortcut``, ``ReLU(inplace=True)``) cannot change
    the kept activation; gradients still flow back through the clone to it.
    """
    cap = _Capture(info or find_spatial_target(model, input_size, layer=name))
    module = dict(model.named_modules())[name]

    def hook(_mod, _inp, out):
        t = _first_tensor(out)
        cap.output = t
        if isinstance(out, torch.Tensor):
            return out.clone()
        return None

    handle = module.register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()


# ---------------------------------------------------------------------------- saliency, features

def _targets(logits: torch.Tensor, target) -> torch.Tensor:
    if target is None:
        return logits.argmax(1)
    target = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    return target.expand(logits.shape[0]) if target.numel() == 1 else target


def gradcam(model: nn.Module, x: torch.Tensor, target=None, layer: str | None = None) -> tuple[np.ndarray, dict]:
    """Grad-CAM maps (N, H, W) in [0, 1] at the input resolution, for class ``target``
    (one int, one per image, or None = the predicted class); returns ``(maps, info)`` with
    the layer used, logits and classes."""
    hw = tuple(x.shape[-2:])
    info = find_spatial_target(model, hw, layer)
    name = info["name"]
    with eval_mode(model, grad=True):
        with capture_spatial(model, name, hw, info) as cap:
            logits = model(x)
        cls = _targets(logits, target)
        score = logits.gather(1, cls[:, None]).sum()
        grad = torch.autograd.grad(score, cap.output)[0]
    acts, grads = cap.nchw(cap.output.detach()).float(), cap.nchw(grad).float()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * acts).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=hw, mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.clamp_min(1e-12)
    maps = (cam / peak[:, None, None]).cpu().numpy()
    return maps, dict(layer=name, logits=logits.detach().cpu(), classes=cls.cpu(), shape=list(cap.output.shape))


def input_gradients(model: nn.Module, x: torch.Tensor, target=None) -> tuple[np.ndarray, dict]:
    """|d score / d input|, max over colour channels (Simonyan et al. 2014), scaled to [0, 1]."""
    with eval_mode(model, grad=True):
        x = x.detach().clone().requires_grad_(True)
        logits = model(x)
        cls = _targets(logits, target)
        grad = torch.autograd.grad(logits.gather(1, cls[:, None]).sum(), x)[0]
    sal = grad.abs().amax(1)
    peak = sal.flatten(1).max(1).values.clamp_min(1e-12)
    return (sal / peak[:, None, None]).cpu().numpy(), dict(layer="input", logits=logits.detach().cpu(),
                                                          classes=cls.cpu())


def default_feature_layers(model: nn.Module, input_size=None, max_layers: int = 4) -> list[str]:
    """Up to ``max_layers`` stages spread over the model's ``feature_info`` (last one included),
    or the last spatial stage when the model declares none."""
    modules = dict(model.named_modules())
    info = getattr(model, "feature_info", None) or []
    names = [e["module"] for e in info if isinstance(e, dict) and e.get("module") in modules]
    if not names:
        return [find_spatial_target(model, input_size)["name"]]
    picks = np.linspace(0, len(names) - 1, min(max_layers, len(names))).round().astype(int)
    return [names[i] for i in dict.fromkeys(picks.tolist())]


def feature_maps(model: nn.Module, x: torch.Tensor, layers: Sequence[str], top_k: int = 8) -> list[dict]:
    """For one image ``x`` (1, C, H, W): per layer the ``top_k`` channels with the highest
    activation energy (mean square over the map), their maps and energies."""
    if x.shape[0] != 1:
        raise UsageError("feature maps are drawn for one image at a time")
    hw = tuple(x.shape[-2:])
    infos = [find_spatial_target(model, hw, name) for name in layers] if len(layers) == 1 else None
    if infos is None:
        cands = {c["name"]: c for c in spatial_candidates(model, hw)}
        infos = [cands[n] if n in cands else find_spatial_target(model, hw, n) for n in layers]
    with eval_mode(model), contextlib.ExitStack() as stack:
        caps = [stack.enter_context(capture_spatial(model, info["name"], hw, info)) for info in infos]
        model(x)
    results = []
    for info, cap in zip(infos, caps):
        fmap = cap.nchw()[0].float().cpu()
        energy = fmap.pow(2).mean(dim=(1, 2))
        k = min(top_k, fmap.shape[0])
        top = energy.topk(k).indices
        results.append(dict(layer=info["name"], shape=list(fmap.shape), channels=top.tolist(),
                            energies=energy[top].tolist(), maps=fmap[top].numpy()))
    return results


# ---------------------------------------------------------------------------- figures

def _figure(width: float, height: float, dpi: int):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi, layout="constrained")


def _wrap(text: str, width_in: float, fontsize: float, max_lines: int) -> str:
    """Wrap a title to the figure's width (about 0.55 em per character) in at most
    ``max_lines`` lines, so a long model or layer name cannot run off the picture."""
    import textwrap

    chars = max(20, int(width_in * 72 / (fontsize * 0.52)))
    lines = [w for para in text.split("\n") for w in (textwrap.wrap(para, chars) or [""])]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: chars - 3].rstrip() + "..."
    return "\n".join(lines)


def save_figure(fig, path: str | Path) -> Path:
    """Write a PNG atomically (the old file stays whole if this fails)."""
    from ..io import atomic_path

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UsageError(f"figures are written as PNG: give an --out ending in .png, got {path}")
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
    return path


def _norm_cbar(fig, mappable, axes, label: str, low: str = "tile min", high: str = "tile max"):
    cb = fig.colorbar(mappable, ax=axes, shrink=0.6, pad=0.02)
    cb.set_ticks([0, 1])
    cb.set_ticklabels([low, high])
    cb.set_label(label)
    return cb


def tile_mosaic(tiles: np.ndarray, min_px: int = 8) -> np.ndarray:
    """Tiles laid out on a near-square grid in one array, each upscaled to at least ``min_px``
    pixels a side and separated by one NaN pixel (drawn as the background).
    (n, h, w) -> (H, W); (n, h, w, 3) -> (H, W, 3)."""
    n, h, w = tiles.shape[:3]
    rows, cols = grid_shape(n)
    s = max(1, math.ceil(min_px / min(h, w)))
    big = np.repeat(np.repeat(tiles, s, axis=1), s, axis=2)
    th, tw = h * s, w * s
    shape = (rows * (th + 1) - 1, cols * (tw + 1) - 1) + tiles.shape[3:]
    mosaic = np.full(shape, np.nan, dtype=np.float64)
    for i in range(n):
        r, c = divmod(i, cols)
        mosaic[r * (th + 1): r * (th + 1) + th, c * (tw + 1): c * (tw + 1) + tw] = big[i]
    return mosaic


def plot_weight_grid(tiles: np.ndarray, mode: str, title: str, dpi: int = 100, cmap: str = "coolwarm",
                     normalize: str = "global"):
    """A near-square grid of normalised weight tiles: 0.5 inch per tile, +1.25 in wide for the
    colour bar, +1 in high for the title. Drawn as one image (hundreds of axes are slow)."""
    n = tiles.shape[0]
    rows, cols = grid_shape(n)
    width = cols * 0.5 + 1.25
    fig = _figure(width, rows * 0.5 + 1.0, dpi)
    ax = fig.subplots()
    mosaic = tile_mosaic(tiles)
    if mode == "rgb":
        rgba = np.ones(mosaic.shape[:2] + (4,))
        gap = np.isnan(mosaic[..., 0])
        rgba[..., :3] = np.where(gap[..., None], 1.0, mosaic)
        ax.imshow(rgba, interpolation="nearest")
        image = None
    else:
        from matplotlib import colormaps

        cm = colormaps[cmap].with_extremes(bad="white")
        image = ax.imshow(np.ma.masked_invalid(mosaic), cmap=cm, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(_wrap(title, width, 11, 2), fontsize=11)
    if image is not None:
        if normalize == "global":
            _norm_cbar(fig, image, ax, "weight (one min-max over the whole tensor)", "tensor min", "tensor max")
        else:
            _norm_cbar(fig, image, ax, "weight (each tile min-max normalised)")
    return fig


def _show_image(ax, img: np.ndarray):
    ax.imshow(np.clip(img, 0, 1) if img.ndim == 3 else img, cmap=None if img.ndim == 3 else "gray",
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_features(image: np.ndarray, results: list[dict], title: str, dpi: int = 100, cmap: str = "viridis"):
    """Input image beside each layer's top channels; 1.25 inch per tile, +0.75 in wide for the
    colour bar, +0.75 in high for the title."""
    rows = len(results)
    k = max(len(r["channels"]) for r in results)
    width = (k + 1) * 1.25 + 0.75
    fig = _figure(width, rows * 1.25 + 0.75, dpi)
    axes = fig.subplots(rows, k + 1, squeeze=False)
    mappable = None
    for r, res in enumerate(results):
        if r == 0:
            _show_image(axes[0, 0], image)
            axes[0, 0].set_title("input", fontsize=9)
        else:
            axes[r, 0].set_axis_off()
        c, h, w = res["shape"]
        for j in range(k):
            ax = axes[r, j + 1]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(res["channels"]):
                ax.set_axis_off()
                continue
            m = res["maps"][j]
            lo, hi = float(m.min()), float(m.max())
            mappable = ax.imshow((m - lo) / (hi - lo) if hi > lo else np.full_like(m, 0.5), cmap=cmap,
                                 vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"ch {res['channels'][j]}", fontsize=8)
        axes[r, 1].set_ylabel(f"{res['layer']}\n{c}x{h}x{w}", fontsize=8)
    fig.suptitle(_wrap(title, width, 11, 2), fontsize=11)
    if mappable is not None:
        _norm_cbar(fig, mappable, axes[:, 1:], "activation (per map min-max)", "map min", "map max")
    return fig


def _overlay(ax, image: np.ndarray, sal: np.ndarray, cmap: str):
    gray = image.mean(-1) if image.ndim == 3 else image
    ax.imshow(gray, cmap="gray", interpolation="nearest")
    im = ax.imshow(sal, cmap=cmap, alpha=0.55, vmin=0, vmax=1, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def plot_saliency(images: Sequence[np.ndarray], maps: Sequence[np.ndarray], captions: Sequence[str],
                  method: str | Sequence[str], title: str, dpi: int = 100, per_row: int = 4, cmap: str = "inferno"):
    """Each image beside its saliency overlay, ``per_row`` images a row; panels 1.5 in square
    with 0.75 in for three caption lines, +0.75 in wide (colour bar) and +0.5 in high (title)."""
    n = len(images)
    cols, rows = min(n, per_row), math.ceil(n / per_row)
    width = 2 * cols * 1.5 + 0.75
    fig = _figure(width, rows * 2.25 + 0.5, dpi)
    axes = fig.subplots(rows, 2 * cols, squeeze=False)
    mappable = None
    for i, ax in enumerate(axes.flat):
        if i >= 2 * n:
            ax.set_axis_off()
    for i in range(n):
        r, c = divmod(i, per_row)
        _show_image(axes[r, 2 * c], images[i])
        axes[r, 2 * c].set_title(captions[i], fontsize=8)
        mappable = _overlay(axes[r, 2 * c + 1], images[i], maps[i], cmap)
        axes[r, 2 * c + 1].set_title(method if isinstance(method, str) else method[i], fontsize=8)
    fig.suptitle(_wrap(title, width, 10, 2), fontsize=10)
    if mappable is not None:
        cb = fig.colorbar(mappable, ax=axes, shrink=0.8, pad=0.02)
        cb.set_label("saliency (scaled to max)", fontsize=8)
    return fig
