"""Where coarse masks come from: a folder of mask PNGs, a `mixlab seg train` run that predicts
them, or out-of-fold predictions made for training a refiner.

A folder is read in any of these layouts (the first that exists): ``DIR/masks/0/<name>.png``
(what `mixlab seg predict` writes), ``DIR/masks/<name>.png``, ``DIR/<name>.png``; a mask
matches the image with the same name (any image extension). Where an image has no such file
but instance masks ``<name>_<j>.png`` (j = 0, 1, ...: one file per detected object, as an
instance segmenter's prediction folder holds them), its coarse mask is their union: the
refinement is of one binary mask per image.

Rules, the same for training, evaluation and application:

* images without a coarse mask are **skipped and listed** (a folder of masks for part of a
  data set, e.g. out-of-fold masks of the training split only, is normal);
* a mask whose file size (W x H) differs from its image's is **refused**, naming the file:
  masks must be at the image's own size, as `mixlab seg predict` writes them (they are
  resized with the image, nearest-neighbour, when the data is read at another size);
* an empty mask has no boundary, hence no patches: it passes through unchanged.

Memorised masks: a segmenter's masks of the images it was trained on are far better than its
masks of new images (UNeXt on BUSI: training IoU 92, validation 67), so a refiner trained on
them learns to change little. :class:`CoarseMasks.seen` lists the images the coarse model
trained on when that is known (a seg run's ``split_train.txt``); `mixlab refine train`
refuses to train on those. :func:`out_of_fold_coarse` makes masks a model did not train on
for every training image: K segmenters, each trained without one fold, each predicting its
fold.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..io import atomic_write_json
from ..errors import UsageError, MissingFileError

__all__ = ["COARSE_INFO", "CoarseMasks", "mask_folder", "is_seg_run", "load_coarse", "fold_names",
           "out_of_fold_coarse"]

COARSE_INFO = "coarse.json"  # written beside out-of-fold masks: how they were made


@dataclass
class CoarseMasks:
    """Coarse masks of the images that have one, in the data set's order."""

    masks: torch.Tensor  # (M, 1, H, W) uint8 0/1
    names: list[str]
    missing: list[str]
    source: str
    kind: str  # "folder" | "seg_run"
    seen: list[str] = field(default_factory=list)  # images the coarse model trained on, where known
    info: dict = field(default_factory=dict)  # the folder's coarse.json, if any


def describe_missing(missing: list[str], total: int, source: str) -> str:
    shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
    return f"{len(missing)} of {total} images have no coarse mask in {source} and are skipped: {shown}"


