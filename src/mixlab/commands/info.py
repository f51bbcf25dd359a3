"""`mixlab info MODEL`: exact size and cost of one forward pass."""
from __future__ import annotations

import json
from . import print_json


def configure(p):
    p.add_argument("model", help="a registered model name (see `mixlab models`)")
    p.add_argument("--img-size", type=int, nargs="+", metavar="N",
                   help="input size: N, or H W (default: the model's own)")
    p.add_argument("--num-classes", type=int, help="number of classes (default: the model's own)")
    p.add_argument("--in-chans", type=int, help="input channels (default: the model's own)")
    p.add_argument("--model-kwargs", default="", metavar="K=V,...",
                   help="architecture arguments, e.g. kernel_size=9,patch_size=1")
    p.add_argument("--per-layer", action="store_true", help="parameters and MACs of every module")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run the forward pass even when its memory estimate is above the memory free")


def run(args) -> int:
    from ..analysis.profile import CONVENTION, describe_model, format_count
    from ..kv import parse_kv

    d = describe_model(args.model, args.img_size, args.num_classes, args.in_chans, parse_kv(args.model_kwargs),
                       memory_check=not args.no_memory_check)
    model = d.pop("_model")
    if args.per_layer:
        from ..analysis.per_layer import format_per_layer, per_layer_table

        rows = per_layer_table(model, d["input_size"][1:])
        if args.json:
            print(json.dumps(dict(d, layers=rows), indent=2))
        else:
            print(format_per_layer(rows))
            print(f"total: {d['params']:,} params, {d['macs']:,} MACs")
        return 0
    if print_json(d, args.json):
        return 0
    print(f"{d['name']}  ({d['paper']})")
    print(f"  input             {' x '.join(map(str, d['input_size']))}")
    print(f"  output            {d['output_shape']}")
    print(f"  params            {d['params']:,} ({format_count(d['params'], 3)}), trainable {d['trainable_params']:,}")
    print(f"  MACs              {d['macs']:,} ({format_count(d['macs'], 3)})")
    print(f"  FLOPs             {d['flops']:,} ({format_count(d['flops'], 3)})")
    if d["paper_figures"]:
        figs = ", ".join(f"{k}={format_count(v, 3) if isinstance(v, (int, float)) and v > 1000 else v}"
                         for k, v in d["paper_figures"].items())
        print(f"  paper             {figs}")
    if d["stages"]:
        print("  stages:")
        for s in d["stages"]:
            print(f"    {s['module']:<20} {s['shape']}  (stride {s['reduction']})")
    print(f"  ({CONVENTION})")
    return 0
