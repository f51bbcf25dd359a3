"""``mixlab viz filters|kernels|features|saliency``: pictures of what a model learned.

The model comes from a trained run (``--checkpoint RUN_DIR``) or is built untrained from
its registered name (``--model NAME``). Features and saliency need images: ``--image PATH``
(resized to the model's input size and normalised like the run's data) or, for a run,
``--index N`` / ``--misclassified K`` from its test split.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from ..errors import UsageError

WHAT = {
    "filters": "the stem (patch-embedding) filters as a grid, one tile per output channel",
    "kernels": "the depthwise kernels of one block as a grid",
    "features": "feature maps of chosen stages (top channels by activation energy) beside the input",
    "saliency": "Grad-CAM or input-gradient saliency over input images, with true and predicted labels",
}


# ---------------------------------------------------------------------------- options and printing (`mixlab rf` too)

def add_source_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    src = parser.add_mutually_exclusive_group(required=required)
    src.add_argument("--checkpoint", metavar="RUN_DIR", help="a run directory written by `mixlab train`")
    src.add_argument("--model", metavar="NAME", help="a registered model name, built untrained")
    parser.add_argument("--which", choices=["best", "last"], default="best", help="which weights of the run")


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
    from ..analysis.inputs import load_model

    model, config, name = load_model(args.checkpoint, args.model, args.which)
    if args.list_layers:
        from ..analysis.pictures import format_layer_rows, layer_rows

        rows = layer_rows(model, config, args.what)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for line in format_layer_rows(rows):
                print(line)
        return 0
    if args.dpi < 10:
        raise UsageError(f"--dpi must be at least 10, got {args.dpi}")
    from ..analysis import pictures

    out = default_out(args, args.what)
    if args.what in ("filters", "kernels"):
        result, lines = pictures.draw_weights(model, name, args.what, out, layer=args.layer,
                                              block=getattr(args, "block", None), normalize=args.normalize,
                                              cmap=args.cmap, max_tiles=args.max_tiles, dpi=args.dpi)
    elif args.what == "features":
        result, lines = pictures.draw_features(model, config, name, out, image=args.image, index=args.index,
                                               layers=args.layers, top=args.top, dpi=args.dpi)
    else:
        result, lines = pictures.draw_saliency(model, config, name, out, image=args.image, index=args.index,
                                               misclassified=args.misclassified, method=args.method,
                                               layer=args.layer, target=args.target, dpi=args.dpi)
    emit(args, result, lines)
    return 0
