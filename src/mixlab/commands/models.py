"""`mixlab models [PATTERN]`: one line per registered model."""
from __future__ import annotations

from . import print_json


def configure(p):
    p.add_argument("pattern", nargs="?", help="shell-style pattern or substring, e.g. 'conv2former*' or 'cifar'")
    p.add_argument("--family", help="only this family (convmixer, convmlp, conv2former, ...)")
    p.add_argument("--task", choices=["classification", "segmentation"], help="only models for this task")
    p.add_argument("--json", action="store_true", help="print a JSON list")


def run(args) -> int:
    from .. import list_models, model_info
    from ..analysis.profile import registered_params

    names = list_models(args.pattern, family=args.family, task=args.task)
    if not names:
        print(f"no model matches {args.pattern!r}; run `mixlab models` for the full list")
        return 1
    rows = []
    for name in names:
        info = model_info(name)
        rows.append(dict(name=name, params=registered_params(name), input_size=list(info.input_size),
                         family=info.family, paper=info.paper, cifar=info.cifar or None))
    if print_json(rows, args.json):
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        size = f"{r['input_size'][1]}x{r['input_size'][2]}"
        cifar = f"  [CIFAR: {r['cifar']}]" if r["cifar"] else ""
        print(f"{r['name']:<{width}}  {r['params'] / 1e6:8.2f}M  {size:>7}  {r['paper']}{cifar}")
    return 0
