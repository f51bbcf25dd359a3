"""`mixlab det train | eval | predict`: instance segmentation, Mask R-CNN on any features_only backbone."""
from __future__ import annotations

from . import print_json


def configure(p):
    from .train import add_run_options

    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train Mask R-CNN on a backbone and write a run directory")
    add_run_options(t, model_help="the backbone (same as --backbone)",
                    data_help="data folder: COCO format (annotations.json + images/) or a mask folder (images/ with "
                    "masks/0/, instances = connected components), e.g. ../shared/data/busi",
                    recipe_help="a shipped detection recipe (`mixlab recipes`), e.g. maskrcnn-busi",
                    set_example="--set detector.min_size=320 --set data.min_area=20")
    t.add_argument("--backbone", dest="model", help="a mixlab model (`mixlab models`) or any timm model with "
                   "features_only, e.g. resnet18_imagenet, convmlp_s, convmixer_256_8")
    t.add_argument("--train-split", metavar="FILE", help="names of the training images, one per line")
    t.add_argument("--val-split", metavar="FILE", help="names of the validation images, one per line")

    e = sub.add_parser("eval", help="COCO AP (boxes, masks), union IoU / Dice and PR curves of a trained run")
    e.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="a `mixlab det train` run directory")
    e.add_argument("--data", help="data folder to evaluate, every image of it (default: the run's validation split)")
    e.add_argument("--weights", choices=["best", "last"], default="best")
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=int, help="images per forward pass (default: the run's eval batch size)")
    e.add_argument("--plot", metavar="PNG", help="write the precision-recall curves (IoU 0.5 and 0.75) there")
    e.add_argument("--union-score", type=float, metavar="S",
                   help="instances scoring at least S form the union scored as a semantic mask "
                        "(default: the run's eval.union_score, 0.5)")
    e.add_argument("--json", action="store_true", help="print every figure as JSON")

    r = sub.add_parser("predict", help="detect instances; write predictions.json, mask PNGs and overlays")
    r.add_argument("--checkpoint", required=True, metavar="RUN_DIR")
    r.add_argument("--input", required=True, metavar="IMAGE_OR_DIR",
                   help="an image, a folder of images, or a data folder (its ground truth is written and drawn)")
    r.add_argument("--out", required=True, metavar="DIR")
    r.add_argument("--weights", choices=["best", "last"], default="best")
    r.add_argument("--score-threshold", type=float, default=0.5,
                   help="instances scoring at least this get a mask PNG and are drawn (predictions.json keeps all)")
    r.add_argument("--device", default="auto")
    r.add_argument("--no-overlays", action="store_true", help="write no overlay pictures")
    r.add_argument("--json", action="store_true")


def run(args) -> int:
    return {"train": _train, "eval": _eval, "predict": _predict}[args.action](args)


def _train(args) -> int:
    from .train import resume_run, split_overrides, start_run

    if args.resume:
        return resume_run(args, "detection", "mixlab det train")
    return start_run(args, "detection", "mixlab det train", split_overrides(args),
                     folder_name=lambda cfg: f"maskrcnn-{cfg['model']}")


def _f(x) -> str:
    return "  n/a" if x is None else f"{x:5.2f}"


def _eval(args) -> int:
    from ..det.run import evaluate_det_run

    r = evaluate_det_run(args.checkpoint, args.data, args.weights, args.device, args.batch_size, args.plot,
                         union_score=args.union_score)
    if print_json(r, args.json):
        return 0
    print(f"Mask R-CNN on {r['backbone']} ({r['weights']} weights), {r['split']}:")
    for t, what in (("bbox", "boxes"), ("segm", "masks")):
        print(f"  {what:<5}  AP {_f(r[f'{t}_AP'])}  AP50 {_f(r[f'{t}_AP50'])}  AP75 {_f(r[f'{t}_AP75'])}  "
              f"APs {_f(r[f'{t}_APs'])}  APm {_f(r[f'{t}_APm'])}  APl {_f(r[f'{t}_APl'])}  AR100 {_f(r[f'{t}_AR100'])}")
    print(f"  union of instances scoring >= {r['union_score']:g}: IoU {r['union_iou']:.2f}  Dice {r['union_dice']:.2f} "
          f"(pixels pooled per batch of {r['union_batch']}, as `mixlab seg eval`); per image IoU "
          f"{r['union_iou_per_image']:.2f}  Dice {r['union_dice_per_image']:.2f}")
    print(f"  {r['n_images']} images, {r['n_detections']} detections; inference {r['infer_ms_per_image']:.1f} ms "
          f"per image (batch {r['infer_batch']}, {r['precision']})"
          + (f"; PR curves: {args.plot}" if args.plot else ""))
    return 0


def _predict(args) -> int:
    from ..det.run import predict_det_run

    r = predict_det_run(args.checkpoint, args.input, args.out, args.weights, args.device, args.score_threshold,
                        overlays=not args.no_overlays)
    if not print_json(r, args.json):
        print(f"{r['images']} image(s): {r['detections']} detections -> {r['predictions']}; {r['masks']} instance "
              f"mask PNG(s) scoring >= {r['score_threshold']:g} in {args.out}/masks/"
              + (f", {r['overlays']} overlay(s) in {args.out}/overlays/" if r["overlays"] else "")
              + ("; ground_truth.json written beside them" if r["with_truth"] else ""))
    return 0
