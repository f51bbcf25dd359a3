"""`mixlab export`: a run or a registered model to ONNX or a torch.export program, checked."""
from __future__ import annotations

import json


def configure(p):
    from .train import HelpFormatter

    p.formatter_class = HelpFormatter
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="RUN_DIR", help="a `mixlab train` (or `mixlab seg train`) run directory")
    src.add_argument("--model", metavar="NAME", help="a registered model, freshly initialised (see `mixlab models`)")
    p.add_argument("--format", required=True, choices=["onnx", "pt2"],
                   help="onnx (torch.onnx.export, dynamo=True; checked with onnxruntime) or pt2 (torch.export; "
                        "checked with torch.export.load)")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (.onnx / .pt2)")
    p.add_argument("--weights", choices=["best", "last"], default="best", help="which weights of the run")
    p.add_argument("--img-size", type=int, metavar="N", help="--model only: input size (default: the model's)")
    p.add_argument("--num-classes", type=int, metavar="K", help="--model only: classes (default: the model's)")
    p.add_argument("--atol", type=float, default=1e-4, help="check: absolute tolerance")
    p.add_argument("--rtol", type=float, default=1e-3, help="check: tolerance relative to the model's output")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    from ..export import export_model, model_for_export

    model, size, meta = model_for_export(args.checkpoint, args.model, args.weights, args.img_size, args.num_classes)
    name = args.model or meta["model"]
    result = export_model(model, args.out, args.format, size, name=name, metadata=meta, atol=args.atol,
                          rtol=args.rtol, say=None if args.json else print)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    return 0
