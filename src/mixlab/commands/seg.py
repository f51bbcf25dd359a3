"""`mixlab seg train | cv | eval | predict`: segmentation (UNeXt on BUSI and any images + masks folder)."""
from __future__ import annotations

import json

from ..errors import UsageError
from . import print_json


def configure(p):
    from .train import HelpFormatter, add_run_options

    p.formatter_class = HelpFormatter
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train a segmentation model and write a run directory",
                       formatter_class=HelpFormatter)
    add_run_options(t, model_help="a segmentation model (`mixlab models --task segmentation`): unext, unext_s",
                    data_help="data folder: UNeXt layout (images/, masks/0/) or images/ + masks/ with matching "
                    "names (e.g. a BUSI folder: images/<name>.png, masks/0/<name>.png)",
                    recipe_help="a shipped segmentation recipe (`mixlab recipes`), e.g. unext-busi",
                    set_example="--set loss.name=dice --set data.val_split=0.3")
    t.add_argument("--train-split", metavar="FILE", help="names of the training cases, one per line")
    t.add_argument("--val-split", metavar="FILE", help="names of the validation cases, one per line")
    t.add_argument("--test-split", metavar="FRACTION|FILE",
                   help="cases set aside as a held-out test split, never trained on nor used to select the weights: "
                   "a fraction of all cases (e.g. 0.2; the validation split is then drawn from the rest) or a file "
                   "of names")

    c = sub.add_parser("cv", help="train a recipe over K folds or N random splits: mean ± std of the held-out "
                       "figures")
    c.add_argument("--data", required=True, help="data folder (as for `mixlab seg train`)")
    c.add_argument("--out", required=True, metavar="DIR", help="folder of the runs: DIR/fold1/ ... and DIR/cv.json")
    how = c.add_mutually_exclusive_group(required=True)
    how.add_argument("--folds", type=int, metavar="K", help="K-fold: each case is held out as test exactly once")
    how.add_argument("--repeats", type=int, metavar="N", help="N seeded random splits (see --test-split)")
    c.add_argument("--test-split", type=float, default=0.2, metavar="FRACTION",
                   help="held-out fraction of each random split (--repeats; default 0.2)")
    c.add_argument("--recipe", help="a shipped segmentation recipe, e.g. unext-busi")
    c.add_argument("--model", help="a segmentation model (default: the recipe's)")
    c.add_argument("--config", help="a YAML file of settings")
    c.add_argument("--epochs", type=int)
    c.add_argument("--batch-size", type=int)
    c.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    c.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting for every run")
    c.add_argument("--dry-run", action="store_true", help="print the parts and what would be trained or skipped")
    c.add_argument("--json", action="store_true", help="print cv.json's contents at the end")

    e = sub.add_parser("eval", help="IoU, Dice, precision, recall of a trained run", formatter_class=HelpFormatter)
    e.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="a `mixlab seg train` run directory")
    e.add_argument("--data", help="data folder to evaluate (default: the run's validation split of its data); "
                   "every image of a folder given here is evaluated")
    e.add_argument("--split", choices=["val", "test"], default="val",
                   help="the run's split to evaluate: val (the one that selected the weights) or test (held out; "
                   "runs trained with --test-split)")
    e.add_argument("--weights", choices=["best", "last"], default="best", help="which weights of the run")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    e.add_argument("--batch-size", type=int, help="batch size of the paper's batch-pooled IoU/Dice "
                   "(default: the run's)")
    e.add_argument("--json", action="store_true", help="print every figure, and per-image values, as JSON")

    r = sub.add_parser("predict", help="predict masks; write mask PNGs and side-by-side overlays",
                       formatter_class=HelpFormatter)
    r.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="a `mixlab seg train` run directory")
    r.add_argument("--input", required=True, metavar="IMAGE_OR_DIR",
                   help="an image, a folder of images, or a data folder (its masks are shown as ground truth)")
    r.add_argument("--out", required=True, metavar="DIR", help="writes DIR/masks/<k>/<name>.png and DIR/overlays/")
    r.add_argument("--weights", choices=["best", "last"], default="best", help="which weights of the run")
    r.add_argument("--threshold", type=float, help="probability threshold (default: the run's, 0.5)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    r.add_argument("--no-overlays", action="store_true", help="write only the mask PNGs")
    r.add_argument("--json", action="store_true", help="print what was written (and scores, with ground truth) as JSON")


def run(args) -> int:
    return {"train": _train, "cv": _cv, "eval": _eval, "predict": _predict}[args.action](args)


# ----------------------------------------------------------------------------- train

def _train(args) -> int:
    from .train import resume_run, split_overrides, start_run

    if args.resume:
        return resume_run(args, "segmentation", "mixlab seg train")
    overrides = split_overrides(args)
    if args.test_split:
        key = "test_split" if _is_fraction(args.test_split) else "test_split_file"
        overrides.append(f"data.{key}={args.test_split}")
    return start_run(args, "segmentation", "mixlab seg train", overrides)


def _is_fraction(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    if not 0.0 < value < 1.0:
        raise UsageError(f"--test-split {text}: a fraction must be between 0 and 1 (or give a file of names)")
    return True


def _cv(args) -> int:
    from ..train.cv import run_cv

    report = run_cv(args.out, args.data, folds=args.folds, repeats=args.repeats, test_split=args.test_split,
                    recipe=args.recipe, model=args.model, config_file=args.config, overrides=args.set,
                    epochs=args.epochs, dry_run=args.dry_run, batch_size=args.batch_size, device=args.device,
                    precision=args.precision)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


# ----------------------------------------------------------------------------- eval / predict

def _eval(args) -> int:
    from ..evaluate import evaluate_seg_run

    r = evaluate_seg_run(args.checkpoint, args.data, args.weights, args.device, args.batch_size,
                         keep_per_image=args.json, split_name=args.split)
    if print_json(r, args.json):
        return 0
    print(f"{r['model']} ({r['weights']} weights) on the {r['split']}, threshold {r['threshold']:g}:")
    print(f"  IoU   {100 * r['iou']:6.2f}   Dice {100 * r['dice']:6.2f}   "
          f"(the paper's code: pixels pooled per batch of {r['official_batch_size']}, batches averaged)")
    print(f"  IoU   {100 * r['iou_per_image']:6.2f}   Dice {100 * r['dice_per_image']:6.2f}   (mean over images)")
    print(f"  IoU   {100 * r['iou_global']:6.2f}   Dice {100 * r['dice_global']:6.2f}   (all pixels pooled)")
    print(f"  precision {100 * r['precision']:.2f}  recall {100 * r['recall']:.2f}  "
          f"pixel accuracy {100 * r['pixel_accuracy']:.2f}  loss {r['loss']:.4f}")
    return 0


def _predict(args) -> int:
    from ..evaluate import predict_seg_run

    result = predict_seg_run(args.checkpoint, args.input, args.out, weights=args.weights, threshold=args.threshold,
                             device=args.device, overlays=not args.no_overlays)
    if print_json(result, args.json):
        return 0
    written = f"{result['images']} image(s) -> {args.out}/masks/ ({result['masks']} mask PNGs)"
    if result["overlays"]:
        written += f" and {args.out}/overlays/ ({result['overlays']} side-by-side pictures)"
    print(written)
    if "with_truth" in result:
        print(f"against the {result['with_truth']} ground-truth mask(s) found: IoU {result['iou_per_image']:.2f} "
              f"Dice {result['dice_per_image']:.2f} (mean over images; at the images' own size)")
    return 0
