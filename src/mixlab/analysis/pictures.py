"""The pictures `mixlab viz` and `mixlab rf` draw: each function makes one figure, writes it as
a PNG to ``out`` and returns ``(numbers, lines)``: the numbers behind the figure (what
``--json`` prints) and a few lines saying what was drawn (what the command prints otherwise).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from .inputs import for_display, label_of, load_test_split, model_input_size, normalisation, pick_images, \
    to_model_input

__all__ = ["layer_rows", "format_layer_rows", "draw_weights", "draw_features", "draw_saliency", "draw_rf_stack",
           "draw_model_rf", "draw_effective_rf"]

_JSON_CELLS = 128 * 128  # rf: matrices larger than this are summarised, not listed, in --json


# ---------------------------------------------------------------------------- viz

def layer_rows(model, config: dict | None, what: str) -> list[dict]:
    """The layers ``mixlab viz WHAT --layer`` can show: the Conv2d layers for filters / kernels
    (tagged stem, depthwise block, auto), else the modules whose output is a spatial map."""
    from .viz import conv_layers, depthwise_convs, kernel_layer, spatial_candidates, stem_conv

    rows = []
    if what in ("filters", "kernels"):
        stem = stem_conv(model)[0]
        dws = {n: i for i, (n, _) in enumerate(depthwise_convs(model))}
        try:
            auto = stem if what == "filters" else kernel_layer(model)[0]
        except ValueError:
            auto = None
        for n, m in conv_layers(model):
            tags = (["stem"] if n == stem else []) + ([f"depthwise, --block {dws[n]}"] if n in dws else [])
            rows.append(dict(name=n, type="Conv2d", weight=list(m.weight.shape), stride=list(m.stride),
                             groups=m.groups, tags=tags + (["auto"] if n == auto else [])))
    else:
        cands = spatial_candidates(model, model_input_size(model, config))
        stages = {e.get("module") for e in (getattr(model, "feature_info", None) or []) if isinstance(e, dict)}
        for i, c in enumerate(cands):
            tags = (["feature_info stage"] if c["name"] in stages else []) + (
                ["auto (Grad-CAM)"] if i == len(cands) - 1 else [])
            rows.append(dict(name=c["name"], type=c["type"], layout=c["layout"], shape=[c["c"], c["h"], c["w"]],
                             tags=tags))
    return rows


def format_layer_rows(rows: list[dict]) -> list[str]:
    width = max(len(r["name"]) for r in rows) if rows else 4
    lines = []
    for r in rows:
        detail = (f"weight {tuple(r['weight'])} stride {tuple(r['stride'])} groups {r['groups']}" if "weight" in r
                  else f"{r['layout']:<6} C x H x W = {r['shape'][0]} x {r['shape'][1]} x {r['shape'][2]}")
        tags = f"  [{'; '.join(r['tags'])}]" if r["tags"] else ""
        lines.append(f"{r['name']:<{width}}  {r['type']:<16} {detail}{tags}")
    return lines


def draw_weights(model, name: str, what: str, out: Path, layer: str = "auto", block: int | None = None,
                 normalize: str = "global", cmap: str = "coolwarm", max_tiles: int = 256, dpi: int = 100):
    """``what`` = filters (the stem's, or ``layer``'s) or kernels (depthwise ``block``, or ``layer``'s)
    as a grid of tiles."""
    from .viz import grid_shape, kernel_layer, plot_weight_grid, save_figure, stem_conv, weight_tiles

    if max_tiles < 1:
        raise UsageError(f"--max-tiles must be at least 1, got {max_tiles}")
    if what == "filters":
        layer, conv = stem_conv(model) if layer == "auto" else kernel_layer(model, layer=layer)
    else:
        layer, conv = kernel_layer(model, layer=layer, block=block)
    from matplotlib import colormaps

    if cmap not in colormaps:
        raise UsageError(f"unknown colour map {cmap!r}: give a matplotlib colour map name (coolwarm, viridis...)")
    weight = conv.weight.detach().float().cpu()
    tiles, mode = weight_tiles(weight, normalize)
    total = tiles.shape[0]
    tiles = tiles[:max_tiles]
    o, i, kh, kw = weight.shape
    kind = "stem filters" if what == "filters" else "kernels"
    if what == "kernels" and conv.groups == conv.in_channels == conv.out_channels:
        kind = "depthwise kernels"
    shown = f", first {len(tiles)} of {total}" if len(tiles) < total else ""
    how = {"rgb": "RGB", "single": cmap, "strongest": f"strongest input channel, {cmap}"}[mode]
    scaled = "one min-max over the whole tensor" if normalize == "global" else "each tile min-max normalised"
    title = f"{name}: {kind} of '{layer}'\n{o} x {i} x {kh} x {kw}{shown}; {scaled} ({how})"
    fig = plot_weight_grid(tiles, mode, title, dpi=dpi, cmap=cmap, normalize=normalize)
    out = save_figure(fig, out)
    flat = weight.reshape(o, -1)
    result = dict(command=f"viz {what}", model=name, layer=layer, weight_shape=[o, i, kh, kw], mode=mode,
                  normalize=normalize, shown=len(tiles), grid=list(grid_shape(len(tiles))), out=str(out),
                  per_filter=dict(min=flat.min(1).values.tolist(), max=flat.max(1).values.tolist(),
                                  norm=flat.norm(dim=1).tolist()))
    if weight.numel() <= 65536:
        result["weights"] = weight.tolist()
    return result, [f"{kind} of {layer}: {o} x {i} x {kh} x {kw} ({mode} tiles)", f"wrote {out}"]


def draw_features(model, config: dict | None, name: str, out: Path, image=None, index=None, layers=None,
                  top: int = 8, dpi: int = 100):
    """The ``top`` channels (by activation energy) of ``layers`` (default: up to 4 stages) for one
    image (a file ``image`` or test-split ``index``), beside it."""
    from .viz import default_feature_layers, feature_maps, plot_features, save_figure

    if top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    images, x, labels, sources, names = pick_images(model, config, image, index)
    if len(images) != 1:
        raise UsageError("features are drawn for one image: give one --image or one --index")
    size = tuple(x.shape[-2:])
    layers = layers or default_feature_layers(model, size)
    results = feature_maps(model, x, layers, top)
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    pred = int(probs.argmax())
    truth = f"true: {label_of(names, int(labels[0]))}, " if labels is not None else ""
    title = (f"{name}: top {top} channels by activation energy, {sources[0]} "
             f"({truth}pred: {label_of(names, pred)}, p = {probs[pred]:.2f})")
    fig = plot_features(for_display(images)[0], results, title, dpi=dpi)
    out = save_figure(fig, out)
    result = dict(command="viz features", model=name, image=sources[0], pred=pred, prob=float(probs[pred]),
                  true=int(labels[0]) if labels is not None else None, out=str(out),
                  layers=[{k: v for k, v in r.items() if k != "maps"} for r in results])
    return result, [f"{r['layer']}: {r['shape']} top channels {r['channels']}" for r in results] + [f"wrote {out}"]


def draw_saliency(model, config: dict | None, name: str, out: Path, image=None, index=None, misclassified=None,
                  method: str = "gradcam", layer: str = "auto", target: str = "pred", dpi: int = 100):
    """Grad-CAM (``method`` gradcam, at ``layer``) or input-gradient saliency of the predicted or
    true class (``target``) over images: files, test-split ``index`` numbers or the first
    ``misclassified`` misclassified test images."""
    from .viz import gradcam, input_gradients, plot_saliency, save_figure

    images, x, labels, sources, names = pick_images(model, config, image, index, misclassified,
                                                    can_misclassify=True)
    if target == "true":
        if labels is None:
            raise UsageError("--target true needs known labels (--index/--misclassified, or images in class folders)")
        target = labels.to(x.device)
    else:
        target = None
    if method == "gradcam":
        maps, info = gradcam(model, x, target, layer=layer)
        explained = f"Grad-CAM ({info['layer']})"
    else:
        maps, info = input_gradients(model, x, target)
        explained = "input gradients"
    probs = info["logits"].softmax(1)
    preds = probs.argmax(1)
    captions, items, panel_titles = [], [], []
    for i in range(len(images)):
        p = int(preds[i])
        truth = f"true: {label_of(names, int(labels[i]))}\n" if labels is not None else ""
        captions.append(f"{sources[i]}\n{truth}pred: {label_of(names, p)} ({probs[i, p]:.2f})")
        short = explained.split(" (")[0]
        # Grad-CAM keeps only positive evidence; an all-zero map means the layer has none
        panel_titles.append(f"{short}\n(all zero)" if maps[i].max() <= 0 else short)
        peak = np.unravel_index(int(np.argmax(maps[i])), maps[i].shape)
        items.append(dict(source=sources[i], true=int(labels[i]) if labels is not None else None, pred=p,
                          prob=float(probs[i, p]), explained_class=int(info["classes"][i]),
                          peak=[int(peak[0]), int(peak[1])]))
    what = (f"{len(images)} misclassified test images" if misclassified is not None
            else f"{len(images)} image{'s' if len(images) > 1 else ''}")
    title = f"{name}: {explained} for {what}, explaining the {'true' if target is not None else 'predicted'} class"
    fig = plot_saliency(for_display(images), list(maps), captions, panel_titles, title, dpi=dpi)
    out = save_figure(fig, out)
    result = dict(command="viz saliency", model=name, method=method, layer=info["layer"], out=str(out),
                  images=items)
    if maps.size <= 65536:
        result["maps"] = np.round(maps, 4).tolist()
    return result, [f"{c.replace(chr(10), ' | ')}" for c in captions] + [f"{explained}", f"wrote {out}"]


# ---------------------------------------------------------------------------- rf

def _rule_lines(where: str, rules: dict, kernel: int) -> list[str]:
    prefix = f"HDC, {where}: " if where else "HDC "
    return [f"{prefix}rule 1, no common factor > 1: {'pass' if rules['no_common_factor'] else 'FAIL'} "
            f"(gcd {rules['common_factor']})",
            f"{prefix}rule 2, M_2 <= K: " + ("n/a (one layer)" if rules["M2"] is None else
                                            f"{'pass' if rules['m2_ok'] else 'FAIL'} (M = {rules['M']}, "
                                            f"M_2 = {rules['M2']}, K = {kernel})")]


def _save(make_figure, out: Path | None) -> Path | None:
    """Draw and write the figure at ``out``; None writes nothing (`mixlab rf --json` without
    --out: the numbers were asked for, not a file)."""
    from .viz import save_figure

    return None if out is None else save_figure(make_figure(), out)


def draw_rf_stack(kernel: int, dilations: list[int], out: Path, size: int | None = None, dpi: int = 100,
                  cmap: str = "seed"):
    """The utilisation counts of a stack of ``kernel`` x ``kernel`` convolutions with these
    dilations, and the HDC rules checked on it."""
    from .receptive_field import plot_rf_counts, rf_report

    if kernel < 1:
        raise UsageError(f"--kernel must be at least 1, got {kernel}")
    if size is not None and size < 1:
        raise UsageError(f"--size must be at least 1, got {size}")
    report = rf_report(kernel, dilations, size)
    out = _save(lambda: plot_rf_counts(report, dpi=dpi, cmap=cmap), out)
    hdc = report["hdc"]
    side = report["rf_size"]
    lines = [f"kernel {kernel}, dilations {dilations}: receptive field {side}x{side}",
             f"never used inside the receptive field (gridding): {100 * report['gridding_share']:.1f}%"]
    if len(hdc["groups"]) > 1:
        shown: list = []
        for g in hdc["groups"]:
            if g["rates"] not in shown:
                shown.append(g["rates"])
                times = sum(other["rates"] == g["rates"] for other in hdc["groups"])
                lines += _rule_lines(f"sawtooth group {g['rates']}" + (f" (x{times})" if times > 1 else ""),
                                     g, kernel)
        lines += _rule_lines(f"whole stack {hdc['rates']} as one group", hdc, kernel)
    else:
        lines += _rule_lines("", hdc, kernel)
    if hdc["passes"]:
        how = ("each sawtooth group passes" if hdc["passes_as_groups"] and not hdc["passes_as_stack"]
               else "the rules hold")
        lines.append(f"HDC: passes ({how}; no gridding)")
    else:
        lines.append("HDC: fails: " + "; ".join(hdc["failures"]))
    if len(report["counts"]) <= 25:
        width = len(str(report["max_count"]))
        lines += ["counts (rows top to bottom):"] + [" ".join(f"{v:>{width}}" for v in row) for row in report["counts"]]
    lines += [f"wrote {out}"] if out else []
    return dict(command="rf", **report, out=str(out) if out else None), lines


def draw_model_rf(model, config: dict | None, name: str, out: Path, layer: str = "auto", dpi: int = 100,
                  cmap: str = "seed"):
    """The receptive field of the stem + depthwise stack of a model, at the centre unit of
    ``layer`` (auto: the last spatial stage)."""
    from .receptive_field import count_colour_map, model_rf_report, plot_model_rf

    size = model_input_size(model, config)
    report = model_rf_report(model, size, target=None if layer == "auto" else layer)
    cmap = "magma" if cmap == "seed" else count_colour_map(cmap)
    out = _save(lambda: plot_model_rf(report, name, dpi=dpi, cmap=cmap), out)
    result = {k: v for k, v in report.items() if k not in ("counts", "frame_counts")}
    if report["counts"].size <= _JSON_CELLS:
        result["counts"] = report["counts"].tolist()
    result.update(command="rf", model=name, input_size=list(size), out=str(out) if out else None)
    kinds = {}
    for spatial in report["layers"]:
        kinds[spatial["kind"]] = kinds.get(spatial["kind"], 0) + 1
    lines = [f"{name} at {size[0]}x{size[1]}: centre unit of '{report['target']}'",
             "spatial layers: " + ", ".join(f"{v} {k}" for k, v in kinds.items()),
             f"receptive field: {report['rf_size']}x{report['rf_size']} input pixels (stride {report['jump']})",
             f"never used inside it: {100 * report['gridding_share']:.1f}%"]
    if report.get("note"):
        lines.append("note: " + report["note"])
    lines += [f"wrote {out}"] if out else []
    return result, lines


def draw_effective_rf(model, config: dict | None, name: str, out: Path, images: int = 64,
                      random_inputs: bool = False, layer: str = "auto", dpi: int = 100, cmap: str = "seed"):
    """The effective receptive field of the centre unit of ``layer``, averaged over the first
    ``images`` test images of the run (or as many N(0, 1) inputs with ``random_inputs``)."""
    from .receptive_field import count_colour_map, effective_rf, plot_erf

    size = model_input_size(model, config)
    if images < 1:
        raise UsageError(f"--images must be at least 1, got {images}")
    if random_inputs or config is None:
        if not random_inputs:
            raise UsageError("an untrained --model has no test split: add --random-inputs")
        inputs, source = None, "N(0,1) random inputs"
    else:
        all_images, _, _ = load_test_split(config, size)
        inputs = to_model_input(all_images[:images], *normalisation(model, config))
        source = "test images"
    report = effective_rf(model, inputs, size, target=None if layer == "auto" else layer, n_random=images)
    cmap = "inferno" if cmap == "seed" else count_colour_map(cmap)
    out = _save(lambda: plot_erf(report, name, source, dpi=dpi, cmap=cmap), out)
    result = {k: v for k, v in report.items() if k != "map"}
    if report["map"].size <= _JSON_CELLS:
        result["map"] = np.round(report["map"] / max(report["map"].max(), 1e-30), 5).tolist()
    result.update(command="rf --effective", model=name, images=source, out=str(out) if out else None)
    lines = [f"{name}: effective receptive field of the centre unit of '{report['target']}' "
             f"over {report['n_images']} {source}",
             f"50% / 90% / 95% of the gradient mass within centred squares of "
             f"{report['side_50']} / {report['side_90']} / {report['side_95']} px"]
    if "mass_inside_theoretical" in report:
        lines.append(f"inside the theoretical receptive field: {100 * report['mass_inside_theoretical']:.1f}%")
    lines += [f"wrote {out}"] if out else []
    return result, lines
