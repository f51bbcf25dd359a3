"""A run directory: what `mixlab train` writes, and reading it back.

    config.yaml        the full resolved configuration
    metrics.jsonl      one JSON line per finished epoch
    summary.json       the run's result so far (finished: false until the end)
    last.safetensors   model weights (with BatchNorm statistics) after the last finished epoch
    last_state.pt      optimizer, schedule, EMA, RNG states, epoch, best so far (tensors and
                       plain values only: read back with torch.load(weights_only=True))
    best.safetensors   the weights with the best validation accuracy
    curves.png         loss and accuracy per epoch

Every file is written atomically (temp file + rename), so a crash or a full disk while
saving leaves the previous checkpoint whole.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from ..io import atomic_save_safetensors, atomic_torch_save, atomic_write_json, atomic_write_text, read_state_dict

CONFIG, METRICS, SUMMARY = "config.yaml", "metrics.jsonl", "summary.json"
LAST, LAST_STATE, BEST, CURVES = "last.safetensors", "last_state.pt", "best.safetensors", "curves.png"


def read_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a mixlab run directory (no {CONFIG}); "
                                "pass the --out folder of a `mixlab train` run")
    return yaml.safe_load(path.read_text())


def write_config(run_dir: Path, cfg: dict) -> None:
    atomic_write_text(run_dir / CONFIG, yaml.safe_dump(cfg, sort_keys=False))


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    atomic_write_text(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in rows))


def read_summary(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


def write_summary(run_dir: Path, summary: dict) -> None:
    """Write summary.json; a classification run's summary also names its evaluation protocol
    (``protocol``, ``selected_on_test``; from its config.yaml, which is written first), so
    that no table shows a test accuracy selected on the test set without saying so."""
    if "protocol" not in summary and (Path(run_dir) / CONFIG).is_file():
        from .config import evaluation_protocol

        summary = {**summary, **evaluation_protocol(read_config(run_dir))}
    atomic_write_json(run_dir / SUMMARY, summary)


def save_weights(path: Path, model: torch.nn.Module, model_name: str, epoch: int | None = None) -> None:
    meta = {"model": model_name, "format": "mixlab"}
    if epoch is not None:
        meta["epoch"] = str(epoch)
    atomic_save_safetensors(model.state_dict(), path, metadata=meta)


def check_last_matches_state(run_dir: Path, state: dict) -> None:
    """Refuse to resume from last weights and a state file of different epochs (a crash
    between the two atomic writes), which would silently train one epoch twice."""
    from safetensors import safe_open

    with safe_open(str(Path(run_dir) / LAST), "pt") as f:
        saved = (f.metadata() or {}).get("epoch")
    if saved is not None and int(saved) != int(state["epoch"]):
        raise ValueError(f"{run_dir}: {LAST} holds the weights after epoch {saved} but {LAST_STATE} the state after "
                         f"epoch {state['epoch']} (the run stopped between the two writes), so resuming would train an epoch twice; start a new run "
                         f"(both weight files are intact and nothing was changed)")


def save_state(run_dir: Path, state: dict) -> None:
    atomic_torch_save(state, run_dir / LAST_STATE)


def load_state(run_dir: Path) -> dict:
    return torch.load(run_dir / LAST_STATE, map_location="cpu", weights_only=True)


def restore_checkpoint(run_dir: Path, model, optimizer, ema=None) -> dict:
    """Load a run's last checkpoint into ``model`` / ``optimizer`` / ``ema`` (in place).

    Returns what the training loop carries on with: ``epoch`` (epochs done), ``best_val``,
    ``best_epoch``, ``wall_seconds`` and the metrics ``rows`` of those epochs.
    """
    from ..checkpoint import load_weights

    state = load_state(run_dir)
    check_last_matches_state(run_dir, state)
    load_weights(model, read_state_dict(run_dir / LAST))
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None and "ema" in state:
        ema.module.load_state_dict(state["ema"])
    epoch = int(state["epoch"])
    return dict(epoch=epoch, best_val=float(state["best_val"]), best_epoch=int(state["best_epoch"]),
                wall_seconds=float(state.get("wall_seconds", 0.0)), rows=read_metrics(run_dir)[:epoch])


def open_run(run_dir: Path, cfg: dict, resume: bool, model, optimizer, ema, write: bool) -> dict:
    """Start a run directory (config, empty metrics) or restore its last checkpoint into the
    model / optimizer / EMA; returns the loop's starting point as :func:`restore_checkpoint`.
    Only the process with ``write`` (rank 0) writes files."""
    start = dict(epoch=0, best_val=-1.0, best_epoch=0, wall_seconds=0.0, rows=[])
    if resume:
        start = restore_checkpoint(run_dir, model, optimizer, ema)
        if write:
            print(f"resuming {run_dir} after epoch {start['epoch']}/{cfg['epochs']}")
    elif write:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_metrics(run_dir, [])
    if write:
        write_config(run_dir, cfg)  # on resume too: --epochs may have extended the run
    return start


def new_run_dir(out: str | None, model_name: str, command: str) -> Path:
    """``--out``, or runs/MODEL-YYYYMMDD-HHMMSS; refuses a folder that already holds a run."""
    import time

    path = Path(out) if out else Path("runs") / f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (path / CONFIG).exists():
        raise ValueError(f"{path} already holds a run; continue it with `{command} --resume {path}` "
                         "or choose another --out (nothing was overwritten)")
    return path


def save_checkpoint(run_dir: Path, model_name: str, model, optimizer, ema, rows: list[dict], best_val: float,
                    best_epoch: int, wall_seconds: float, best_model=None) -> None:
    """Write one finished epoch: best weights (when ``best_model`` is given), last weights, the
    metrics, then the state. Each write is atomic; the order keeps a crash between two of them
    resumable (the state, written last, never points past its weights or its metrics rows)."""
    epoch = rows[-1]["epoch"]
    if best_model is not None:
        save_weights(run_dir / BEST, best_model, model_name)
    save_weights(run_dir / LAST, model, model_name, epoch=epoch)
    state = dict(epoch=epoch, optimizer=optimizer.state_dict(), best_val=best_val, best_epoch=best_epoch,
                 wall_seconds=wall_seconds, rng_cpu=torch.get_rng_state())
    if ema is not None:
        state["ema"] = ema.module.state_dict()
    write_metrics(run_dir, rows)
    save_state(run_dir, state)


_COMMAND = {"classification": "mixlab train", "segmentation": "mixlab seg train"}


def resume_config(run_dir: str | Path, task: str, model: str | None = None, epochs: int | None = None,
                  data: str | None = None) -> dict | None:
    """The configuration to resume ``run_dir`` with, checked against the command's task and
    ``--model``; ``epochs`` may extend the run, ``data`` move its data root. None when the run
    has already finished its epochs (the caller prints its result)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    run_task = cfg.get("task", "classification")
    if run_task != task:
        raise ValueError(f"{run_dir} is a {run_task} run; resume it with `{_COMMAND[run_task]} --resume {run_dir}`")
    if model and model != cfg["model"]:
        raise ValueError(f"--model {model} does not match the run being resumed, which trains "
                         f"{cfg['model']} ({run_dir / CONFIG}); drop --model or start a new --out")
    if not (run_dir / LAST_STATE).is_file():
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet ({LAST_STATE}); start it again without --resume")
    if epochs:
        cfg["epochs"] = epochs  # extending a finished run is allowed
    summary = read_summary(run_dir) or {}
    if summary.get("finished") and summary.get("epochs_done", 0) >= cfg["epochs"]:
        return None
    if data:
        cfg["data"]["root"] = data
    return cfg


