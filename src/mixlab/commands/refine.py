"""`mixlab refine coarse | train | eval | apply | sampling`: boundary patch refinement (BPR)."""
from __future__ import annotations

from pathlib import Path
from ..errors import UsageError
from . import print_json

COARSE_HELP = ("coarse masks: a folder of mask PNGs named like the images (`mixlab seg predict` or `mixlab det "
               "predict` --out, `mixlab refine coarse` --out) or a `mixlab seg train` run directory (predicts them)")


def configure(p):
    from .train import add_run_options

    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    c = sub.add_parser("coarse", help="out-of-fold coarse masks of training images, to train a refiner on")
    c.add_argument("--data", required=True, help="data folder (images/ with masks/0/), e.g. ../shared/data/busi")
    c.add_argument("--out", required=True, metavar="DIR", help="writes DIR/masks/0/<name>.png, DIR/fold<k>/ runs "
                   "and DIR/coarse.json; run the same command again to continue")
    c.add_argument("--folds", type=int, default=5, help="K: each image is predicted by a model trained on the other "
                   "K-1 folds")
    c.add_argument("--names", metavar="FILE", help="the images to make masks of, one name per line (default: the "
                   "training split `mixlab seg train` makes of --data with the same settings)")
    c.add_argument("--model", help="the coarse segmenter (`mixlab models --task segmentation`)")
    c.add_argument("--recipe", help="a shipped segmentation recipe, e.g. unext-busi")
    c.add_argument("--config", help="a YAML file of segmentation settings")
    c.add_argument("--epochs", type=int)
    c.add_argument("--batch-size", type=int)
    c.add_argument("--seed", type=int)
    c.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    c.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any segmentation setting")

    t = sub.add_parser("train", help="train a patch refiner and write a run directory")
    add_run_options(t, model_help="the refiner: a segmentation model built with 4 input channels (default unext_s)",
                    data_help="data folder with the ground truth (images/ with masks/0/)",
                    recipe_help="a shipped refine recipe (`mixlab recipes`)",
                    set_example="--set patch.size=32 --set patch.nms_iou_train=0.3")
    t.add_argument("--coarse", metavar="DIR_OR_RUN", help=COARSE_HELP + "; never masks of images the coarse "
                   "model trained on")
    t.add_argument("--train-split", metavar="FILE", help="names of the refiner's training images, one per line")
    t.add_argument("--val-split", metavar="FILE", help="names of its validation images, one per line")

    e = sub.add_parser("eval", help="IoU, Dice and boundary F before and after refinement, on the same images")
    e.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="a `mixlab refine train` run directory")
    e.add_argument("--coarse", required=True, metavar="DIR_OR_RUN", help=COARSE_HELP)
    e.add_argument("--data", required=True, help="data folder with the ground truth")
    e.add_argument("--split", metavar="FILE", help="evaluate only these images (default: a seg run's validation "
                   "split when --coarse is a run, else every image with a coarse mask)")
    e.add_argument("--weights", choices=["best", "last"], default="best")
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=int, help="images per batch of the pooled IoU/Dice (default: the coarse "
                   "run's, as `mixlab seg eval`, else the refine run's)")
    e.add_argument("--overlays", metavar="PNG", help="also draw the largest gain, the median and the largest loss")
    e.add_argument("--json", action="store_true", help="print every figure and the per-image values as JSON")

    a = sub.add_parser("apply", help="refine coarse masks of any images; write mask PNGs and overlays")
    a.add_argument("--checkpoint", required=True, metavar="RUN_DIR")
    a.add_argument("--coarse", required=True, metavar="DIR_OR_RUN", help=COARSE_HELP)
    a.add_argument("--input", required=True, metavar="DIR", help="a folder of images (or a data folder's images/)")
    a.add_argument("--out", required=True, metavar="DIR", help="writes DIR/masks/0/<name>.png and DIR/overlays/")
    a.add_argument("--weights", choices=["best", "last"], default="best")
    a.add_argument("--device", default="auto")
    a.add_argument("--no-overlays", action="store_true", help="write only the mask PNGs")
    a.add_argument("--json", action="store_true")

    s = sub.add_parser("sampling", help="a picture of what grid_sample does to a patch (cut and pasted back)")
    s.add_argument("--out", required=True, metavar="PNG")


