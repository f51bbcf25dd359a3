"""`mixlab eval --checkpoint RUN_DIR`: accuracy, per-class accuracy, confusion matrix."""
from __future__ import annotations

import json
from pathlib import Path


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


def evaluate_run(run_dir, weights="best", data_root=None, split="test", device="auto", batch_size=500,
                 return_predictions: bool = False) -> dict:
    """Accuracy, loss, top-5 accuracy, macro-F1, per-class accuracy and the confusion matrix of a run on
    a split (``return_predictions``: also each image's top-1 class index, in the split's order)."""
    import torch

    from ..data.augment import AugmentConfig, BatchAugment
    from ..data.classification import load_classification_data
    from ..train.distributed import Distributed
    from ..train.rundir import load_run_model
    from ..train.trainer import evaluate, pick_channels_last, pick_device, pick_precision

    model, cfg = load_run_model(run_dir, weights)
    if data_root:
        cfg["data"]["root"] = data_root
    data = load_classification_data(cfg)
    if data.num_classes != cfg["num_classes"]:
        raise ValueError(f"the run was trained on {cfg['num_classes']} classes but the data has {data.num_classes}")
    part = data.test if split == "test" else data.val
    if part is None:
        raise ValueError("the run was trained without a validation split (val_split 0): use --split test")
    dev = pick_device(device, Distributed())
    precision = pick_precision(cfg.get("precision", "auto") if cfg.get("precision") != "auto" else "auto", dev)
    mf = torch.channels_last if pick_channels_last(cfg.get("channels_last", "auto"), model) else torch.contiguous_format
    model = model.to(dev, memory_format=mf)
    prep = BatchAugment(AugmentConfig(), cfg["data"]["mean"], cfg["data"]["std"], cfg["num_classes"], device=dev)
    # the logits of the training loop's own evaluation, batch by batch, for the library metrics
    logits: list = []
    hook = model.register_forward_hook(lambda module, args, output: logits.append(output.detach().float().cpu()))
    try:
        r = evaluate(model, part.images.to(dev), part.labels.to(dev), prep, batch_size, dev, precision,
                     Distributed(), cfg["num_classes"], mf)
    finally:
        hook.remove()
    conf = r["confusion"]
    per_class = {c: 100.0 * float(conf[i, i]) / max(int(conf[i].sum()), 1) for i, c in enumerate(data.classes)}
    all_logits = torch.cat(logits) if logits else torch.zeros(0, cfg["num_classes"])
    out = dict(run=str(run_dir), model=cfg["model"], weights=weights, split=split, n=r["n"], accuracy=r["acc"],
               loss=r["loss"], **library_metrics(all_logits, part.labels), per_class_accuracy=per_class,
               classes=data.classes, confusion=conf.tolist())
    if return_predictions:
        out["predictions"] = all_logits.argmax(1).tolist()
    return out


def library_metrics(logits, labels) -> dict:
    """Top-5 accuracy and macro-F1 (in %) from torchmetrics; top-5 is None with 5 classes or fewer
    (every image's class is then among its top 5)."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    k = logits.shape[1]
    labels = labels.to(logits.device)
    top5 = (100.0 * float(multiclass_accuracy(logits, labels, num_classes=k, top_k=5, average="micro"))
            if k > 5 else None)
    f1 = 100.0 * float(multiclass_f1_score(logits, labels, num_classes=k, average="macro"))
    return dict(top5_accuracy=top5, macro_f1=f1)


def plot_confusion(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    conf = np.array(result["confusion"])
    k = len(result["classes"])
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.55 * k) if k <= 20 else (12, 11))
    im = ax.imshow(conf, cmap="Blues")
    fig.colorbar(im, ax=ax, label="images")
    if k <= 20:
        ax.set_xticks(range(k), result["classes"], rotation=45, ha="right")
        ax.set_yticks(range(k), result["classes"])
        for i in range(k):
            for j in range(k):
                ax.text(j, i, conf[i, j], ha="center", va="center", fontsize=7,
                        color="white" if conf[i, j] > conf.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true",
           title=f"{result['model']}: {result['split']} accuracy {result['accuracy']:.2f}% ({result['n']} images)")
    fig.tight_layout()
    from ..io import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def run(args) -> int:
    r = evaluate_run(args.checkpoint, args.weights, args.data, args.split, args.device, args.batch_size)
    if args.plot is not None:
        path = Path(args.plot) if args.plot else Path(args.checkpoint) / f"confusion_{args.split}.png"
        plot_confusion(r, path)
        r["plot"] = str(path)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    top5 = f", top-5 {r['top5_accuracy']:.2f}%" if r["top5_accuracy"] is not None else ""
    print(f"{r['model']} ({r['weights']} weights) on the {r['split']} split: accuracy {r['accuracy']:.2f}%{top5}, "
          f"macro-F1 {r['macro_f1']:.2f}% over {r['n']} images, loss {r['loss']:.4f}")
    for c, a in r["per_class_accuracy"].items():
        print(f"  {c:<14} {a:6.2f}%")
    if "plot" in r:
        print(f"confusion matrix: {r['plot']}")
    return 0