def weights_model_name(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("model")


def build_model_for(cfg: dict, num_classes: int, img_size: int | None = None):
    """The model a run's config describes (architecture only, fresh weights)."""
    from .. import create_model

    kwargs = dict(cfg.get("model_kwargs") or {})
    if cfg.get("drop_path_rate") is not None:
        kwargs["drop_path_rate"] = cfg["drop_path_rate"]
    return create_model(cfg["model"], num_classes=num_classes, img_size=img_size, **kwargs)


def load_run_model(run_dir: str | Path, which: str = "best"):
    """(model in eval mode with the run's weights, config). ``which``: best | last."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    if cfg.get("task") == "segmentation":
        raise ValueError(f"{run_dir} is a segmentation run: use `mixlab seg eval --checkpoint {run_dir}` or "
                         f"`mixlab seg predict --checkpoint {run_dir} ...`")
    path = run_dir / (BEST if which == "best" else LAST)
    if which == "best" and not path.is_file():
        path = run_dir / LAST  # runs without a validation split keep only the last weights
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no weights yet ({BEST} / {LAST}); has it finished an epoch?")
    stored = weights_model_name(path)
    if stored and stored != cfg["model"]:
        raise ValueError(f"{path} holds weights of {stored!r} but {run_dir / CONFIG} says model {cfg['model']!r}")
    model = build_model_for({**cfg, "drop_path_rate": None}, cfg["num_classes"], cfg.get("img_size"))
    from ..checkpoint import load_weights

    load_weights(model, read_state_dict(path))
    return model.eval(), cfg


ACCURACY_CURVES = (("train_acc", "train"), ("val_acc", "val"))


def plot_curves(run_dir: Path, rows: list[dict], title: str, score_curves=ACCURACY_CURVES,
                score_label: str = "accuracy (%)") -> None:
    """curves.png: loss and a score per epoch (accuracy by default), train and validation.

    ``score_curves``: (metrics.jsonl key, legend label) pairs for the right-hand plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        if any(r.get(key) is not None for r in rows):
            ax1.plot(epochs, [r.get(key) for r in rows], marker="o" if len(rows) <= 60 else None, label=label)
    marker = "o" if len(rows) <= 60 else None  # a 400-epoch run would be all markers
    for key, label in score_curves:
        if any(r.get(key) is not None for r in rows):
            ax2.plot(epochs, [r.get(key) for r in rows], marker=marker, label=label)
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.set(xlabel="epoch", ylabel=score_label, title=score_label.split(" (")[0])
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    from ..io import atomic_path

    with atomic_path(run_dir / CURVES, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
