"""Classify image files with a trained run: the run's own preprocessing, its class names, batched.

Each image is read as the training data was (``mixlab.data.classification``: RGB, resized with
Pillow's bilinear filter to the run's ``img_size`` when its size differs), normalised with the
run's ``data.mean`` / ``data.std``, and classified in batches at the precision ``mixlab eval``
uses for the run, so a file's top-1 class is the one ``mixlab eval`` counts for it.

Class names: a run directory keeps none of its own (config.yaml records the data set and its
root), so they are read from the data the run was trained on: the class folders of an image
tree's ``train/`` (sorted, as training numbered them) or the names in the CIFAR release.
Where that data is not found, the classes are numbered and the caller is told.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from .errors import UsageError, MissingFileError

__all__ = ["Prediction", "run_classes", "list_images", "predict_files", "write_predictions"]


@dataclass
class Prediction:
    file: str
    top: list[tuple[str, int, float]]  # (class name, class index, probability), best first


def run_classes(run_dir: str | os.PathLike, cfg: dict, say: Callable[[str], None] | None = print
                ) -> tuple[list[str], str]:
    """(class names in label order, where they came from) for a classification run."""
    from .data.classification import CIFAR_LAYOUTS, DataError, _read_pickle, locate
    from .train import rundir as rd

    k = int(cfg["num_classes"])
    stored = cfg.get("classes") or (rd.read_summary(run_dir) or {}).get("classes")
    if stored and len(stored) == k:
        return list(stored), "the run"
    data = cfg.get("data") or {}
    dataset = data.get("dataset", "cifar10")
    try:
        kind, path = locate(dataset, data.get("root"))
    except DataError:
        names = [str(i) for i in range(k)]
        how = (f"numbered 0-{k - 1}: the run stores no class names and its data ({dataset} at "
               f"{data.get('root') or 'the default data roots'}) was not found")
        if say is not None:
            say(f"note: classes {how}")
        return names, how
    if kind == "folder":
        names = sorted(d.name for d in (path / "train").iterdir() if d.is_dir())
    else:
        meta = _read_pickle(path / ("batches.meta" if path.name == CIFAR_LAYOUTS["cifar10"] else "meta"))
        key = b"label_names" if b"label_names" in meta else b"fine_label_names"
        names = [c.decode() for c in meta[key]]
    if len(names) != k:
        raise UsageError(f"the run was trained on {k} classes but its data at {path} now has {len(names)}; "
                         "its class names cannot be told")
    how = f"read from the run's data ({path})"
    if say is not None:
        say(f"classes {how}")
    return names, how


def list_images(path: str | os.PathLike) -> list[Path]:
    """One image file, or every image file under a folder (recursively, sorted)."""
    from .data.classification import IMAGE_EXTENSIONS

    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MissingFileError(f"--input {path} is neither an image file nor a folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise MissingFileError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {path}")
    return files


def _read(path: Path, size: int) -> torch.Tensor:
    from .data.classification import _decode

    arr = _decode(path, size)
    if isinstance(arr, str):
        raise UsageError(arr + "; remove it from --input or convert it")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # Pillow's array is read-only


def predict_files(run_dir: str | os.PathLike, files: list[Path], *, top_k: int = 5, weights: str = "best",
                  batch_size: int = 64, device: str = "auto", precision: str | None = None,
                  say: Callable[[str], None] | None = print) -> tuple[list[Prediction], dict]:
    """Classify ``files`` with the run's weights; returns (predictions, info) where info holds
    the run's model, classes, how they were found, img_size, mean, std, precision."""
    from .data.augment import AugmentConfig, BatchAugment
    from .train.distributed import Distributed
    from .tasks import load_run_model
    from .train.step import autocast
    from .train.settings import pick_channels_last, pick_device, pick_precision

    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    model, cfg = load_run_model(run_dir, weights)
    classes, how = run_classes(run_dir, cfg, say)
    k = min(top_k, len(classes))
    size = int(cfg["img_size"])
    dev = pick_device(device, Distributed())
    # the precision `mixlab eval` evaluates the run at, unless asked otherwise
    prec = pick_precision(precision or cfg.get("precision", "auto"), dev)
    # and its memory layout (in bf16 a channels_last conv may round differently)
    mf = torch.channels_last if pick_channels_last(cfg.get("channels_last", "auto"), model) else torch.contiguous_format
    model = model.to(dev, memory_format=mf)
    prep = BatchAugment(AugmentConfig(), cfg["data"]["mean"], cfg["data"]["std"], len(classes), device=dev)
    out: list[Prediction] = []
    with torch.no_grad():
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            x = torch.stack([_read(p, size) for p in chunk]).to(dev)
            x, _ = prep(x, torch.zeros(len(chunk), dtype=torch.int64, device=dev), train=False, memory_format=mf)
            with autocast(dev, prec):
                logits = model(x)
            probs = logits.float().softmax(1).cpu()
            p, idx = probs.topk(k, dim=1)
            for f, pr, ix in zip(chunk, p.tolist(), idx.tolist()):
                out.append(Prediction(str(f), [(classes[i], i, v) for i, v in zip(ix, pr)]))
    info = dict(run=str(run_dir), model=cfg["model"], weights=weights, classes=classes, classes_from=how,
                img_size=size, mean=list(cfg["data"]["mean"]), std=list(cfg["data"]["std"]), precision=prec,
                top_k=k)
    return out, info


def write_predictions(preds: list[Prediction], info: dict, path: str | os.PathLike) -> Path:
    """Write ``preds`` as CSV (one row per file: ``file, class_1, prob_1, ..., class_k, prob_k``)
    or JSON (``{"run", "model", ..., "predictions": [{"file", "top": [{"class", "index",
    "prob"}]}]}``), chosen by the suffix; atomically."""
    from .io import atomic_write_json, atomic_write_text

    path = Path(path)
    k = info["top_k"]
    if path.suffix.lower() == ".json":
        atomic_write_json(path, dict(info, predictions=[
            dict(file=p.file, top=[dict(**{"class": c}, index=i, prob=v) for c, i, v in p.top]) for p in preds]))
    elif path.suffix.lower() == ".csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file"] + [f"{col}_{r}" for r in range(1, k + 1) for col in ("class", "prob")])
        for p in preds:
            w.writerow([p.file] + [x for c, _, v in p.top for x in (c, f"{v:.6f}")])
        atomic_write_text(path, buf.getvalue())
    else:
        raise UsageError(f"--out must end in .csv or .json, got {path.name}")
    return path
