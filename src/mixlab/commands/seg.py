"""`mixlab seg train | eval | predict`: segmentation (UNeXt on BUSI and any images + masks folder)."""
from __future__ import annotations

import json
from pathlib import Path


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

    e = sub.add_parser("eval", help="IoU, Dice, precision, recall of a trained run", formatter_class=HelpFormatter)
    e.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="a `mixlab seg train` run directory")
    e.add_argument("--data", help="data folder to evaluate (default: the run's validation split of its data); "
                   "every image of a folder given here is evaluated")
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
    return {"train": _train, "eval": _eval, "predict": _predict}[args.action](args)


# ----------------------------------------------------------------------------- train

def _train(args) -> int:
    from ..train import rundir as rd
    from ..train.seg_trainer import run_seg_training
    from .train import config_from_args, refuse_ignored_on_resume

    if args.resume:
        refuse_ignored_on_resume(args, "mixlab seg train")
        cfg = rd.resume_config(args.resume, "segmentation", args.model, args.epochs, args.data)
        if cfg is None:
            print(f"{args.resume} already finished {rd.read_summary(args.resume)['epochs_done']} epochs")
            return 0
        run_seg_training(cfg, Path(args.resume), resume=True)
        return 0
    overrides = list(args.set)
    if args.train_split:
        overrides.append(f"data.train_split_file={args.train_split}")
    if args.val_split:
        overrides.append(f"data.val_split_file={args.val_split}")
    cfg = config_from_args(args, "segmentation", overrides)
    out = rd.new_run_dir(args.out, cfg["model"], "mixlab seg train")
    run_seg_training(cfg, out)
    return 0


# ----------------------------------------------------------------------------- eval / predict

def load_seg_run(run_dir, weights: str = "best"):
    """(model in eval mode with the run's weights, config) of a `mixlab seg train` run."""
    from ..checkpoint import load_weights
    from ..io import read_state_dict
    from ..train import rundir as rd
    from ..train.seg_trainer import build_seg_model, image_hw

    run_dir = Path(run_dir)
    cfg = rd.read_config(run_dir)
    if cfg.get("task") != "segmentation":
        raise ValueError(f"{run_dir} is a {cfg.get('task', 'classification')} run; use `mixlab eval` for it")
    path = run_dir / (rd.BEST if weights == "best" else rd.LAST)
    if weights == "best" and not path.is_file():
        path = run_dir / rd.LAST
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no weights yet ({rd.BEST} / {rd.LAST}); has it finished an epoch?")
    stored = rd.weights_model_name(path)
    if stored and stored != cfg["model"]:
        raise ValueError(f"{path} holds weights of {stored!r} but {run_dir / rd.CONFIG} says model {cfg['model']!r}")
    size = image_hw(cfg.get("img_size"))
    model = build_seg_model({**cfg, "drop_path_rate": None}, int(cfg["num_classes"]), size)
    load_weights(model, read_state_dict(path))
    return model.eval(), cfg


