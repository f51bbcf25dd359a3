"""Instance segmentation data: COCO-format folders and mask folders, held decoded in memory.

Layouts read (:func:`load_det_folder` tells them apart):

* COCO format, the format annotation tools export::

      ROOT/annotations.json      # images, annotations (polygons or RLE), categories
      ROOT/images/<file_name>    # (or ROOT/<file_name>)

  ``iscrowd`` regions are not trained on; they stay in the ground truth that COCOeval reads,
  which ignores detections matching them.

* a mask folder in ``mixlab seg``'s layouts (``images/`` + ``masks/0/`` ..., e.g. BUSI, or
  ``images/`` + ``masks/``): the instances of an image are the connected components of each
  class mask (8-connected by default). Components smaller than ``min_area`` pixels are not
  trained on or scored as instances (they stay in the semantic mask the union IoU is measured
  against). **Touching lesions become one instance**: a binary mask has no boundary between
  two regions that touch (share an edge, or with 8-connectivity a corner), so they are one
  component; only a COCO file (or instance-labelled masks) can keep them apart.

An image with no instance is allowed (Mask R-CNN trains on it as background) and counted.
Images keep their own size (the detector's transform resizes); boxes are (x1, y1, x2, y2) in
pixel-edge coordinates, COCO's convention (a one-pixel object at column 3 spans x 3..4).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from ..errors import MissingFileError, UsageError

__all__ = ["DetDataset", "read_coco_folder", "read_mask_folder", "load_det_folder", "instances_from_mask",
           "boxes_from_masks", "encode_mask", "COCO_FILE"]

COCO_FILE = "annotations.json"


@dataclass
class DetDataset:
    """Decoded images with their instances, and the COCO ground truth COCOeval scores against.

    ``targets[i]``: ``boxes`` float32 (N, 4), ``labels`` int64 (N,) in 1..K (0 is the
    background), ``masks`` uint8 (N, H, W). ``annotations[i]``: the image's COCO annotations
    (crowd regions included). ``semantic[i]``: the (K, H, W) class masks the union of predicted
    instances is compared with (a mask folder's own masks), or None: the union of the
    image's instance masks.
    """

    images: list[torch.Tensor]  # uint8 (3, H, W)
    targets: list[dict]
    names: list[str]
    image_ids: list[int]
    annotations: list[list[dict]]
    categories: list[dict]  # COCO categories; label k <-> categories[k - 1]
    semantic: list[torch.Tensor] | None = None
    source: str = ""
    notes: dict = field(default_factory=dict)  # counts the reader reports (dropped components, ...)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def num_instances(self) -> int:
        return sum(len(t["labels"]) for t in self.targets)

    @property
    def empty_images(self) -> int:
        return sum(len(t["labels"]) == 0 for t in self.targets)

    def subset(self, names: Sequence[str]) -> "DetDataset":
        """The images named in ``names`` (in that order); image ids are kept."""
        index = {n: i for i, n in enumerate(self.names)}
        unknown = [n for n in names if n not in index]
        if unknown:
            raise KeyError(f"{len(unknown)} name(s) not in the data set {self.source}: "
                           f"{', '.join(map(repr, unknown[:5]))}")
        idx = [index[n] for n in names]
        pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
        return DetDataset(pick(self.images), pick(self.targets), pick(self.names), pick(self.image_ids),
                          pick(self.annotations), self.categories, pick(self.semantic) if self.semantic else None,
                          self.source, dict(self.notes))

    def to(self, device) -> "DetDataset":
        """The same data with images and targets on ``device`` (annotations stay plain)."""
        images = [im.to(device) for im in self.images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in self.targets]
        return DetDataset(images, targets, self.names, self.image_ids, self.annotations, self.categories,
                          self.semantic, self.source, self.notes)


# ---------------------------------------------------------------------------------------------
# masks, boxes, RLE

def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, 4) float32 boxes (x1, y1, x2, y2), pixel edges, of (N, H, W) non-empty masks."""
    if masks.shape[0] == 0:
        return torch.zeros(0, 4)
    masks = masks.bool()
    rows, cols = masks.any(2), masks.any(1)
    h, w = masks.shape[-2:]
    ar_h, ar_w = torch.arange(h), torch.arange(w)
    y1 = torch.where(rows, ar_h, h).min(1).values
    y2 = torch.where(rows, ar_h, -1).max(1).values + 1
    x1 = torch.where(cols, ar_w, w).min(1).values
    x2 = torch.where(cols, ar_w, -1).max(1).values + 1
    return torch.stack([x1, y1, x2, y2], 1).float()


def encode_mask(mask: np.ndarray | torch.Tensor) -> dict:
    """COCO's compressed RLE of one (H, W) mask, with a str ``counts`` (JSON-writable)."""
    from pycocotools import mask as mask_utils

    m = mask.numpy() if isinstance(mask, torch.Tensor) else mask
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def instances_from_mask(mask: np.ndarray, min_area: int = 0, connectivity: int = 8) -> tuple[list[np.ndarray], int]:
    """(instance masks, number dropped): the connected components of a binary (H, W) mask with at
    least ``min_area`` pixels, largest first (scipy.ndimage.label)."""
    from scipy import ndimage

    if connectivity not in (4, 8):
        raise UsageError(f"connectivity must be 4 or 8, got {connectivity}")
    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    labelled, n = ndimage.label(mask.astype(bool), structure=structure)
    if n == 0:
        return [], 0
    areas = np.bincount(labelled.ravel(), minlength=n + 1)[1:]
    keep = [k + 1 for k in np.argsort(-areas, kind="stable") if areas[k] >= min_area]
    return [labelled == k for k in keep], int(n - len(keep))


def _target(masks: list[np.ndarray], labels: list[int], h: int, w: int, boxes=None) -> dict:
    m = torch.from_numpy(np.stack(masks).astype(np.uint8)) if masks else torch.zeros(0, h, w, dtype=torch.uint8)
    b = torch.as_tensor(np.asarray(boxes, np.float32)).reshape(-1, 4) if boxes is not None else boxes_from_masks(m)
    return dict(boxes=b, labels=torch.tensor(labels, dtype=torch.int64), masks=m)


def _annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray, box: torch.Tensor) -> dict:
    x1, y1, x2, y2 = (float(v) for v in box)
    return dict(id=ann_id, image_id=image_id, category_id=category_id, segmentation=encode_mask(mask),
                area=float(mask.sum()), bbox=[x1, y1, x2 - x1, y2 - y1], iscrowd=0)


