"""``mixlab rf``: receptive fields and the gridding effect of dilated convolutions.

Three modes:
  mixlab rf --kernel 3 --dilations 1,2,5        utilisation counts of a dilated stack + HDC checks
  mixlab rf --model NAME | --checkpoint RUN_DIR  the stem + depthwise stack of a model
  mixlab rf --effective --checkpoint RUN_DIR     the effective RF, from input gradients
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .viz import add_source_args, emit
from ..errors import UsageError


def _rates(text: str) -> list[int]:
    try:
        rates = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"dilations must be comma-separated integers like 1,2,5, got {text!r}")
    if not rates or any(r < 1 for r in rates):
        raise argparse.ArgumentTypeError(f"dilations must be positive integers like 1,2,5, got {text!r}")
    return rates


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernel", type=int, default=3, metavar="K", help="kernel size of every layer")
    parser.add_argument("--dilations", type=_rates, metavar="R1,R2,...",
                        help="dilation rate of each layer, first layer first")
    parser.add_argument("--size", type=int, metavar="N",
                        help="show an N x N input window around the receptive field; none: the RF itself")
    add_source_args(parser, required=False)
    parser.add_argument("--effective", action="store_true",
                        help="measure the effective receptive field from input gradients (with --checkpoint/--model)")
    parser.add_argument("--images", type=int, default=64, metavar="N",
                        help="--effective: test images averaged over (a run's test split)")
    parser.add_argument("--random-inputs", action="store_true",
                        help="--effective: average over N(0,1) inputs instead of test images")
    parser.add_argument("--layer", default="auto",
                        help="the spatial map whose centre unit is analysed (auto: the last spatial stage)")
    parser.add_argument("--out", metavar="FILE.png",
                        help="the PNG to write; none: RUN_DIR/viz/..., or rf_....png here (with --json: no PNG unless --out)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--dpi", type=int, default=100, help="pixels per inch of the PNG")
    parser.add_argument("--cmap", default="seed",
                        help="colour map: seed (the dilated-convolution seed's white -> blue -> red for the "
                             "--dilations count plot; magma / inferno for a model's RF / the effective RF) "
                             "or a matplotlib name")


def run(args) -> int:
    if args.dpi < 10:
        raise UsageError(f"--dpi must be at least 10, got {args.dpi}")
    from ..analysis.receptive_field import count_colour_map

    count_colour_map(args.cmap)  # an unknown name fails now, not after the work
    has_model = bool(args.model or args.checkpoint)
    if args.effective:
        if not has_model:
            raise UsageError("--effective needs --checkpoint RUN_DIR (or --model NAME with --random-inputs)")
        from ..analysis.pictures import draw_effective_rf

        return _of_model(args, draw_effective_rf, "erf", images=args.images, random_inputs=args.random_inputs)
    if has_model:
        from ..analysis.pictures import draw_model_rf

        return _of_model(args, draw_model_rf, "rf")
    if not args.dilations:
        raise UsageError("give --dilations R1,R2,... (with --kernel K), or --model NAME, "
                         "or --effective --checkpoint RUN_DIR")
    return _stack(args)


def _out(args, stem: str) -> Path | None:
    """Where the picture goes; None with --json and no --out (the numbers were asked for: no
    file is written as a side effect)."""
    if args.out:
        return Path(args.out)
    if args.json:
        return None
    if args.checkpoint:
        return Path(args.checkpoint) / "viz" / f"{stem}.png"
    return Path(f"{stem}.png")


def _stack(args) -> int:
    from ..analysis.pictures import draw_rf_stack

    result, lines = draw_rf_stack(args.kernel, args.dilations,
                                  _out(args, f"rf_k{args.kernel}_d{'-'.join(map(str, args.dilations))}"),
                                  size=args.size, dpi=args.dpi, cmap=args.cmap)
    emit(args, result, lines)
    return 0


def _of_model(args, draw, stem: str, **options) -> int:
    """A model's picture: ``draw`` (the stem + depthwise RF, or the effective RF) of --checkpoint or --model."""
    from ..analysis.inputs import load_model

    model, config, name = load_model(args.checkpoint, args.model, args.which)
    label = config.get("model") if config else args.model
    result, lines = draw(model, config, name, _out(args, f"{stem}_{label}"), layer=args.layer, dpi=args.dpi,
                         cmap=args.cmap, **options)
    emit(args, result, lines)
    return 0
