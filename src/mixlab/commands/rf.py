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


def _save(args, make_figure, stem: str) -> Path | None:
    from ..analysis.viz import save_figure

    path = _out(args, stem)
    return None if path is None else save_figure(make_figure(), path)


def _stack(args) -> int:
<<<<<<< HEAD
    from ..analysis.pictures import draw_rf_stack

    result, lines = draw_rf_stack(args.kernel, args.dilations,
                                  _out(args, f"rf_k{args.kernel}_d{'-'.join(map(str, args.dilations))}"),
                                  size=args.size, dpi=args.dpi, cmap=args.cmap)
=======
    from ..analysis.receptive_field import plot_rf_counts, rf_report

    if args.kernel < 1:
        raise ValueError(f"--kernel must be at least 1, got {args.kernel}")
    if args.size is not None and args.size < 1:
        raise ValueError(f"--size must be at least 1, got {args.size}")
    report = rf_report(args.kernel, args.dilations, args.size)
    out = _save(args, lambda: plot_rf_counts(report, dpi=args.dpi, cmap=args.cmap),
                f"rf_k{args.kernel}_d{'-'.join(map(str, args.dilations))}")
    hdc = report["hdc"]
    side = report["rf_size"]
    lines = [f"kernel {args.kernel}, dilations {args.dilations}: receptive field {side}x{side}",
             f"never used inside the receptive field (gridding): {100 * report['gridding_share']:.1f}%"]
    if len(hdc["groups"]) > 1:
        shown: list = []
        for g in hdc["groups"]:
            if g["rates"] not in shown:
                shown.append(g["rates"])
                times = sum(other["rates"] == g["rates"] for other in hdc["groups"])
                lines += _rule_lines(f"sawtooth group {g['rates']}" + (f" (x{times})" if times > 1 else ""),
                                     g, args.kernel)
        lines += _rule_lines(f"whole stack {hdc['rates']} as one group", hdc, args.kernel)
    else:
        lines += _rule_lines("", hdc, args.kernel)
    if hdc["passes"]:
        how = ("each sawtooth group passes" if hdc["passes_as_groups"] and not hdc["passes_as_stack"]
               else "the rules hold")
        lines.append(f"HDC: passes ({how}; no gridding)")
    else:
        lines.append("HDC: fails: " + "; ".join(hdc["failures"]))
    if len(report["counts"]) <= 25:
        width = len(str(report["max_count"]))
        lines += ["counts (rows top to bottom):"] + [" ".join(f"{v:>{width}}" for v in row) for row in report["counts"]]
    if out:
        lines.append(f"wrote {out}")
    emit(args, dict(command="rf", **report, out=str(out) if out else None), lines)
    return 0


def _rule_lines(where: str, rules: dict, kernel: int) -> list[str]:
    prefix = f"HDC, {where}: " if where else "HDC "
    return [f"{prefix}rule 1, no common factor > 1: {'pass' if rules['no_common_factor'] else 'FAIL'} "
            f"(gcd {rules['common_factor']})",
            f"{prefix}rule 2, M_2 <= K: " + ("n/a (one layer)" if rules["M2"] is None else
                                            f"{'pass' if rules['m2_ok'] else 'FAIL'} (M = {rules['M']}, "
                                            f"M_2 = {rules['M2']}, K = {kernel})")]


def _model(args) -> int:
    from ..analysis.receptive_field import count_colour_map, model_rf_report, plot_model_rf

    model, config, name = load_model(args)
    size = model_input_size(model, config)
    report = model_rf_report(model, size, target=None if args.layer == "auto" else args.layer)
    label = config.get("model") if config else args.model
    cmap = "magma" if args.cmap == "seed" else count_colour_map(args.cmap)
    out = _save(args, lambda: plot_model_rf(report, name, dpi=args.dpi, cmap=cmap), f"rf_{label}")
    result = {k: v for k, v in report.items() if k not in ("counts", "frame_counts")}
    if report["counts"].size <= _JSON_CELLS:
        result["counts"] = report["counts"].tolist()
    result.update(command="rf", model=name, input_size=list(size), out=str(out) if out else None)
    kinds = {}
    for layer in report["layers"]:
        kinds[layer["kind"]] = kinds.get(layer["kind"], 0) + 1
    lines = [f"{name} at {size[0]}x{size[1]}: centre unit of '{report['target']}'",
             "spatial layers: " + ", ".join(f"{v} {k}" for k, v in kinds.items()),
             f"receptive field: {report['rf_size']}x{report['rf_size']} input pixels (stride {report['jump']})",
             f"never used inside it: {100 * report['gridding_share']:.1f}%"]
    if report.get("note"):
        lines.append("note: " + report["note"])
    if out:
        lines.append(f"wrote {out}")
>>>>>>> use
    emit(args, result, lines)
    return 0


<<<<<<< HEAD
def _of_model(args, draw, stem: str, **options) -> int:
    """A model's picture: ``draw`` (the stem + depthwise RF, or the effective RF) of --checkpoint or --model."""
    from ..analysis.inputs import load_model
=======
def _effective(args) -> int:
    from ..analysis.receptive_field import count_colour_map, effective_rf, plot_erf
>>>>>>> use

    model, config, name = load_model(args.checkpoint, args.model, args.which)
    label = config.get("model") if config else args.model
<<<<<<< HEAD
    result, lines = draw(model, config, name, _out(args, f"{stem}_{label}"), layer=args.layer, dpi=args.dpi,
                         cmap=args.cmap, **options)
=======
    cmap = "inferno" if args.cmap == "seed" else count_colour_map(args.cmap)
    out = _save(args, lambda: plot_erf(report, name, source, dpi=args.dpi, cmap=cmap), f"erf_{label}")
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
    if out:
        lines.append(f"wrote {out}")
>>>>>>> use
    emit(args, result, lines)
    return 0