def mask_folder(path: str | Path) -> Path:
    """The folder holding the mask files of a coarse-mask folder (see the module notes)."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"coarse masks not found: {path} is not a folder (pass a `mixlab seg predict` "
                                "--out folder, a folder of mask PNGs, or a `mixlab seg train` run directory)")
    for candidate in (path / "masks" / "0", path / "masks"):
        if candidate.is_dir():
            return candidate
    return path


def is_seg_run(path: str | Path) -> bool:
    """Whether ``path`` is a `mixlab seg train` run directory (it predicts coarse masks)."""
    from ..train import rundir as rd

    p = Path(path)
    if not (p / rd.CONFIG).is_file():
        return False
    task = rd.read_config(p).get("task", "classification")
    if task != "segmentation":
        raise UsageError(f"{p} is a {task} run: coarse masks come from a `mixlab seg train` run or a folder of "
                         "mask PNGs")
    return True


def _index_masks(folder: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """({name: mask file}, {name: instance mask files ``<name>_<j>.png``})."""
    from ..seg.data import IMAGE_EXTS

    found: dict[str, Path] = {}
    instances: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            found.setdefault(p.stem, p)
            base, _, j = p.stem.rpartition("_")
            if base and j.isdigit():
                instances.setdefault(base, []).append(p)
    return found, instances


def _read_folder(source: Path, ds, size: tuple[int, int]) -> CoarseMasks:
    from ..seg.data import _decode

    folder = mask_folder(source)
    files, instances = _index_masks(folder)
    names, missing, masks = [], [], []
    for i, name in enumerate(ds.names):
        paths = [files[name]] if name in files else instances.get(name, [])
        if not paths:
            missing.append(name)
            continue
        union = None
        for path in paths:
            native, m = _decode(path, "mask", size)
            if ds.image_paths:
                with Image.open(ds.image_paths[i]) as im:
                    image_native = im.size
                if native != image_native:
                    raise UsageError(f"coarse mask {path} is {native[0]}x{native[1]} (WxH) but its image "
                                     f"{ds.image_paths[i]} is {image_native[0]}x{image_native[1]}: coarse masks must "
                                     "be at the image's own size (as `mixlab seg predict` writes them)")
            union = m if union is None else union | m
        names.append(name)
        masks.append(torch.from_numpy(union)[None])
    if not names:
        raise MissingFileError(f"none of the {len(ds.names)} images of {ds.source} has a coarse mask in {folder} "
                                "(masks are matched to images by file name)")
    info_path = Path(source) / COARSE_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return CoarseMasks(torch.stack(masks), names, missing, str(source), "folder", [], info)


@torch.no_grad()
def _predict_with_run(run: Path, ds, device: torch.device) -> CoarseMasks:
    from ..seg.data import read_split_file
    from ..seg.predict import predict_images
    from ..tasks import load_run_model
    from ..tasks.segmentation import image_hw, seg_normalizer
    from ..train.settings import pick_channels_last, pick_precision
    from ..train.step import autocast

    model, cfg = load_run_model(run, "best", task="segmentation")
    if int(cfg["num_classes"]) != 1:
        raise UsageError(f"{run} predicts {cfg['num_classes']} mask classes; refinement works on binary masks")
    # the device, precision and memory format `mixlab seg eval` picks, so its figures are matched
    mf = torch.channels_last if pick_channels_last(cfg.get("channels_last", "auto"), model) else torch.contiguous_format
    model = model.to(device, memory_format=mf)
    threshold = float(cfg.get("threshold", 0.5))
    batch = int(cfg.get("eval_batch_size") or cfg["batch_size"])
    if image_hw(cfg.get("img_size")) in (None, ds.image_size):
        # the data's own tensors at the run's size: exactly what `mixlab seg eval` scores
        norm, precision = seg_normalizer(cfg, device), pick_precision(cfg.get("precision", "auto"), device)
        out = []
        for start in range(0, len(ds), batch):
            x = norm(ds.images[start:start + batch].to(device).float().div_(255.0)).contiguous(memory_format=mf)
            with autocast(device, precision):
                logits = model(x)
            out.append((torch.sigmoid(logits.float()) > threshold).to(torch.uint8).cpu())
        masks = torch.cat(out)
    else:
        probs = predict_images(model, ds.images, size=image_hw(cfg["img_size"]), batch_size=batch,
                               mean=cfg["data"]["mean"], std=cfg["data"]["std"], device=device)
        masks = torch.stack([(p > threshold).to(torch.uint8) for p in probs])
    seen_file = run / "split_train.txt"
    seen = sorted(set(read_split_file(seen_file)) & set(ds.names)) if seen_file.is_file() else list(ds.names)
    return CoarseMasks(masks, list(ds.names), [], str(run), "seg_run", seen,
                       dict(kind="seg_run", model=cfg["model"], threshold=threshold, eval_batch_size=batch))


def load_coarse(source: str | Path, ds, device: torch.device | str = "cpu") -> CoarseMasks:
    """Coarse masks for the images of ``ds`` at its size: read from a folder or predicted by a
    `mixlab seg train` run. ``ds``: a :class:`~mixlab.seg.data.SegDataset` with one mask
    class, or anything with its ``names``, ``images``, ``image_paths``, ``image_size``,
    ``source`` and ``num_classes``."""
    if not source:
        raise UsageError("no coarse masks given: pass --coarse DIR (a `mixlab seg predict` --out folder or any "
                         "folder of mask PNGs named like the images) or --coarse RUN (a `mixlab seg train` run)")
    if ds.num_classes != 1:
        raise UsageError(f"{ds.source} has {ds.num_classes} mask classes; boundary refinement works on binary "
                         "masks (masks/0 only)")
    source = Path(source)
    if is_seg_run(source):
        return _predict_with_run(source, ds, torch.device(device))
    return _read_folder(source, ds, ds.image_size)


# ----------------------------------------------------------------------------- out of fold

def fold_names(names: list[str], folds: int, seed: int) -> list[list[str]]:
    """``names`` dealt into ``folds`` folds by a seeded permutation, each sorted."""
    if int(folds) < 2:
        raise UsageError(f"out-of-fold masks need at least 2 folds, got {folds}")
    if len(names) < folds:
        raise UsageError(f"{len(names)} images cannot be dealt into {folds} folds")
    order = sorted(names)
    perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(int(seed))).tolist()
    return [sorted(order[i] for i in perm[k::folds]) for k in range(folds)]


def out_of_fold_coarse(seg_cfg: dict, names: list[str], folds: int, out_dir: str | Path, device: str = "auto",
                       say=print) -> dict:
    """Write a coarse mask of every image in ``names`` that a model did not train on.

    ``names`` are dealt into ``folds`` folds; for each fold k a segmenter configured by
    ``seg_cfg`` (a resolved `mixlab seg train` configuration) trains on the other folds'
    images into ``OUT/fold<k>`` (monitored on fold k, its last weights kept: nothing is
    selected on the images it then predicts) and writes its masks of fold k to
    ``OUT/masks/0/<name>.png`` at each image's own size, as `mixlab seg predict` does.
    ``OUT/coarse.json`` records how. Running it again continues: finished folds are kept,
    a stopped fold resumes from its last checkpoint.
    """
    from ..seg.data import write_split_file
    from ..seg.predict import predict_images, read_predict_inputs, save_mask_png
    from ..tasks import load_run_model
    from ..tasks.segmentation import image_hw
    from ..train import rundir as rd
    from ..train import run_training
    from ..train.distributed import Distributed
    from ..train.settings import pick_device

    out = Path(out_dir)
    plan_path = out / COARSE_INFO
    groups = fold_names(names, folds, int(seg_cfg["seed"]))
    if plan_path.is_file():
        before = json.loads(plan_path.read_text())
        if before.get("folds") != [list(g) for g in groups]:
            raise UsageError(f"{out} holds out-of-fold masks of other images or folds ({plan_path}); "
                             "choose another --out (nothing was changed)")
    plan = dict(kind="out_of_fold", data=str(seg_cfg["data"]["root"]), model=seg_cfg["model"],
                epochs=int(seg_cfg["epochs"]), folds=[list(g) for g in groups], finished=False)
    atomic_write_json(plan_path, plan)
    root = Path(seg_cfg["data"]["root"])
    images_dir = root / "images"
    dev = pick_device(device, Distributed())
    for k, held_out in enumerate(groups):
        fold_dir = out / f"fold{k}"
        train_file, val_file = out / "splits" / f"fold{k}_train.txt", out / "splits" / f"fold{k}_val.txt"
        write_split_file(train_file, [n for g in groups[:k] + groups[k + 1:] for n in g])
        write_split_file(val_file, held_out)
        summary = rd.read_summary(fold_dir) if (fold_dir / rd.SUMMARY).is_file() else None
        if summary and summary.get("finished"):
            say(f"fold {k + 1}/{folds}: trained already ({fold_dir})")
        elif rd.has_checkpoint(fold_dir):
            say(f"fold {k + 1}/{folds}: resuming {fold_dir}")
            run_training(rd.resume_config(fold_dir, "segmentation"), fold_dir, resume=True)
        else:
            cfg = copy.deepcopy(seg_cfg)
            cfg["data"].update(train_split_file=str(train_file), val_split_file=str(val_file))
            cfg["select"] = "last"  # no choice made on the images this fold predicts
            say(f"fold {k + 1}/{folds}: training {cfg['model']} on {len(names) - len(held_out)} images, "
                f"predicting {len(held_out)}")
            run_training(cfg, fold_dir)
        model, cfg = load_run_model(fold_dir, "last", task="segmentation")
        files = [images_dir / n for n in _image_files(images_dir, held_out)]
        threshold = float(cfg.get("threshold", 0.5))
        for f in files:
            _, (img,), _ = read_predict_inputs(f)
            (prob,) = predict_images(model.to(dev), [img], size=image_hw(cfg["img_size"]), batch_size=1,
                                     mean=cfg["data"]["mean"], std=cfg["data"]["std"], device=dev)
            save_mask_png(prob[0] > threshold, out / "masks" / "0" / f"{f.stem}.png")
    plan["finished"] = True
    atomic_write_json(plan_path, plan)
    return plan


def _image_files(images_dir: Path, names: list[str]) -> list[str]:
    from ..seg.data import IMAGE_EXTS

    by_stem = {p.stem: p.name for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTS}
    missing = [n for n in names if n not in by_stem]
    if missing:
        raise MissingFileError(f"images not found in {images_dir}: {', '.join(missing[:5])}")
    return [by_stem[n] for n in names]