# ---------------------------------------------------------------------------------------------
# mask folders (mixlab seg's layouts)

def read_mask_folder(root: str | os.PathLike, size: tuple[int, int] | None = None, min_area: int = 0,
                     connectivity: int = 8, cache_dir: str | os.PathLike | None = None) -> DetDataset:
    """A ``mixlab seg`` data folder (see :func:`mixlab.seg.data.load_segmentation_data`) as
    instances: each class mask's connected components (see the module docstring). Names are
    the image stems, image ids 1..N in name order (the order ``mixlab seg`` reads)."""
    from ..seg.data import load_segmentation_data

    try:
        seg = load_segmentation_data(root, size=size, cache_dir=cache_dir)
    except ValueError as e:
        if "share one size" in str(e):
            raise UsageError(f"{e}; for `mixlab det`: --set data.resize=[H,W]") from None
        raise
    k = seg.num_classes
    targets, annotations, dropped, ann_id = [], [], 0, 0
    for i in range(len(seg)):
        masks, labels = [], []
        for c in range(k):
            found, lost = instances_from_mask(seg.masks[i, c].numpy(), min_area, connectivity)
            masks += found
            labels += [c + 1] * len(found)
            dropped += lost
        h, w = seg.image_size
        t = _target(masks, labels, h, w)
        anns = []
        for m, lab, box in zip(masks, labels, t["boxes"]):
            ann_id += 1
            anns.append(_annotation(ann_id, i + 1, lab, m, box))
        targets.append(t)
        annotations.append(anns)
    categories = [dict(id=c + 1, name=f"class{c}" if k > 1 else "object") for c in range(k)]
    return DetDataset(list(seg.images.unbind(0)), targets, list(seg.names), list(range(1, len(seg) + 1)),
                      annotations, categories, list(seg.masks.unbind(0)), str(root),
                      dict(dropped_components=dropped, min_area=min_area, connectivity=connectivity, layout="masks"))


