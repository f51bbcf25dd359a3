"""`mixlab report`: one table (and plots) over a set of training runs.

A run is any folder ``mixlab train`` wrote (``config.yaml``, ``metrics.jsonl``,
``summary.json``); finished and partial runs alike, the partial ones marked. Every number
comes from the run's own files, except inference speed, which is measured on demand
(``measure_inference``, the same timing code as ``mixlab bench``) and kept in the run as
``bench_infer.json`` so that later reports show it without measuring again.
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from .profile import format_count
from ..errors import MissingFileError, UsageError

__all__ = ["RunRecord", "find_run_dirs", "load_run", "collect_runs", "measure_inference", "format_table",
           "write_table", "make_plots", "PLOT_FILES"]

_RUN_FILES = ("config.yaml", "summary.json", "metrics.jsonl")
BENCH_FILE = "bench_infer.json"
PLOT_FILES = {"params": "acc_vs_params.png", "macs": "acc_vs_macs.png", "wall": "acc_vs_wall.png",
              "curves": "val_curves.png"}
PLOT_SIZE = (8.0, 5.5)  # inches at PLOT_DPI: every plot is 800x550 pixels
PLOT_DPI = 100


@dataclass
class RunRecord:
    """What the report knows about one run directory."""

    run: str  # a short name: the folder's path below the folder it was found under
    run_dir: str
    model: str | None = None
    params: int | None = None
    macs: int | None = None
    img_size: int | None = None
    train_images_per_sec: float | None = None
    infer_images_per_sec: float | None = None
    infer_device: str | None = None
    best_val_acc: float | None = None
    best_epoch: int | None = None
    test_acc: float | None = None
    wall_seconds: float | None = None
    epochs_done: int = 0
    epochs: int | None = None
    finished: bool = False
    device: str | None = None
    precision: str | None = None
    channels_last: bool | None = None
    # the test set served as validation and chose the weights: the test accuracy is not held out
    selected_on_test: bool = False
    protocol: str | None = None
    val_curve: list = field(default_factory=list)  # [(epoch, val_acc or None), ...]

    @property
    def status(self) -> str:
        if self.finished:
            return "finished"
        return f"partial ({self.epochs_done}/{self.epochs if self.epochs is not None else '?'} epochs)"

    def row(self) -> dict:
        """The machine-readable row (CSV/JSON): raw numbers, no formatting."""
        d = asdict(self)
        d.pop("val_curve")
        d["status"] = "finished" if self.finished else "partial"
        return d


# ----------------------------------------------------------------------------- reading runs

def _is_run_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in _RUN_FILES)


def find_run_dirs(paths: Iterable[str | Path]) -> list[tuple[Path, Path]]:
    """(run_dir, the path it was found under) for every run under ``paths``, in path order.

    A path that is itself a run is taken as is; otherwise its subfolders are searched at any
    depth (not below a run: a run's own subfolders are not runs).
    """
    found: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for root in map(Path, paths):
        if not root.exists():
            raise MissingFileError(f"no such run directory or folder: {root}")
        if not root.is_dir():
            raise UsageError(f"{root} is a file; pass run directories or folders that hold them")
        stack = [root]
        hits = []
        while stack:
            d = stack.pop()
            if _is_run_dir(d):
                hits.append(d)
                continue
            stack.extend(sorted((c for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")), reverse=True))
        for d in sorted(hits):
            key = d.resolve()
            if key not in seen:
                seen.add(key)
                found.append((d, root))
    return found


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from None


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a crash: the epochs before it still count
    return rows


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    from ..train.rundir import read_config

    return read_config(path.parent)  # a broken or foreign config.yaml is refused, naming it


def _num(x, kind=float):
    return None if x is None else kind(x)


def load_run(run_dir: str | Path, root: str | Path | None = None) -> RunRecord:
    """Read one run directory; fields its files do not give stay None."""
    run_dir = Path(run_dir)
    if not _is_run_dir(run_dir):
        raise UsageError(f"{run_dir} is not a mixlab run directory (none of {', '.join(_RUN_FILES)})")
    summary = _read_json(run_dir / "summary.json") or {}
    config = _read_config(run_dir / "config.yaml")
    if config.get("task") == "segmentation":
        raise UsageError(f"{run_dir} is a segmentation run; `mixlab report` tabulates classification runs "
                         f"(see `mixlab seg eval --checkpoint {run_dir}`)")
    metrics = _read_metrics(run_dir / "metrics.jsonl")
    vals = [(int(r["epoch"]), r.get("val_acc")) for r in metrics if "epoch" in r]
    val_numbers = [(e, v) for e, v in vals if v is not None]
    name = run_dir.resolve().name
    if root is not None and run_dir.resolve() != Path(root).resolve():
        name = run_dir.resolve().relative_to(Path(root).resolve()).as_posix()
    rec = RunRecord(run=name, run_dir=str(run_dir))
    rec.model = summary.get("model") or config.get("model")
    rec.params = _num(summary.get("params"), int)
    rec.macs = _num(summary.get("macs"), int)
    rec.img_size = _num(config.get("img_size"), int)
    rec.epochs = _num(summary.get("epochs", config.get("epochs")), int)
    rec.epochs_done = int(summary.get("epochs_done", len(metrics)) or 0)
    rec.finished = bool(summary.get("finished", False))
    rec.test_acc = _num(summary.get("test_acc"))
    rec.device = summary.get("device")
    rec.precision = summary.get("precision")
    rec.channels_last = summary.get("channels_last")
    if "protocol" in summary:
        rec.protocol, rec.selected_on_test = summary["protocol"], bool(summary.get("selected_on_test"))
    elif config.get("data"):  # a run from before summaries named it: its config says as much
        from ..train.config import evaluation_protocol

        proto = evaluation_protocol(config)
        rec.protocol, rec.selected_on_test = proto.get("protocol"), bool(proto.get("selected_on_test"))
    if summary.get("best_val_acc") is not None:
        rec.best_val_acc = float(summary["best_val_acc"])
        rec.best_epoch = _num(summary.get("best_epoch"), int)
    elif val_numbers:  # no summary yet: the metrics say as much
        best = max(val_numbers, key=lambda ev: ev[1])
        rec.best_epoch, rec.best_val_acc = best[0], float(best[1])
    if summary.get("images_per_sec") is not None:
        rec.train_images_per_sec = float(summary["images_per_sec"])
    elif metrics and all(r.get("images_per_sec") is not None for r in metrics):
        rec.train_images_per_sec = sum(r["images_per_sec"] for r in metrics) / len(metrics)
    if summary.get("wall_seconds") is not None:
        rec.wall_seconds = float(summary["wall_seconds"])
    elif metrics and all(r.get("epoch_seconds") is not None for r in metrics):
        rec.wall_seconds = float(sum(r["epoch_seconds"] for r in metrics))
    rec.val_curve = vals
    bench = _read_json(run_dir / BENCH_FILE)
    if bench and bench.get("images_per_sec") is not None:
        rec.infer_images_per_sec = float(bench["images_per_sec"])
        rec.infer_device = bench.get("device")
    return rec


def collect_runs(paths: Iterable[str | Path] | str | Path) -> list[RunRecord]:
    """Every run under ``paths`` (folders or run directories), as :class:`RunRecord`."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    # segmentation runs (`mixlab seg train`) have no accuracy to tabulate: left out
    return [load_run(d, root) for d, root in find_run_dirs(paths)
            if _read_config(d / "config.yaml").get("task") != "segmentation"]


# ----------------------------------------------------------------------------- measuring

def measure_inference(rec: RunRecord, batch_size: int = 128, device: str | None = None,
                      precision: str | None = None, windows: int = 5, window_seconds: float = 1.0,
                      save: bool = True) -> float:
    """Inference images/s of the run's model, with ``mixlab bench``'s timing code.

    Device, precision and memory layout default to the run's own (from its summary); a CUDA
    run measured where no GPU is present is measured on the CPU, and ``infer_device`` says
    so. The weights do not change the speed, so a fresh model of the run's architecture is
    timed. Stores the result in ``RUN_DIR/bench_infer.json`` when ``save``.
    """
    import torch

    from ..train import rundir as rd
    from .bench import bench_model

    run_dir = Path(rec.run_dir)
    cfg = rd.read_config(run_dir)
    if rec.img_size is None or cfg.get("num_classes") is None:
        raise UsageError(f"{run_dir}: config.yaml lacks num_classes/img_size (the run never started): "
                         "nothing to measure")
    dev = device or rec.device or "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        dev = "cpu"
    prec = precision or rec.precision or "fp32"
    if prec not in ("fp32", "bf16", "fp16"):
        prec = "fp32"
    if dev == "cpu" and prec == "fp16":
        prec = "fp32"  # fp16 on CPU is an emulation, not the speed anyone would deploy
    from ..tasks import get_task

    model = get_task(cfg.get("task", "classification")).build_model({**cfg, "img_size": rec.img_size}, for_eval=True)
    res = bench_model(model, mode="infer", batch_size=batch_size, img_size=rec.img_size, device=dev,
                      precision=prec, channels_last=bool(rec.channels_last), windows=windows,
                      window_seconds=window_seconds)
    ips = float(res["images_per_sec_median"])
    rec.infer_images_per_sec, rec.infer_device = ips, dev
    if save:
        from ..io import atomic_write_json

        atomic_write_json(run_dir / BENCH_FILE, dict(
            images_per_sec=ips, device=dev, precision=prec, batch_size=batch_size, img_size=rec.img_size,
            channels_last=bool(rec.channels_last), windows=windows, torch=torch.__version__,
            threads=torch.get_num_threads(), measured_at=time.strftime("%Y-%m-%d %H:%M:%S")))
    return ips


# ----------------------------------------------------------------------------- the table

SORT_KEYS = {
    "name": lambda r: r.run,
    "test": lambda r: -(r.test_acc if r.test_acc is not None else -1.0),
    "val": lambda r: -(r.best_val_acc if r.best_val_acc is not None else -1.0),
    "params": lambda r: r.params if r.params is not None else math.inf,
    "macs": lambda r: r.macs if r.macs is not None else math.inf,
    "wall": lambda r: r.wall_seconds if r.wall_seconds is not None else math.inf,
}


def fmt_seconds(s: float | None) -> str:
    """3725 -> '1h02m05s'; 754 -> '12m34s'; 45.2 -> '45.2s'."""
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _md_rows(runs: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    show_run = any(r.run != r.model for r in runs)
    head = (["run"] if show_run else []) + [
        "model", "params", "MACs", "train img/s", "infer img/s", "best val acc % (epoch)", "test acc %",
        "wall time", "epochs", "status"]
    rows = []
    for r in runs:
        infer = _fmt(r.infer_images_per_sec, ".0f")
        if r.infer_images_per_sec is not None and r.infer_device and r.device and r.infer_device != r.device:
            infer += f" ({r.infer_device})"  # not measured on the run's own device
        best = "-" if r.best_val_acc is None else f"{r.best_val_acc:.2f}" + (
            f" ({r.best_epoch})" if r.best_epoch is not None else "")
        test = _fmt(r.test_acc, ".2f")
        if r.selected_on_test:
            best, test = best + " " + TEST_SELECTED_MARK, test + " " + TEST_SELECTED_MARK
        epochs = f"{r.epochs_done}/{r.epochs}" if r.epochs is not None else str(r.epochs_done)
        rows.append(([r.run] if show_run else []) + [
            r.model or "-", format_count(r.params), format_count(r.macs), _fmt(r.train_images_per_sec, ".0f"), infer,
            best, test, fmt_seconds(r.wall_seconds), epochs,
            "finished" if r.finished else "**partial**"])
    return head, rows


TEST_SELECTED_MARK = "(sel. on test)"
TEST_SELECTED_NOTE = ("the test set was this run's validation set and chose its weights (the seed's protocol): its "
                      "test accuracy is selected on the test set, not a held-out figure")


def format_table(runs: list[RunRecord], fmt: str = "md") -> str:
    """The report as a Markdown table, CSV or JSON (raw numbers in CSV/JSON)."""
    if fmt == "md":
        head, rows = _md_rows(runs)
        numeric = {i for i, h in enumerate(head) if h not in ("run", "model", "status")}
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]

        def line(cells):
            return "| " + " | ".join(c.rjust(w) if i in numeric else c.ljust(w)
                                     for i, (c, w) in enumerate(zip(cells, widths))) + " |"

        sep = "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else ("-" * (w + 2))
                             for i, w in enumerate(widths)) + "|"
        table = "\n".join([line(head), sep, *(line(r) for r in rows)])
        if any(r.selected_on_test for r in runs):
            table += f"\n\n{TEST_SELECTED_MARK} {TEST_SELECTED_NOTE}"
        return table
    if fmt == "csv":
        buf = io.StringIO()
        rows = [r.row() for r in runs]
        fields = list(RunRecord("", "").row())
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
        return buf.getvalue().rstrip("\n")
    if fmt == "json":
        return json.dumps([r.row() for r in runs], indent=2)
    raise UsageError(f"unknown report format {fmt!r}: md, csv or json")