def run(args) -> int:
    actions = {"coarse": _coarse, "train": _train, "eval": _eval, "apply": _apply, "sampling": _sampling}
    return actions[args.action](args)


def _coarse(args) -> int:
    from ..refine.coarse import out_of_fold_coarse
    from ..seg.data import load_segmentation_data, read_split_file, split_names
    from ..train.config import resolve_config

    cfg = resolve_config(model=args.model, recipe=args.recipe, config_file=args.config, overrides=list(args.set),
                         task="segmentation", data=args.data, epochs=args.epochs, batch_size=args.batch_size,
                         seed=args.seed, device=args.device, precision=args.precision)
    if args.names:
        names = read_split_file(args.names)
    else:
        all_names = load_segmentation_data(args.data).names
        d = cfg["data"]
        names = split_names(all_names, float(d["val_split"]), int(d["split_seed"]))[0] \
            if float(d["val_split"]) > 0 else list(all_names)
        print(f"making out-of-fold masks of the {len(names)} training images of `mixlab seg train --data "
              f"{args.data}` (val_split {d['val_split']}, split_seed {d['split_seed']})")
    plan = out_of_fold_coarse(cfg, names, args.folds, args.out, cfg["device"])
    print(f"{sum(len(f) for f in plan['folds'])} out-of-fold masks -> {Path(args.out) / 'masks' / '0'} "
          f"({len(plan['folds'])} folds of {plan['model']}, {plan['epochs']} epochs each)")
    return 0


def _train(args) -> int:
    from .train import resume_run, split_overrides, start_run

    if args.resume:
        if args.coarse:
            raise UsageError(f"--resume continues {args.resume} with the coarse masks in its config.yaml; drop "
                             "--coarse, or start a new run with --out NEW_DIR")
        return resume_run(args, "refine", "mixlab refine train")
    explicit = {"coarse": {"source": args.coarse}} if args.coarse else {}
    return start_run(args, "refine", "mixlab refine train", split_overrides(args), **explicit)


def _eval(args) -> int:
    from ..refine.use import evaluate_refine_run

    r, arrays = evaluate_refine_run(args.checkpoint, args.coarse, args.data, args.split, args.weights, args.device,
                                    args.batch_size)
    if args.overlays:
        from ..refine.figures import change_cases_figure

        change_cases_figure(arrays, r, args.overlays, title=f"refined by {args.checkpoint}; green: truth, "
                            "blue: coarse, red: refined")
    if print_json(r, args.json):
        return 0
    for note in r["notes"]:
        print(f"note: {note}")
    print(f"{r['n_images']} images ({r['split']}), {r['n_patches']} patches of {r['patch_size']} px -> "
          f"{r['input_size']} (NMS IoU {r['nms_iou']}), {1000 * r['seconds_per_image']:.1f} ms per image:")
    print(f"  {'':<16} {'before':>6}  {'after':>6}")
    for label, key in (("IoU", "iou"), ("Dice", "dice"), ("IoU per image", "iou_per_image"),
                       ("Dice per image", "dice_per_image"),
                       (f"boundary F@{r['boundary_tolerance_px']}px", "boundary_f")):
        print(f"  {label:<16} {r[key + '_before']:6.2f}  {r[key + '_after']:6.2f}")
    print(f"  (IoU, Dice: pixels pooled per batch of {r['official_batch_size']} images, as `mixlab seg eval`)")
    if args.overlays:
        print(f"overlays: {args.overlays}")
    return 0


def _apply(args) -> int:
    from ..refine.use import apply_refine_run

    r = apply_refine_run(args.checkpoint, args.coarse, args.input, args.out, args.weights, args.device,
                         overlays=not args.no_overlays)
    if print_json(r, args.json):
        return 0
    if r["skipped_no_coarse"]:
        print(f"note: {len(r['skipped_no_coarse'])} image(s) without a coarse mask skipped: "
              f"{', '.join(r['skipped_no_coarse'][:5])}")
    print(f"{r['images']} image(s), {r['patches']} patches -> {args.out}/masks/0/ ({r['masks']} mask PNGs)"
          + (f" and {args.out}/overlays/" if r["overlays"] else "")
          + f"; {1000 * r['seconds_per_image']:.1f} ms per image")
    return 0


def _sampling(args) -> int:
    from ..refine.figures import sampling_figure

    print(f"wrote {sampling_figure(args.out)}")
    return 0