def evaluate_seg_run(run_dir, data=None, weights="best", device="auto", batch_size=None,
                     keep_per_image=False) -> dict:
    import torch

    from ..seg.data import load_segmentation_data
    from ..seg.losses import build_loss
    from ..train.distributed import Distributed
    from ..train.seg_trainer import evaluate_seg, image_hw, load_seg_data
    from ..train.trainer import pick_channels_last, pick_device, pick_precision

    model, cfg = load_seg_run(run_dir, weights)
    if batch_size:
        cfg["eval_batch_size"] = batch_size
    if data:
        from ..data.classification import default_cache_dir

        part = load_segmentation_data(data, size=image_hw(cfg.get("img_size")), cache_dir=default_cache_dir() / "seg")
        split = f"all {len(part)} images of {data}"
    else:
        _, part = load_seg_data(cfg, run_dir)
        if part is None:
            raise ValueError(f"{run_dir} was trained without a validation split: pass --data DIR to evaluate")
        split = f"validation split of {cfg['data']['root']} ({len(part)} images)"
    if part.num_classes != cfg["num_classes"]:
        raise ValueError(f"the run predicts {cfg['num_classes']} mask class(es) but the {split} has "
                         f"{part.num_classes}")
    dev = pick_device(device, Distributed())
    precision = pick_precision(cfg.get("precision", "auto"), dev)
    mf = torch.channels_last if pick_channels_last(cfg.get("channels_last", "auto"), model) else torch.contiguous_format
    model = model.to(dev, memory_format=mf)
    r = evaluate_seg(model, part.images, part.masks, cfg, dev, precision, mf, build_loss(cfg["loss"]["name"]),
                     keep_per_image=keep_per_image)
    if keep_per_image:
        r["per_image"]["name"] = list(part.names)
    return dict(run=str(run_dir), model=cfg["model"], weights=weights, split=split, autocast=precision,
                threshold=float(cfg["threshold"]), **r)


def _eval(args) -> int:
    r = evaluate_seg_run(args.checkpoint, args.data, args.weights, args.device, args.batch_size,
                         keep_per_image=args.json)
    if args.json:
        print(json.dumps(r, indent=2))
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
    import torch

    from ..seg.metrics import confusion_counts, scores_from_counts
    from ..seg.predict import predict_images, read_predict_inputs, write_predictions
    from ..train.distributed import Distributed
    from ..train.trainer import pick_device

    model, cfg = load_seg_run(args.checkpoint, args.weights)
    threshold = float(args.threshold if args.threshold is not None else cfg.get("threshold", 0.5))
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"--threshold must be between 0 and 1, got {threshold}")
    names, images, truths = read_predict_inputs(args.input)
    dev = pick_device(args.device, Distributed())
    k = int(cfg["num_classes"])
    mismatched = [n for n, t in zip(names, truths) if t is not None and t.shape[0] != k]
    if mismatched:
        raise ValueError(f"the run predicts {k} mask class(es) but the ground truth of {mismatched[0]!r}"
                         f"{f' (and {len(mismatched) - 1} more)' if len(mismatched) > 1 else ''} has "
                         f"{truths[names.index(mismatched[0])].shape[0]}; predict from an images folder without masks, "
                         "or from data with the run's mask classes (nothing was written)")
    from ..train.seg_trainer import image_hw

    size = image_hw(cfg.get("img_size"))
    probs = predict_images(model.to(dev), images, size=size, batch_size=int(cfg["batch_size"]),
                           mean=cfg["data"]["mean"], std=cfg["data"]["std"], device=dev)
    written = write_predictions(args.out, names, images, probs, truths, threshold, overlays=not args.no_overlays)
    result = dict(run=str(args.checkpoint), input=str(args.input), out=str(args.out), images=len(names),
                  threshold=threshold, masks=len(written["masks"]), overlays=len(written["overlays"]))
    known = [(p, t) for p, t in zip(probs, truths) if t is not None]
    if known:
        counts = torch.cat([confusion_counts(p[None] > threshold, t[None]) for p, t in known])
        pooled = scores_from_counts(counts.sum(0))
        per_image = scores_from_counts(counts)
        result.update(with_truth=len(known), iou_global=100 * float(pooled["iou"]),
                      dice_global=100 * float(pooled["dice"]), iou_per_image=100 * float(per_image["iou"].mean()),
                      dice_per_image=100 * float(per_image["dice"].mean()))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{len(names)} image(s) -> {args.out}/masks/ ({result['masks']} mask PNGs)"
          + (f" and {args.out}/overlays/ ({result['overlays']} side-by-side pictures)" if result["overlays"] else ""))
    if known:
        print(f"against the {len(known)} ground-truth mask(s) found: IoU {result['iou_per_image']:.2f} "
              f"Dice {result['dice_per_image']:.2f} (mean over images; at the images' own size)")
    return 0
