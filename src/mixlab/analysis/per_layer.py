"""Parameters and MACs per module (``mixlab info MODEL --per-layer``).

MACs come from the per-module counts of :func:`mixlab.analysis.profile.flop_counter` (the
same ``FlopCounterMode`` run as :func:`~mixlab.analysis.profile.count_macs`, so the same
convention: convolutions and matrix products, one multiply-add = one MAC). Each row gives
a module's totals including its children, and its ``own_*`` share that no child accounts
for (parameters it holds directly, such as a position embedding; products computed in its
own ``forward``, such as attention's ``q @ k``). The ``own`` columns add up to exactly the
model totals, as do the root row's totals.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .profile import counted_forward, format_count

__all__ = ["per_layer_table", "format_per_layer"]


def _module_macs(model: nn.Module, input_size) -> tuple[dict[str, int], int]:
    """{module path ('' = root): MACs} for one eval forward of batch 1, and the total."""
    counter = counted_forward(model, input_size)
    root = type(model).__name__
    macs: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        if key == root:
            path = ""
        elif key.startswith(root + "."):
            path = key[len(root) + 1:]
        else:
            continue
        macs[path] = sum(int(v) for v in ops.values()) // 2
    total = int(counter.get_total_flops()) // 2
    return macs, total


def per_layer_table(model: nn.Module, input_size: int | Sequence[int]) -> list[dict]:
    """One row per module, in registration order, root first.

    Row keys: ``name`` (dotted path, '' for the model), ``type``, ``depth`` (0 = the model),
    ``params`` and ``macs`` (the module with its children), ``own_params`` and ``own_macs``
    (not inside any child). Works on meta-device models (no real compute).
    """
    macs, total_macs = _module_macs(model, input_size)
    modules = list(model.named_modules())
    seen: set[int] = set()  # tied parameters are counted once, where first met
    rows = []
    for name, module in modules:
        own_params = 0
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                own_params += p.numel()
        rows.append(dict(name=name, type=type(module).__name__, depth=0 if not name else name.count(".") + 1,
                         params=0, macs=0, own_params=own_params, own_macs=0))
    by_name = {r["name"]: r for r in rows}
    # subtree params: add each module's own params to itself and every ancestor
    for r in rows:
        parts = r["name"].split(".") if r["name"] else []
        for i in range(len(parts) + 1):
            anc = by_name.get(".".join(parts[:i]))
            if anc is not None:
                anc["params"] += r["own_params"]
    children: dict[str, list[str]] = {}
    for name, module in modules:
        children[name] = [f"{name}.{c}" if name else c for c, _ in module.named_children()]
    # children come after their parent in named_modules order: fill bottom-up. A container
    # that is never called itself (ModuleList) gets no count of its own: it holds its children's.
    for r in reversed(rows):
        r["macs"] = macs[r["name"]] if r["name"] in macs else sum(
            by_name[c]["macs"] for c in children[r["name"]] if c in by_name)
    rows[0]["macs"] = total_macs
    for r in rows:
        kids = [by_name[c]["macs"] for c in children[r["name"]] if c in by_name]
        r["own_macs"] = r["macs"] - sum(kids)
    return rows


def format_per_layer(rows: list[dict], max_depth: int | None = None, hide_empty: bool = True) -> str:
    """A text table: the module tree (indented by depth) with parameters and MACs and their
    share of the total. ``max_depth`` folds deeper modules into their ancestors (their
    numbers are already in the ancestors' totals); ``hide_empty`` drops rows with neither
    parameters nor MACs (activations, dropouts, identities)."""
    if not rows:
        return ""
    total_p, total_m = rows[0]["params"], rows[0]["macs"]
    shown = [r for r in rows if (max_depth is None or r["depth"] <= max_depth)
             and (not hide_empty or r["depth"] == 0 or r["params"] or r["macs"])]
    labels = [("  " * r["depth"]) + (r["name"].rsplit(".", 1)[-1] if r["name"] else "(model)") for r in shown]
    width = max(24, *(len(lbl) for lbl in labels))
    twidth = max(4, *(len(r["type"]) for r in shown))
    head = f"{'module':<{width}}  {'type':<{twidth}}  {'params':>12} {'%':>6}  {'MACs':>15} {'%':>6}"
    lines = [head, "-" * len(head)]
    for lbl, r in zip(labels, shown):
        pp = 100 * r["params"] / total_p if total_p else 0.0
        mp = 100 * r["macs"] / total_m if total_m else 0.0
        lines.append(f"{lbl:<{width}}  {r['type']:<{twidth}}  {r['params']:>12,} {pp:>5.1f}%  "
                     f"{r['macs']:>15,} {mp:>5.1f}%")
    lines.append("-" * len(head))
    lines.append(f"{'total':<{width}}  {'':<{twidth}}  {total_p:>12,} {'':>6}  {total_m:>15,} {'':>6}"
                 f"   ({format_count(total_p, 2)} params, {format_count(total_m, 2)} MACs)")
    return "\n".join(lines)
