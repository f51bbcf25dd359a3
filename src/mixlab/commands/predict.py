"""`mixlab predict`: classify image files with a trained run (its preprocessing, its class names)."""
from __future__ import annotations


def configure(p):
    from .train import HelpFormatter

    p.formatter_class = HelpFormatter
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="a `mixlab train` run directory")
    p.add_argument("--input", required=True, metavar="IMAGE_OR_DIR",
                   help="an image file, or a folder searched recursively for images")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="how many classes to list per image")
    p.add_argument("--out", metavar="FILE", help="write the predictions to FILE.csv or FILE.json (default: print them)")
    p.add_argument("--weights", choices=["best", "last"], default="best", help="which weights of the run")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="default: the run's, as `mixlab eval` uses it")


def run(args) -> int:
    from ..predict import list_images, predict_files, write_predictions

    files = list_images(args.input)
    preds, info = predict_files(args.checkpoint, files, top_k=args.top_k, weights=args.weights,
                                batch_size=args.batch_size, device=args.device, precision=args.precision)
    if args.out:
        path = write_predictions(preds, info, args.out)
        print(f"{len(preds)} image(s) classified by {info['model']} ({info['weights']} weights): {path}")
        return 0
    for p in preds:
        print(f"{p.file}: " + ", ".join(f"{c} {100 * v:.1f}%" for c, _, v in p.top))
    return 0
