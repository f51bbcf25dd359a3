"""The confusion matrix of an evaluation (:func:`mixlab.evaluate.evaluate_run`) as a PNG."""
from __future__ import annotations

from pathlib import Path

__all__ = ["plot_confusion"]


def plot_confusion(result: dict, path: Path) -> None:
    """Counts per (true, predicted) class, written in the cells when there are at most 20 classes."""
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
