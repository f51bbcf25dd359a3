"""``mixlab viz filters|kernels|features|saliency``: pictures of what a model learned.

The model comes from a trained run (``--checkpoint RUN_DIR``) or is built untrained from
its registered name (``--model NAME``). Features and saliency need images: ``--image PATH``
(resized to the model's input size and normalised like the run's data) or, for a run,
``--index N`` / ``--misclassified K`` from its test split.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import MissingFileError, UsageError

WHAT = {
    "filters": "the stem (patch-embedding) filters as a grid, one tile per output channel",
    "kernels": "the depthwise kernels of one block as a grid",
    "features": "feature maps of chosen stages (top channels by activation energy) beside the input",
    "saliency": "Grad-CAM or input-gradient saliency over input images, with true and predicted labels",
}

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------------------- shared helpers

def add_source_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    src = parser.add_mutually_exclusive_group(required=required)
    src.add_argument("--checkpoint", metavar="RUN_DIR", help="a run directory written by `mixlab train`")
    src.add_argument("--model", metavar="NAME", help="a registered model name, built untrained")
    parser.add_argument("--which", choices=["best", "last"], default="best", help="which weights of the run")


def load_model(args) -> tuple[torch.nn.Module, dict | None, str]:
    """(model in eval mode, run config or None, display name) from --checkpoint or --model."""
    if getattr(args, "checkpoint", None):
        from ..train.rundir import load_run_model

        model, config = load_run_model(args.checkpoint, which=getattr(args, "which", "best"))
        name = f"{config.get('model', type(model).__name__)} ({Path(args.checkpoint).name})"
        return model.eval(), config, name
    from ..registry import create_model

    torch.manual_seed(0)  # an untrained model's pictures are the same on every run
    return create_model(args.model).eval(), None, f"{args.model} (untrained)"


def model_input_size(model, config: dict | None) -> tuple[int, int]:
    from ..analysis.viz import input_hw

    if config and config.get("img_size"):
        return input_hw(model, config["img_size"])
    return input_hw(model)


def normalisation(model, config: dict | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the inputs were normalised with: a run's ``data.mean``/``data.std`` (which
    `mixlab train` records), else the trainer's defaults for its data set; without a run, the
    model's pretrained_cfg, else ImageNet's."""
    from ..data.constants import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD

    if config is not None:
        data = config.get("data") or {}
        if data.get("mean") is not None and data.get("std") is not None:
            return tuple(data["mean"]), tuple(data["std"])
        if str(data.get("dataset", "")).lower().startswith("cifar"):
            return CIFAR_MEAN, CIFAR_STD
        return (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # the trainer's default for other data sets
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("mean") and cfg.get("std"):
        return tuple(cfg["mean"]), tuple(cfg["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def class_names(config: dict | None, num_classes: int, data=None) -> list[str] | None:
    names = getattr(data, "classes", None) if data is not None else None
    if not names and config:
        names = config.get("classes") or (config.get("data") or {}).get("classes")
        if not names and str((config.get("data") or {}).get("dataset", "")).lower() == "cifar10":
            names = CIFAR10_CLASSES
    names = list(names) if names else None
    return names if names and len(names) == num_classes else None


def _in_chans(model) -> int:
    from ..analysis.viz import stem_conv

    return getattr(model, "in_chans", None) or stem_conv(model)[1].in_channels


def read_image(path: str, size: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """An image file as uint8 (C, H, W), resized to ``size`` (H, W) with bicubic filtering."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"image not found: {p}")
    img = Image.open(p).convert("RGB" if channels == 3 else "L")
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def to_model_input(images_u8: torch.Tensor, mean, std) -> torch.Tensor:
    x = images_u8.float() / 255.0
    c = x.shape[1]
    m = torch.tensor(mean[:c] if len(mean) >= c else mean * c).view(1, c, 1, 1)
    s = torch.tensor(std[:c] if len(std) >= c else std * c).view(1, c, 1, 1)
    return (x - m) / s


def for_display(images_u8: torch.Tensor) -> list[np.ndarray]:
    out = []
    for img in images_u8:
        arr = img.permute(1, 2, 0).float().numpy() / 255.0
        out.append(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    return out


def _split_tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(split, (tuple, list)) and len(split) == 2:
        return split[0], split[1]
    if isinstance(split, dict):
        for a, b in (("images", "labels"), ("x", "y"), ("data", "targets")):
            if a in split and b in split:
                return split[a], split[b]
    for a, b in (("images", "labels"), ("x", "y"), ("data", "targets"), ("inputs", "targets")):
        if hasattr(split, a) and hasattr(split, b):
            return getattr(split, a), getattr(split, b)
    raise UsageError(f"cannot read images and labels from a data split of type {type(split).__name__}")


def load_test_split(config: dict | None, size: tuple[int, int]):
    """(uint8 images (N, C, H, W) at ``size``, int64 labels, data object) of the run's test split."""
    if config is None:
        raise UsageError("--index and --misclassified read the run's test split: give --checkpoint RUN_DIR "
                         "(with --model, use --image PATH)")
    from ..data import classification

    data = classification.load_classification_data(config)
    split = getattr(data, "test", None)
    if split is None:
        raise UsageError("the run's data has no test split")
    images, labels = _split_tensors(split)
    images, labels = torch.as_tensor(images), torch.as_tensor(labels).long()
    if tuple(images.shape[-2:]) != tuple(size):
        resized = torch.nn.functional.interpolate(images.float(), size=size, mode="bilinear", antialias=True,
                                                  align_corners=False)
        images = resized.round().clamp(0, 255).to(torch.uint8)
    return images, labels, data


def default_out(args, stem: str) -> Path:
    if getattr(args, "out", None):
        return Path(args.out)
    if getattr(args, "checkpoint", None):
        return Path(args.checkpoint) / "viz" / f"{stem}.png"
    return Path(f"{getattr(args, 'model', None) or 'model'}_{stem}.png")


def emit(args, result: dict, lines: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(lines))


def _label(names, k: int) -> str:
    return names[k] if names else f"class {k}"


# ---------------------------------------------------------------------------- CLI

def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT",
                                help=", ".join(WHAT))
    common = argparse.ArgumentParser(add_help=False)
    add_source_args(common)
    common.add_argument("--out", metavar="FILE.png",
                        help="the PNG to write; none: RUN_DIR/viz/WHAT.png, or MODEL_WHAT.png here")
    common.add_argument("--json", action="store_true", help="print the numbers behind the figure as JSON")
    common.add_argument("--dpi", type=int, default=100, help="pixels per inch of the PNG")
    common.add_argument("--list-layers", action="store_true", help="list the layers that can be chosen and exit")
    fmt = parser.formatter_class
    weights = argparse.ArgumentParser(add_help=False)
    weights.add_argument("--normalize", choices=["global", "tile"], default="global",
                         help="global: one min-max over the whole weight tensor, as the Keras ConvMixer seed "
                              "(tiles compare with each other); tile: each tile on its own (full contrast each)")
    weights.add_argument("--cmap", default="coolwarm",
                         help="matplotlib colour map of one-channel tiles (RGB filters are drawn as colours)")
    p = sub.add_parser("filters", parents=[common, weights], help=WHAT["filters"], description=WHAT["filters"],
                       formatter_class=fmt)
    p.add_argument("--layer", default="auto", help="a Conv2d name, or auto (the stem)")
    p.add_argument("--max-tiles", type=int, default=256, help="show at most this many filters")
    p = sub.add_parser("kernels", parents=[common, weights], help=WHAT["kernels"], description=WHAT["kernels"],
                       formatter_class=fmt)
    p.add_argument("--layer", default="auto", help="a Conv2d name, or auto (see --block)")
    p.add_argument("--block", type=int, default=None,
                   help="the K-th depthwise convolution, from 0 (one per block in ConvMixer); default: the middle "
                        "one rounding down, (n - 1) // 2, the seed's: block 3 of ConvMixer-256/8's 0..7")
    p.add_argument("--max-tiles", type=int, default=256, help="show at most this many kernels")
    for what in ("features", "saliency"):
        p = sub.add_parser(what, parents=[common], help=WHAT[what], description=WHAT[what], formatter_class=fmt)
        src = p.add_mutually_exclusive_group()
        src.add_argument("--image", nargs="+", metavar="PATH", help="image file(s)")
        src.add_argument("--index", nargs="+", type=int, metavar="N", help="test-split index (a run only)")
        if what == "features":
            p.add_argument("--layers", nargs="+", metavar="NAME",
                           help="stages to show (default: up to 4 spread over the model's feature_info)")
            p.add_argument("--top", type=int, default=8, help="channels per stage, by activation energy")
        else:
            src.add_argument("--misclassified", type=int, metavar="K",
                             help="the first K misclassified test images (a run only)")
            p.add_argument("--method", choices=["gradcam", "gradients"], default="gradcam")
            p.add_argument("--layer", default="auto", help="Grad-CAM layer: auto = the last spatial stage")
            p.add_argument("--target", choices=["pred", "true"], default="pred",
                           help="explain the predicted class or the true class")


def run(args) -> int:
    model, config, name = load_model(args)
    if args.list_layers:
        return _list_layers(args, model, config)
    if args.dpi < 10:
        raise UsageError(f"--dpi must be at least 10, got {args.dpi}")
    return {"filters": _weights, "kernels": _weights, "features": _features, "saliency": _saliency}[args.what](
        args, model, config, name)


def _list_layers(args, model, config) -> int:
    from ..analysis.viz import depthwise_convs, kernel_layer, spatial_candidates, stem_conv, conv_layers

    rows = []
    if args.what in ("filters", "kernels"):
        stem = stem_conv(model)[0]
        dws = {n: i for i, (n, _) in enumerate(depthwise_convs(model))}
        try:
            auto = stem if args.what == "filters" else kernel_layer(model)[0]
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
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows) if rows else 4
    for r in rows:
        detail = (f"weight {tuple(r['weight'])} stride {tuple(r['stride'])} groups {r['groups']}" if "weight" in r
                  else f"{r['layout']:<6} C x H x W = {r['shape'][0]} x {r['shape'][1]} x {r['shape'][2]}")
        tags = f"  [{'; '.join(r['tags'])}]" if r["tags"] else ""
        print(f"{r['name']:<{width}}  {r['type']:<16} {detail}{tags}")
    return 0


def _weights(args, model, config, name) -> int:
    from ..analysis.viz import kernel_layer, plot_weight_grid, save_figure, stem_conv, weight_tiles

    if args.max_tiles < 1:
        raise UsageError(f"--max-tiles must be at least 1, got {args.max_tiles}")
    if args.what == "filters":
        layer, conv = stem_conv(model) if args.layer == "auto" else kernel_layer(model, layer=args.layer)
    else:
        layer, conv = kernel_layer(model, layer=args.layer, block=args.block)
    from matplotlib import colormaps

    if args.cmap not in colormaps:
        raise UsageError(f"unknown colour map {args.cmap!r}: give a matplotlib colour map name (coolwarm, viridis...)")
    weight = conv.weight.detach().float().cpu()
    tiles, mode = weight_tiles(weight, args.normalize)
    total = tiles.shape[0]
    tiles = tiles[: args.max_tiles]
    o, i, kh, kw = weight.shape
    what = "stem filters" if args.what == "filters" else "kernels"
    if args.what == "kernels" and conv.groups == conv.in_channels == conv.out_channels:
        what = "depthwise kernels"
    shown = f", first {len(tiles)} of {total}" if len(tiles) < total else ""
    how = {"rgb": "RGB", "single": args.cmap, "strongest": f"strongest input channel, {args.cmap}"}[mode]
    scaled = ("one min-max over the whole tensor" if args.normalize == "global"
              else "each tile min-max normalised")
    title = f"{name}: {what} of '{layer}'\n{o} x {i} x {kh} x {kw}{shown}; {scaled} ({how})"
    fig = plot_weight_grid(tiles, mode, title, dpi=args.dpi, cmap=args.cmap, normalize=args.normalize)
    out = save_figure(fig, default_out(args, args.what))
    flat = weight.reshape(o, -1)
    result = dict(command=f"viz {args.what}", model=name, layer=layer, weight_shape=[o, i, kh, kw], mode=mode,
                  normalize=args.normalize,
                  shown=len(tiles), grid=list(_grid(len(tiles))), out=str(out),
                  per_filter=dict(min=flat.min(1).values.tolist(), max=flat.max(1).values.tolist(),
                                  norm=flat.norm(dim=1).tolist()))
    if weight.numel() <= 65536:
        result["weights"] = weight.tolist()
    emit(args, result, [f"{what} of {layer}: {o} x {i} x {kh} x {kw} ({mode} tiles)", f"wrote {out}"])
    return 0


def _grid(n):
    from ..analysis.viz import grid_shape

    return grid_shape(n)


def _inputs(args, model, config):
    """(uint8 images, normalised inputs, true labels or None, source descriptions, class names, data)."""
    size = model_input_size(model, config)
    mean, std = normalisation(model, config)
    chans = _in_chans(model)
    labels, data = None, None
    if getattr(args, "image", None):
        images = torch.stack([read_image(p, size, chans) for p in args.image])
        sources = [f"{Path(p).parent.name}/{Path(p).name}" if Path(p).parent.name else Path(p).name
                   for p in args.image]
    elif getattr(args, "index", None) is not None or getattr(args, "misclassified", None) is not None:
        all_images, all_labels, data = load_test_split(config, size)
        if getattr(args, "index", None) is not None:
            bad = [i for i in args.index if not 0 <= i < len(all_images)]
            if bad:
                raise UsageError(f"--index {bad[0]} is out of range: the test split has {len(all_images)} images")
            idx = list(args.index)
        else:
            idx = _misclassified(model, all_images, all_labels, args.misclassified, mean, std)
        images, labels = all_images[idx], all_labels[idx]
        sources = [f"test #{i}" for i in idx]
    else:
        raise UsageError("give images: --image PATH, or with --checkpoint --index N"
                         + (" or --misclassified K" if args.what == "saliency" else ""))
    names = class_names(config, getattr(model, "num_classes", 0), data)
    if labels is None and names and getattr(args, "image", None):
        # an image-folder path (.../cat/0001.jpg) names its class
        found = [names.index(Path(p).parent.name) if Path(p).parent.name in names else -1 for p in args.image]
        if all(k >= 0 for k in found):
            labels = torch.tensor(found)
    device = next(iter(model.parameters())).device
    return images, to_model_input(images, mean, std).to(device), labels, sources, names


def _misclassified(model, images, labels, k: int, mean, std, batch: int = 256) -> list[int]:
    if k < 1:
        raise UsageError(f"--misclassified must be at least 1, got {k}")
    device = next(iter(model.parameters())).device
    found: list[int] = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = to_model_input(images[start: start + batch], mean, std).to(device)
            pred = model(x).argmax(1).cpu()
            wrong = (pred != labels[start: start + batch]).nonzero().flatten() + start
            found.extend(wrong.tolist())
            if len(found) >= k:
                break
    if not found:
        raise UsageError("the model classifies every test image correctly: nothing misclassified to show")
    if len(found) < k:
        print(f"only {len(found)} misclassified test images", file=sys.stderr)
    return found[:k]


def _features(args, model, config, name) -> int:
    from ..analysis.viz import default_feature_layers, feature_maps, plot_features, save_figure

    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    images, x, labels, sources, names = _inputs(args, model, config)
    if len(images) != 1:
        raise UsageError("features are drawn for one image: give one --image or one --index")
    size = tuple(x.shape[-2:])
    layers = args.layers or default_feature_layers(model, size)
    results = feature_maps(model, x, layers, args.top)
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    pred = int(probs.argmax())
    truth = f"true: {_label(names, int(labels[0]))}, " if labels is not None else ""
    title = (f"{name}: top {args.top} channels by activation energy, {sources[0]} "
             f"({truth}pred: {_label(names, pred)}, p = {probs[pred]:.2f})")
    fig = plot_features(for_display(images)[0], results, title, dpi=args.dpi)
    out = save_figure(fig, default_out(args, "features"))
    result = dict(command="viz features", model=name, image=sources[0], pred=pred, prob=float(probs[pred]),
                  true=int(labels[0]) if labels is not None else None, out=str(out),
                  layers=[{k: v for k, v in r.items() if k != "maps"} for r in results])
    emit(args, result, [f"{r['layer']}: {r['shape']} top channels {r['channels']}" for r in results]
         + [f"wrote {out}"])
    return 0


def _saliency(args, model, config, name) -> int:
    from ..analysis.viz import gradcam, input_gradients, plot_saliency, save_figure

    images, x, labels, sources, names = _inputs(args, model, config)
    if args.target == "true":
        if labels is None:
            raise UsageError("--target true needs known labels (--index/--misclassified, or images in class folders)")
        target = labels.to(x.device)
    else:
        target = None
    if args.method == "gradcam":
        maps, info = gradcam(model, x, target, layer=args.layer)
        method = f"Grad-CAM ({info['layer']})"
    else:
        maps, info = input_gradients(model, x, target)
        method = "input gradients"
    probs = info["logits"].softmax(1)
    preds = probs.argmax(1)
    captions, items, panel_titles = [], [], []
    for i in range(len(images)):
        p = int(preds[i])
        truth = f"true: {_label(names, int(labels[i]))}\n" if labels is not None else ""
        captions.append(f"{sources[i]}\n{truth}pred: {_label(names, p)} ({probs[i, p]:.2f})")
        short = method.split(" (")[0]
        # Grad-CAM keeps only positive evidence; an all-zero map means the layer has none
        panel_titles.append(f"{short}\n(all zero)" if maps[i].max() <= 0 else short)
        peak = np.unravel_index(int(np.argmax(maps[i])), maps[i].shape)
        items.append(dict(source=sources[i], true=int(labels[i]) if labels is not None else None, pred=p,
                          prob=float(probs[i, p]), explained_class=int(info["classes"][i]),
                          peak=[int(peak[0]), int(peak[1])]))
    what = (f"{len(images)} misclassified test images" if getattr(args, "misclassified", None) is not None
            else f"{len(images)} image{'s' if len(images) > 1 else ''}")
    title = f"{name}: {method} for {what}, explaining the {'true' if target is not None else 'predicted'} class"
    fig = plot_saliency(for_display(images), list(maps), captions, panel_titles, title, dpi=args.dpi)
    out = save_figure(fig, default_out(args, "saliency"))
    result = dict(command="viz saliency", model=name, method=args.method, layer=info["layer"], out=str(out),
                  images=items)
    if maps.size <= 65536:
        result["maps"] = np.round(maps, 4).tolist()
    emit(args, result, [f"{c.replace(chr(10), ' | ')}" for c in captions] + [f"{method}", f"wrote {out}"])
    return 0
