"""`mixlab info MODEL`: exact size and cost of one forward pass."""
from __future__ import annotations

import json

import torch

from ..errors import UsageError

CONVENTION = ("MACs and FLOPs of one forward pass at batch 1, counted by torch.utils.flop_counter "
              "(convolutions and matrix products); FLOPs = 2 x MACs.")


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


def _split_top_level(text: str) -> list[str]:
    """Split at the commas outside brackets, braces and quotes ('a=[1,2],b=x' -> ['a=[1,2]', 'b=x'])."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_kv(text: str) -> dict:
    """'a=1,b=x,dims=[32,64],c={k: 0.5}' -> {'a': 1, 'b': 'x', 'dims': [32, 64], 'c': {'k': 0.5}}.

    Values are read as YAML (numbers, true/false, null, [lists], {mappings}); the commas that
    separate KEY=VALUE pairs are those outside brackets and quotes.
    """
    import yaml

    out = {}
    for item in _split_top_level(text or ""):
        if "=" not in item:
            raise UsageError(f"--model-kwargs takes KEY=VALUE pairs separated by commas "
                             f"(e.g. dims=[32,64,128,160,256],drop_rate=0.1), got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise UsageError(f"--model-kwargs: {key!r} is not an argument name (in {item!r})")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            problem = str(e).splitlines()[0]
            raise UsageError(f"--model-kwargs: the value of {key} ({value.strip()!r}) cannot be read ({problem}); "
                             "write lists as [a,b,c], mappings as {k: v}, text with commas in quotes") from None
    return out


def describe(name: str, img_size=None, num_classes=None, in_chans=None, model_kwargs=None,
             memory_check: bool = True) -> dict:
    """Everything `mixlab info` prints, as a dict. ``memory_check``: refuse a size whose forward
    pass would not fit in the memory free (estimated first, see :mod:`mixlab.analysis.memory`)."""
    from .. import create_model, model_info
    from ..analysis.profile import count_flops, count_params, feature_shapes
    from ..train.validation import check_model_kwargs

    info = model_info(name)
    if img_size is None:
        hw = tuple(info.input_size[1:])
    else:
        hw = (img_size[0], img_size[0]) if len(img_size) == 1 else tuple(img_size[:2])
    kwargs = dict(model_kwargs or {})
    check_model_kwargs(name, kwargs)
    model = create_model(name, num_classes=num_classes, in_chans=in_chans,
                         img_size=hw if img_size is not None else None, **kwargs)
    model.eval()
    chans = in_chans or getattr(model, "in_chans", info.input_size[0])
    if memory_check:
        from ..analysis.memory import check_memory, estimate_memory

        build = lambda: create_model(name, num_classes=num_classes, in_chans=in_chans,  # noqa: E731
                                     img_size=hw if img_size is not None else None, **kwargs)
        check_memory(estimate_memory(build, (1, chans, *hw), "infer"), "cpu",
                     f"a forward pass of {name} at {hw[0]}x{hw[1]}", "give a smaller --img-size",
                     "pass --no-memory-check")
    total, trainable = count_params(model)
    flops = count_flops(model, (chans, *hw))
    with torch.no_grad():
        out = model(torch.zeros(1, chans, *hw))
    out_shape = list(out.shape) if isinstance(out, torch.Tensor) else [list(o.shape) for o in out]
    return dict(
        name=name, family=info.family, paper=info.paper, params=total, trainable_params=trainable,
        macs=flops // 2, flops=flops, input_size=[1, chans, *hw], output_shape=out_shape,
        stages=feature_shapes(model, (chans, *hw)), paper_figures=info.paper_figures,
        model_kwargs=kwargs, convention=CONVENTION, _model=model,
    )


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(int(n))


def run(args) -> int:
    d = describe(args.model, args.img_size, args.num_classes, args.in_chans, parse_kv(args.model_kwargs),
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
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{d['name']}  ({d['paper']})")
    print(f"  input             {' x '.join(map(str, d['input_size']))}")
    print(f"  output            {d['output_shape']}")
    print(f"  params            {d['params']:,} ({_human(d['params'])}), trainable {d['trainable_params']:,}")
    print(f"  MACs              {d['macs']:,} ({_human(d['macs'])})")
    print(f"  FLOPs             {d['flops']:,} ({_human(d['flops'])})")
    if d["paper_figures"]:
        figs = ", ".join(f"{k}={_human(v) if isinstance(v, (int, float)) and v > 1000 else v}"
                         for k, v in d["paper_figures"].items())
        print(f"  paper             {figs}")
    if d["stages"]:
        print("  stages:")
        for s in d["stages"]:
            print(f"    {s['module']:<20} {s['shape']}  (stride {s['reduction']})")
    print(f"  ({CONVENTION})")
    return 0
