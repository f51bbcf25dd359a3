"""curves.png of a run: loss and a score per epoch, training and validation."""
from __future__ import annotations

from pathlib import Path


def plot_curves(path: str | Path, rows: list[dict], title: str,
                score_curves=(("train_acc", "train"), ("val_acc", "val")), score_label: str = "accuracy (%)") -> None:
    """Draw the metrics ``rows`` (metrics.jsonl) into a PNG at ``path``: loss on the left,
    ``score_curves`` ((metrics key, legend label) pairs) on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    marker = "o" if len(rows) <= 60 else None  # a 400-epoch run would be all markers
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        for key, label in (("train_loss", "train"), ("val_loss", "val")):
            if any(r.get(key) is not None for r in rows):
                ax1.plot(epochs, [r.get(key) for r in rows], marker=marker, label=label)
        for key, label in score_curves:
            if any(r.get(key) is not None for r in rows):
                ax2.plot(epochs, [r.get(key) for r in rows], marker=marker, label=label)
        ax1.set(xlabel="epoch", ylabel="loss", title="loss")
        ax2.set(xlabel="epoch", ylabel=score_label, title=score_label.split(" (")[0])
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend()
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100, format="png")
    finally:
        plt.close(fig)