def write_table(text: str, out: str | Path, fmt: str = "md", plots: Iterable[Path] = ()) -> None:
    """Write the table ``text`` to ``out`` (atomically); a Markdown table is followed by links
    to ``plots``, relative to ``out``'s folder."""
    import os

    from ..io import atomic_write_text

    out = Path(out)
    plots = list(plots)
    if fmt == "md" and plots:
        links = [f"![{p.stem.replace('_', ' ')}]({Path(os.path.relpath(p, out.parent)).as_posix()})" for p in plots]
        text += "\n\n" + "\n".join(links)
    atomic_write_text(out, text + "\n")


# ----------------------------------------------------------------------------- plots

def _accuracy_of(runs: list[RunRecord]) -> tuple[str, str]:
    """Test accuracy when every run has one, else best validation accuracy for all (one metric per plot)."""
    if runs and all(r.test_acc is not None for r in runs):
        return "test_acc", "test accuracy (%)"
    return "best_val_acc", "best validation accuracy (%)"


def _save(fig, path: Path) -> None:
    from ..io import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=PLOT_DPI, format="png")


def _scatter(plt, runs: list[RunRecord], xkey: str, xlabel: str, title: str, path: Path) -> bool:
    pts = [r for r in runs if getattr(r, xkey) is not None]
    ykey, ylabel = _accuracy_of(pts)
    pts = [r for r in pts if getattr(r, ykey) is not None and getattr(r, xkey) > 0]
    if not pts:
        return False
    xs = [float(getattr(r, xkey)) for r in pts]
    fig, ax = plt.subplots(figsize=PLOT_SIZE)
    for r, x in zip(pts, xs):
        y = getattr(r, ykey)
        ax.scatter([x], [y], s=50, facecolors="C0" if r.finished else "none", edgecolors="C0", zorder=3)
        label = (r.model or r.run) + ("" if r.finished else f" (partial, {r.epochs_done} ep)")
        if r.selected_on_test:
            label += " (selected on test)"
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if min(xs) > 0 and max(xs) / min(xs) >= 10:  # spans an order of magnitude: ratios matter, not differences
        ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    tick = fmt_seconds if xkey == "wall_seconds" else format_count
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: tick(v) if v > 0 else ""))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))
    if len(set(xs)) == 1:
        ax.set_xlim(xs[0] * 0.5, xs[0] * 1.5)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    ax.margins(x=0.15, y=0.1)
    if any(not r.finished for r in pts):
        ax.text(0.99, 0.01, "hollow: partial run", transform=ax.transAxes, ha="right", va="bottom", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def make_plots(runs: list[RunRecord], out_dir: str | Path) -> list[Path]:
    """Accuracy against params, MACs and wall time, and every validation curve on one chart.

    Writes the files of ``PLOT_FILES`` that have data (a plot with no point is skipped) and
    returns their paths. Each is ``PLOT_SIZE`` x ``PLOT_DPI`` pixels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, xlabel, title in (("params", "parameters", "accuracy vs parameters"),
                               ("macs", "MACs per image", "accuracy vs MACs"),
                               ("wall_seconds", "training wall time", "accuracy vs training time")):
        path = out_dir / PLOT_FILES[key.replace("_seconds", "")]
        if _scatter(plt, runs, key, xlabel, title, path):
            written.append(path)
    curves = [r for r in runs if any(v is not None for _, v in r.val_curve)]
    if curves:
        fig, ax = plt.subplots(figsize=PLOT_SIZE)
        for i, r in enumerate(curves):
            pts = [(e, v) for e, v in r.val_curve if v is not None]
            label = (r.model or r.run) + ("" if r.finished else " (partial)")
            if r.selected_on_test:
                label += " (val = test set)"
            ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", markersize=3, color=f"C{i % 10}",
                    linestyle="-" if r.finished else "--", label=label)
        ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="validation accuracy per epoch")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = out_dir / PLOT_FILES["curves"]
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    return written
