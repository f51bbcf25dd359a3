"""`mixlab eval --checkpoint RUN_DIR`: accuracy, per-class accuracy, confusion matrix."""
from __future__ import annotations

from pathlib import Path

from . import print_json


def configure(p):
    from .train import HelpFormatter

    p.formatter_class = HelpFormatter
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="a `mixlab train` run directory")
    p.add_argument("--weights", choices=["best", "last"], default="best", help="which weights of the run")
    p.add_argument("--data", help="data root (default: the run's)")
    p.add_argument("--split", choices=["test", "val"], default="test", help="the split to evaluate")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward pass")
    p.add_argument("--plot", metavar="FILE.png", nargs="?", const="", help="write the confusion matrix as a PNG "
                   "(default file: RUN_DIR/confusion_<split>.png)")
    p.add_argument("--json", action="store_true", help="print every figure as JSON (top-5 accuracy and macro-F1 "
                   "from torchmetrics included)")


def run(args) -> int:
    from ..analysis.confusion import plot_confusion
    from ..evaluate import evaluate_run

    r = evaluate_run(args.checkpoint, args.weights, args.data, args.split, args.device, args.batch_size)
    if args.plot is not None:
        path = Path(args.plot) if args.plot else Path(args.checkpoint) / f"confusion_{args.split}.png"
        plot_confusion(r, path)
        r["plot"] = str(path)
    if print_json(r, args.json):
        return 0
    top5 = f", top-5 {r['top5_accuracy']:.2f}%" if r["top5_accuracy"] is not None else ""
    print(f"{r['model']} ({r['weights']} weights) on the {r['split']} split: accuracy {r['accuracy']:.2f}%{top5}, "
          f"macro-F1 {r['macro_f1']:.2f}% over {r['n']} images, loss {r['loss']:.4f}")
    for c, a in r["per_class_accuracy"].items():
        print(f"  {c:<14} {a:6.2f}%" if a is not None else f"  {c:<14}    n/a  (no {r['split']} images)")
    if "plot" in r:
        print(f"confusion matrix: {r['plot']}")
    return 0