# ---------------------------------------------------------------------------------------------
# COCO folders

def _decode_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UsageError(f"cannot read image file {path}: {type(e).__name__}: {e}") from None


def _ann_rle(ann: dict, h: int, w: int, where: str):
    from pycocotools import mask as mask_utils

    seg = ann.get("segmentation")
    if isinstance(seg, list) and seg:  # polygons: [[x1, y1, x2, y2, ...], ...]
        if not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg):
            raise UsageError(f"{where}: polygons must be lists of at least 3 (x, y) points")
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [h, w]:
            raise UsageError(f"{where}: its mask is {seg['size'][0]}x{seg['size'][1]} (HxW) but the image is {h}x{w}")
        if isinstance(seg["counts"], list):  # uncompressed RLE
            return mask_utils.frPyObjects(seg, h, w)
        counts = seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]
        return dict(size=seg["size"], counts=counts)
    raise UsageError(f"{where} has no segmentation (polygons or RLE): Mask R-CNN trains on instance masks")


def read_coco_folder(root: str | os.PathLike, annotations: str | os.PathLike | None = None) -> DetDataset:
    """``ROOT/annotations.json`` with its images under ``ROOT/images/`` (or ``ROOT/``).

    Checked: every image the file names exists and has the size it states; every annotation
    names a listed image and category and has a mask of its image's size. Labels 1..K follow
    the categories' ids in ascending order. Names are the file names without their extension.
    """
    from pycocotools import mask as mask_utils

    root = Path(root)
    path = Path(annotations) if annotations else root / COCO_FILE
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingFileError(f"annotations file not found: {path}") from None
    except ValueError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(spec.get(key), list):
            raise UsageError(f"{path} has no {key!r} list: not a COCO instances file")
    if not spec["categories"]:
        raise UsageError(f"{path} lists no categories")
    images = sorted(spec["images"], key=lambda im: im["file_name"])
    files, missing = [], []
    for im in images:
        cands = [root / "images" / im["file_name"], root / im["file_name"]]
        found = next((c for c in cands if c.is_file()), None)
        files.append(found)
        if found is None:
            missing.append(im["file_name"])
    if missing:
        raise MissingFileError(f"{path} names {len(missing)} image(s) not found under {root / 'images'}: "
                                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (fix their file_name "
                                "or add the files)")
    cats = sorted(spec["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i + 1 for i, c in enumerate(cats)}
    ids = {im["id"] for im in images}
    by_image: dict[int, list[dict]] = {i: [] for i in ids}
    for ann in spec["annotations"]:
        if ann.get("image_id") not in ids:
            raise UsageError(f"{path}: annotation {ann.get('id')} names image_id {ann.get('image_id')}, which is not "
                             "in its images list")
        if ann.get("category_id") not in label_of:
            raise UsageError(f"{path}: annotation {ann.get('id')} names category_id {ann.get('category_id')}, which is "
                             "not in its categories list")
        by_image[ann["image_id"]].append(ann)
    out_images, targets, anns_out, names, degenerate = [], [], [], [], 0
    for im, f in zip(images, files):
        arr = _decode_rgb(f)
        h, w = arr.shape[:2]
        if (im.get("width"), im.get("height")) != (w, h):
            raise UsageError(f"{f} is {w}x{h} (WxH) but {path} gives {im.get('width')}x{im.get('height')} for it")
        masks, labels, boxes, kept = [], [], [], []
        for ann in by_image[im["id"]]:
            rle = _ann_rle(ann, h, w, f"{path}: annotation {ann.get('id')} of {im['file_name']}")
            m = mask_utils.decode(rle)
            a = dict(ann, iscrowd=int(ann.get("iscrowd", 0)), area=float(ann.get("area", mask_utils.area(rle))))
            if "bbox" not in a:
                a["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
            kept.append(a)
            x, y, bw, bh = a["bbox"]
            if a["iscrowd"]:
                continue
            if bw <= 0 or bh <= 0 or not m.any():
                degenerate += 1  # torchvision refuses boxes without area; COCOeval still sees the annotation
                continue
            masks.append(m)
            labels.append(label_of[ann["category_id"]])
            boxes.append([x, y, x + bw, y + bh])
        out_images.append(torch.from_numpy(arr).permute(2, 0, 1).contiguous())
        targets.append(_target(masks, labels, h, w, boxes))
        anns_out.append(kept)
        names.append(str(Path(im["file_name"]).with_suffix("")))
    if len(set(names)) != len(names):
        raise UsageError(f"{path} lists several images with the same name (file name without extension)")
    return DetDataset(out_images, targets, names, [im["id"] for im in images], anns_out, cats, None, str(root),
                      dict(degenerate_annotations=degenerate, layout="coco"))


def load_det_folder(root: str | os.PathLike, size: tuple[int, int] | None = None, min_area: int = 0,
                    connectivity: int = 8, cache_dir: str | os.PathLike | None = None) -> DetDataset:
    """A COCO folder (``annotations.json`` present) or a mask folder, read as instances."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"data folder not found: {root}")
    if (root / COCO_FILE).is_file():
        if size is not None:
            raise UsageError("data.resize applies to mask folders; a COCO folder's images keep their size (the "
                             "detector resizes them: detector.min_size / max_size)")
        return read_coco_folder(root)
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return read_mask_folder(root, size, min_area, connectivity, cache_dir)
    raise MissingFileError(f"{root} is not an instance data folder: expected {COCO_FILE} with images/ (COCO format), "
                            "or images/ with masks/0/ (or masks/) as `mixlab seg` reads")


# ---------------------------------------------------------------------------------------------
# batches

class ListLoader:
    """:class:`~mixlab.data.loader.DeviceLoader`'s epochs over lists instead of tensors.

    A detection batch is a list of images (their sizes may differ) and a list of target dicts,
    so it cannot be gathered by indexing one tensor; the order (a seeded permutation per
    epoch), rank sharding, step count and the ``prepare`` factory (called at
    :meth:`set_epoch` with the rank's epoch seed) are DeviceLoader's.
    """

    def __init__(self, *sequences: Sequence, batch_size: int, shuffle: bool = False, drop_last: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1, prepare=None):
        from ..data.loader import DeviceLoader

        if not sequences or any(len(s) != len(sequences[0]) for s in sequences):
            raise UsageError(f"ListLoader needs sequences of one length, got {[len(s) for s in sequences]}")
        self.sequences = sequences
        self._order = DeviceLoader(torch.arange(len(sequences[0])), batch_size=batch_size, shuffle=shuffle,
                                   drop_last=drop_last, seed=seed, rank=rank, world_size=world_size)
        self.prepare_factory, self._prepare = prepare, None

    def __len__(self) -> int:
        return len(self._order)

    @property
    def num_samples(self) -> int:
        return self._order.num_samples

    @property
    def batch_size(self) -> int:
        return self._order.batch_size

    def set_epoch(self, epoch: int) -> None:
        from ..data.loader import epoch_seed

        o = self._order
        o.set_epoch(epoch)
        self._prepare = (self.prepare_factory(epoch_seed(o.seed, epoch, o.rank))
                         if self.prepare_factory is not None else None)

    def __iter__(self):
        if self.prepare_factory is not None and self._prepare is None:
            self.set_epoch(self._order.epoch)
        for (idx,) in self._order:
            batch = tuple([s[i] for i in idx.tolist()] for s in self.sequences)
            yield self._prepare(*batch) if self._prepare is not None else batch
