"""Print the README's model table: every registered model's exact parameters and MACs at its
default input size (torch.utils.flop_counter, MACs = FLOPs / 2, batch 1) beside the paper's figures.

    python benchmarks/model_table.py > /tmp/table.md
"""
from __future__ import annotations

import torch

import mixlab
from mixlab.analysis.profile import count_macs, count_params


def fmt(n, unit=""):
    if n is None:
        return ""
    if isinstance(n, str):
        return n
    if n >= 1e9:
        return f"{n / 1e9:.2f}G{unit}"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M{unit}"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K{unit}"
    return f"{n:g}{unit}"


def main():
    print("| model | input | params | MACs | paper: params / MACs / top-1 | CIFAR form |")
    print("|---|---|---:|---:|---|---|")
    for name in mixlab.list_models():
        info = mixlab.model_info(name)
        with torch.device("meta"):
            model = mixlab.create_model(name)
        params, _ = count_params(model)
        macs = count_macs(model, info.input_size)
        pf = info.paper_figures
        acc = pf.get("top1") or pf.get("top1_cifar10")
        acc_s = f"{acc}%" + (" (CIFAR-10)" if "top1_cifar10" in pf else "") if acc else ""
        paper = " / ".join(x for x in (fmt(pf.get("params")), fmt(pf.get("macs")), acc_s) if x)
        size = f"{info.input_size[1]}x{info.input_size[2]}"
        print(f"| `{name}` | {size} | {params:,} | {fmt(macs)} | {paper} | {info.cifar} |")


if __name__ == "__main__":
    main()
