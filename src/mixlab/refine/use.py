"""Using a trained refiner: score it before/after on a data set (:func:`evaluate_refine_run`)
and refine the masks of any images (:func:`apply_refine_run`)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .coarse import describe_missing, is_seg_run, load_coarse, mask_folder
from ..errors import UsageError, MissingFileError

__all__ = ["ImageSet", "read_images", "load_refine_run", "evaluate_refine_run", "apply_refine_run"]


@dataclass
class ImageSet:
    """Images without ground truth, read at one size (what :func:`load_coarse` needs)."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    names: list[str]
    image_paths: list[str]
    source: str
    native: list[tuple[int, int]] = field(default_factory=list)  # each file's (W, H)
    num_classes: int = 1

    def __len__(self) -> int:
        return len(self.names)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])


def read_images(path: str | os.PathLike, size: tuple[int, int] | None) -> list[ImageSet]:
    """The images of a folder (or of ``DIR/images``), resized to ``size`` as the data sets are
    read (PIL bilinear); without ``size``, one :class:`ImageSet` per distinct file size."""
    from ..seg.data import IMAGE_EXTS, _decode

    path = Path(path)
    folder = path / "images" if (path / "images").is_dir() else path
    if not folder.is_dir():
        raise MissingFileError(f"no such folder of images: {path}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise UsageError(f"no image files ({', '.join(IMAGE_EXTS)}) in {folder}")
    groups: dict[tuple[int, int], list] = {}
    for f in files:
        native, img = _decode(f, "RGB", size)
        groups.setdefault(img.shape[:2], []).append((f, native, torch.from_numpy(img).permute(2, 0, 1)))
    return [ImageSet(torch.stack([t for _, _, t in g]), [f.stem for f, _, _ in g], [str(f) for f, _, _ in g],
                     str(folder), [n for _, n, _ in g]) for g in groups.values()]


def load_refine_run(run_dir: str | Path, weights: str = "best"):
    """(refiner in eval mode, its config) of a `mixlab refine train` run."""
    from ..tasks import load_run_model

    return load_run_model(run_dir, weights, task="refine")


def _device_precision(device: str, cfg: dict):
    from ..train.distributed import Distributed
    from ..train.settings import pick_device, pick_precision

    dev = pick_device(device, Distributed())
    return dev, pick_precision(cfg.get("precision", "auto"), dev)


def evaluate_refine_run(run_dir, coarse_source, data, split_file=None, weights: str = "best", device: str = "auto",
                        batch_size: int | None = None) -> tuple[dict, dict]:
    """(figures before and after on the same images, arrays for pictures).

    The images: those named in ``split_file``; else, for a `mixlab seg train` run as the
    coarse source, that run's validation split (so the figures before refinement are those
    `mixlab seg eval --checkpoint RUN` prints); else every image of ``data`` with a coarse
    mask. Images without a coarse mask are skipped and listed. ``batch_size``: images per
    batch of the pooled IoU/Dice (default: the coarse run's, else the refine run's).
    """
    from ..data.classification import default_cache_dir
    from ..seg.data import load_segmentation_data, read_split_file
    from ..tasks.refine import evaluate_refiner, percent
    from ..tasks.segmentation import SPLIT_TRAIN, SPLIT_VAL, image_hw

    model, cfg = load_refine_run(run_dir, weights)
    ds = load_segmentation_data(data, size=image_hw(cfg.get("img_size")), cache_dir=default_cache_dir() / "seg")
    if ds.num_classes != 1:
        raise UsageError(f"{data} has {ds.num_classes} mask classes; refinement is scored on binary masks")
    from_run = is_seg_run(coarse_source)
    if split_file:
        names, split = read_split_file(split_file), f"the images listed in {split_file}"
    elif from_run and (Path(coarse_source) / SPLIT_VAL).is_file():
        names = read_split_file(Path(coarse_source) / SPLIT_VAL)
        split = f"the validation split of {coarse_source}"
    else:
        names, split = list(ds.names), f"all images of {data} with a coarse mask"
    unknown = [n for n in names if n not in set(ds.names)]
    if unknown:
        raise UsageError(f"{len(unknown)} image(s) to evaluate are not in {data}: {', '.join(unknown[:5])}")
    part = ds.subset(names)
    dev, precision = _device_precision(device, cfg)
    coarse = load_coarse(coarse_source, part, dev)
    if coarse.missing:
        part = part.subset(coarse.names)
    batch = int(batch_size or coarse.info.get("eval_batch_size") or cfg.get("eval_batch_size") or 8)
    result, refined = evaluate_refiner(model.to(dev), part.images, coarse.masks, part.masks, cfg, dev, precision,
                                       batch)
    trained_on = Path(run_dir) / SPLIT_TRAIN
    seen_refiner = sorted(set(read_split_file(trained_on)) & set(part.names)) if trained_on.is_file() else []
    seen_coarse = sorted(set(coarse.seen) & set(part.names))
    notes = []
    if coarse.missing:
        notes.append(describe_missing(coarse.missing, len(names), coarse.source))
    if seen_refiner:
        notes.append(f"{len(seen_refiner)} of the {len(part)} images are images the refiner trained on: "
                     "their figures are not held out")
    if seen_coarse:
        notes.append(f"{len(seen_coarse)} of the {len(part)} images are images the coarse model trained on")
    result = percent(result)
    result.update(run=str(run_dir), weights=weights, coarse=str(coarse_source), coarse_kind=coarse.kind,
                  data=str(data), split=split, autocast=precision, skipped_no_coarse=coarse.missing,
                  seen_by_refiner=len(seen_refiner), seen_by_coarse_model=len(seen_coarse), notes=notes)
    result["per_image"]["name"] = list(part.names)
    arrays = dict(names=list(part.names), images=part.images, truth=part.masks, coarse=coarse.masks,
                  refined=refined)
    return result, arrays


def apply_refine_run(run_dir, coarse_source, input_path, out_dir, weights: str = "best", device: str = "auto",
                     overlays: bool = True) -> dict:
    """Refine the coarse masks of the images in ``input_path``; write ``OUT/masks/0/<name>.png``
    at each image's own size (the refined mask at the run's working size, resized
    nearest-neighbour) and, with ``overlays``, ``OUT/overlays/<name>.png`` (coarse outline
    blue, refined red). Images without a coarse mask are skipped and listed."""
    from ..seg.predict import save_mask_png
    from ..tasks.refine import evaluate_refiner
    from ..tasks.segmentation import image_hw
    from .figures import outline_overlay

    model, cfg = load_refine_run(run_dir, weights)
    if not is_seg_run(coarse_source):
        mask_folder(coarse_source)  # a missing folder is named now, not taken for missing masks
    dev, precision = _device_precision(device, cfg)
    model = model.to(dev)
    out = Path(out_dir)
    written, missing, patches, seconds, n = [], [], 0, 0.0, 0
    for group in read_images(input_path, image_hw(cfg.get("img_size"))):
        try:
            coarse = load_coarse(coarse_source, group, dev)
        except FileNotFoundError:
            if is_seg_run(coarse_source):
                raise
            missing += group.names  # no mask for any image of this size group
            continue
        missing += coarse.missing
        keep = torch.tensor([group.names.index(x) for x in coarse.names], dtype=torch.long)
        r, refined = evaluate_refiner(model, group.images[keep], coarse.masks, None, cfg, dev, precision)
        patches += r["n_patches"]
        seconds += r["seconds_per_image"] * r["n_images"]
        n += r["n_images"]
        for j, i in enumerate(keep.tolist()):
            w, h = group.native[i]
            mask = refined[j:j + 1].float()
            if (h, w) != tuple(mask.shape[-2:]):
                mask = F.interpolate(mask, size=(h, w), mode="nearest")
            name = group.names[i]
            written.append(str(save_mask_png(mask[0, 0] > 0.5, out / "masks" / "0" / f"{name}.png")))
            if overlays:
                outline_overlay(group.images[i], coarse.masks[j, 0], refined[j, 0], out / "overlays" / f"{name}.png",
                                title=f"{name}: {r['per_image']['patches'][j]} patches")
    if not written:
        raise MissingFileError(f"no image of {input_path} has a coarse mask in {coarse_source} (nothing was written)")
    return dict(run=str(run_dir), coarse=str(coarse_source), input=str(input_path), out=str(out), images=n,
                masks=len(written), overlays=n if overlays else 0, patches=patches,
                seconds_per_image=seconds / max(n, 1), skipped_no_coarse=missing)
