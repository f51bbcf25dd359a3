"""Segmentation data: folder readers, train/val splits, joint image/mask augmentation.

A data set is decoded once into two uint8 tensors, images ``(N, C, H, W)`` and masks
``(N, K, H, W)`` holding 0 or 1, so that training draws batches by indexing and augments
them as tensors (on any device) instead of decoding files every epoch.

Layouts read:

* the UNeXt layout (the one the official code uses for BUSI)::

      ROOT/images/<name>.png
      ROOT/masks/0/<name>.png      # class 0 (binary segmentation: only this one)
      ROOT/masks/1/<name>.png      # class 1, ... (one binary mask per class)

* an images folder and a masks folder whose files have matching names
  (``mask_suffix`` allows e.g. ``x.png`` <-> ``x_mask.png``).

Mask files are binarised on reading. A mask holding only 0 and 255 (65535 for a 16-bit file)
or only 0 and 1 is read as it is; any other mask (0/100, a 0/1/2 label map, a JPEG mask with
in-between values) is refused unless the data's settings say which pixels are foreground:
``mask_threshold=N`` (value > N) or ``mask_values=[V, ...]`` (one of these values). It is
never guessed: a threshold picked for the user reads a 0/100 mask as empty. 16-bit images are
scaled to 8 bits, not clipped (:mod:`mixlab.data.images`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..data.constants import IMAGENET_MEAN, IMAGENET_STD
from ..data.images import mask_array, rgb_image
from ..io import atomic_torch_save, atomic_write_text
from ..errors import MissingFileError, UnknownNameError, UsageError

__all__ = [
    "IMAGE_EXTS", "SegDataset", "read_unext_folder", "read_image_mask_dirs", "load_segmentation_data",
    "split_names", "split_dataset", "read_split_file", "write_split_file", "normalize_images",
    "JointAugment",
]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_CACHE_VERSION = 2  # 2: masks checked against {0, max} / {0, 1} or an explicit rule; 16-bit images scaled
log = logging.getLogger("mixlab.data")


@dataclass(frozen=True)
class MaskRule:
    """Which mask pixels are foreground when a mask is not a 0/255 (0/65535) or 0/1 mask:
    ``threshold`` (value > threshold) or ``values`` (one of them); neither: such masks are refused."""

    threshold: int | None = None
    values: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.threshold is not None and self.values is not None:
            raise UsageError("give mask_threshold or mask_values, not both: each says which mask pixels are foreground")

    def key(self):
        return [self.threshold, list(self.values) if self.values is not None else None]


def _foreground(arr: np.ndarray, full: int, path: Path, rule: MaskRule) -> np.ndarray:
    """The foreground (bool) of a mask's pixel values, by ``rule`` or, without one, for a mask
    of {0, full} or {0, 1} only; other masks are refused, naming the file and its values."""
    if rule.values is not None:
        return np.isin(arr, rule.values)
    if rule.threshold is not None:
        return arr > rule.threshold
    present = np.flatnonzero(np.bincount(arr.ravel(), minlength=2)) if arr.dtype == np.uint8 else np.unique(arr)
    if set(present.tolist()) <= {0, 1}:
        return arr == 1
    if set(present.tolist()) <= {0, full}:
        return arr == full
    shown = ", ".join(str(v) for v in present[:8].tolist())
    shown += f", ... ({len(present)} values)" if len(present) > 8 else ""
    raise UsageError(f"mask {path} holds the values {shown}, not only 0 and {full} or 0 and 1, so which pixels are "
                     "foreground cannot be told (a label map, or a lossy JPEG mask?): say it with --set "
                     "data.mask_threshold=N (foreground: value > N) or --set data.mask_values=[V, ...] (foreground: "
                     "these values)")


@dataclass
class SegDataset:
    """Decoded images and masks of a segmentation data set, with the case names."""

    images: torch.Tensor  # (N, C, H, W) uint8
    masks: torch.Tensor  # (N, K, H, W) uint8, values 0 or 1
    names: list[str]
    source: str = ""
    image_paths: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.images.ndim != 4 or self.masks.ndim != 4:
            raise UsageError(f"images and masks must be 4-d (N, C, H, W), got {tuple(self.images.shape)} "
                             f"and {tuple(self.masks.shape)}")
        n = len(self.names)
        if self.images.shape[0] != n or self.masks.shape[0] != n:
            raise UsageError(f"{n} names but {self.images.shape[0]} images and {self.masks.shape[0]} masks")
        if self.images.shape[-2:] != self.masks.shape[-2:]:
            raise UsageError(f"images are {tuple(self.images.shape[-2:])} but masks {tuple(self.masks.shape[-2:])}")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_classes(self) -> int:
        return int(self.masks.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def subset(self, names: Sequence[str]) -> "SegDataset":
        """The cases named in ``names`` (in that order)."""
        index = {n: i for i, n in enumerate(self.names)}
        idx = [index[n] for n in _resolve_names(names, index, self.source)]
        t = torch.tensor(idx, dtype=torch.long)
        paths = [self.image_paths[i] for i in idx] if self.image_paths else []
        return SegDataset(self.images[t], self.masks[t], [self.names[i] for i in idx], self.source, paths)


# ---------------------------------------------------------------------------------------------
# reading files

def _decode(path: Path, mode: str, size: tuple[int, int] | None,
            rule: MaskRule = MaskRule()) -> tuple[tuple[int, int], np.ndarray]:
    """(native (W, H), array) of an RGB image or a 0/1 mask (``mode="mask"``, binarised by
    ``rule``, see :class:`MaskRule`), resized to ``size`` = (H, W) when given."""
    try:
        with Image.open(path) as im:
            native = im.size
            if mode == "mask":
                fg = _foreground(*mask_array(im), path, rule)
                if size is not None and (size[1], size[0]) != native:
                    fg = np.asarray(Image.fromarray(fg.astype(np.uint8)).resize((size[1], size[0]), Image.NEAREST))
                return native, fg.astype(np.uint8)
            im = rgb_image(im)
            if size is not None and (size[1], size[0]) != native:
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            return native, np.array(im)  # writable: torch.from_numpy warns on read-only arrays
    except UsageError:
        raise
    except FileNotFoundError:
        raise MissingFileError(f"file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UsageError(f"cannot read image file {path}: {type(e).__name__}: {e}") from None


def _find_with_stem(folder: Path, stem: str, preferred_ext: str, exts: Sequence[str]) -> Path | None:
    """``folder/stem+ext``, trying the image's own extension first, then the others."""
    first = folder / f"{stem}{preferred_ext}"
    if first.is_file():
        return first
    found = [folder / f"{stem}{e}" for e in exts if e != preferred_ext and (folder / f"{stem}{e}").is_file()]
    if len(found) > 1:
        raise UsageError(f"several files could be the mask of {stem!r}: {', '.join(map(str, found))}")
    return found[0] if found else None


def _list_images(folder: Path, exts: Sequence[str]) -> list[Path]:
    if not folder.is_dir():
        raise MissingFileError(f"folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise UsageError(f"no image files ({', '.join(exts)}) in {folder}")
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise UsageError(f"{folder} has several images with the same name: {', '.join(dup[:5])}")
    return files


def _missing_error(missing: list[tuple[Path, Path]]) -> FileNotFoundError:
    shown = "\n".join(f"  image {img}: expected mask {mask}" for img, mask in missing[:5])
    more = f"\n  (+{len(missing) - 5} more)" if len(missing) > 5 else ""
    return FileNotFoundError(f"{len(missing)} mask file(s) missing:\n{shown}{more}")


def _decode_all(image_paths: list[Path], mask_paths: list[list[Path]], size, workers,
                rule: MaskRule = MaskRule()) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image and its K masks; check sizes; stack into uint8 tensors."""
    def one(i):
        native, img = _decode(image_paths[i], "RGB", size)
        masks = []
        for mp in mask_paths[i]:
            m_native, m = _decode(mp, "mask", size, rule)
            if m_native != native:
                raise UsageError(f"mask {mp} is {m_native[0]}x{m_native[1]} (WxH) but its image "
                                 f"{image_paths[i]} is {native[0]}x{native[1]}")
            masks.append(m)
        return img, np.stack(masks)

    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes outside the GIL
        decoded = list(pool.map(one, range(len(image_paths))))
    first_shape = decoded[0][0].shape
    for i, (img, _) in enumerate(decoded):
        if img.shape != first_shape:
            raise UsageError(
                f"{image_paths[i]} is {img.shape[1]}x{img.shape[0]} (WxH) but {image_paths[0]} is "
                f"{first_shape[1]}x{first_shape[0]}: all images must share one size (pass size=(H, W) to "
                "resize them on reading)")
    images = torch.from_numpy(np.stack([d[0] for d in decoded])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([d[1] for d in decoded])).contiguous()
    return images, masks


def _cache_key(kind: str, files: list[Path], size, rule: MaskRule = MaskRule()) -> str:
    entries = []
    for p in files:
        st = p.stat()
        entries.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps([_CACHE_VERSION, kind, list(size) if size else None, rule.key(), entries])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _with_cache(cache_dir, kind, image_paths, mask_paths, size, build,
                rule: MaskRule = MaskRule()) -> tuple[torch.Tensor, torch.Tensor]:
    """Build the tensors, or read them from ``cache_dir`` when every file is unchanged."""
    if cache_dir is None:
        return build()
    files = list(image_paths) + [m for ms in mask_paths for m in ms]
    key = _cache_key(kind, files, size, rule)
    path = Path(cache_dir) / f"seg-{kind}-{key}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("key") == key and blob["images"].shape[0] == len(image_paths) == blob["masks"].shape[0]:
                return blob["images"], blob["masks"]
            problem = "it holds other data"
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            problem = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        log.warning("the decoded-data cache %s is damaged (%s): decoding the data again", path, problem[:200])
    images, masks = build()
    atomic_torch_save({"key": key, "images": images, "masks": masks}, path)
    return images, masks


def read_unext_folder(root: str | os.PathLike, size: tuple[int, int] | None = None,
                      cache_dir: str | os.PathLike | None = None, workers: int | None = None,
                      exts: Sequence[str] = IMAGE_EXTS, mask_threshold: int | None = None,
                      mask_values: Sequence[int] | None = None) -> SegDataset:
    """Read ``ROOT/images/<name>`` with ``ROOT/masks/<k>/<name>`` for k = 0..K-1.

    Args:
        size: (H, W) to resize to on reading (bilinear for images, nearest for masks);
            None keeps the files' size, which must then be the same for every image.
        cache_dir: where to keep the decoded tensors; reused while no file changed.
        mask_threshold, mask_values: which pixels of masks that are not 0/255 or 0/1 are
            foreground (value > threshold, or one of the values); see :class:`MaskRule`.
    """
    root = Path(root)
    image_dir, mask_root = root / "images", root / "masks"
    if not image_dir.is_dir() or not mask_root.is_dir():
        raise MissingFileError(f"{root} is not in the UNeXt layout: it needs images/ and masks/0/ folders")
    class_dirs = sorted((p for p in mask_root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not class_dirs:
        raise MissingFileError(f"{mask_root} has no class folders: binary masks go in {mask_root / '0'}")
    numbers = [int(p.name) for p in class_dirs]
    if numbers != list(range(len(numbers))):
        raise UsageError(f"mask class folders in {mask_root} must be 0..K-1 without gaps, found {numbers}")
    image_paths = _list_images(image_dir, exts)
    mask_paths = _match_masks(image_paths, class_dirs, "", exts)
    return _decoded("unext", root, image_paths, mask_paths, size, cache_dir, workers,
                    _mask_rule(mask_threshold, mask_values))


def read_image_mask_dirs(image_dir: str | os.PathLike, mask_dir: str | os.PathLike, mask_suffix: str = "",
                         size: tuple[int, int] | None = None, cache_dir: str | os.PathLike | None = None,
                         workers: int | None = None, exts: Sequence[str] = IMAGE_EXTS,
                         mask_threshold: int | None = None, mask_values: Sequence[int] | None = None) -> SegDataset:
    """Read images and binary masks from two folders, matched by name.

    The mask of ``image_dir/x.jpg`` is ``mask_dir/x{mask_suffix}.<ext>`` (any image extension;
    the image's own is tried first). The result has one mask channel (K = 1).
    """
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    if not mask_dir.is_dir():
        raise MissingFileError(f"mask folder not found: {mask_dir}")
    image_paths = _list_images(image_dir, exts)
    if mask_suffix == "" and image_dir.resolve() == mask_dir.resolve():
        raise UsageError(f"images and masks are the same folder ({image_dir}); pass mask_suffix=")
    if mask_suffix:  # masks beside the images: don't take a mask for an image
        image_paths = [p for p in image_paths if not p.stem.endswith(mask_suffix)]
    mask_paths = _match_masks(image_paths, [mask_dir], mask_suffix, exts)
    return _decoded("dirs", image_dir, image_paths, mask_paths, size, cache_dir, workers,
                    _mask_rule(mask_threshold, mask_values))


def _match_masks(image_paths: list[Path], mask_dirs: list[Path], suffix: str, exts) -> list[list[Path]]:
    """Each image's mask in each of ``mask_dirs``: the image's stem + ``suffix`` with any image
    extension (the image's own first). Every missing mask is named in one error."""
    mask_paths, missing = [], []
    for img in image_paths:
        row = []
        for d in mask_dirs:
            found = _find_with_stem(d, img.stem + suffix, img.suffix, exts)
            if found is None:
                missing.append((img, d / f"{img.stem}{suffix}{img.suffix}"))
            row.append(found)
        mask_paths.append(row)
    if missing:
        raise _missing_error(missing)
    return mask_paths


def _decoded(layout: str, source: Path, image_paths, mask_paths, size, cache_dir, workers,
             rule: MaskRule) -> SegDataset:
    """The matched files decoded (or read from the cache of the same files and settings)."""
    images, masks = _with_cache(cache_dir, layout, image_paths, mask_paths, size,
                                lambda: _decode_all(image_paths, mask_paths, size, workers, rule), rule)
    return SegDataset(images, masks, [p.stem for p in image_paths], str(source), [str(p) for p in image_paths])


def _mask_rule(threshold, values) -> MaskRule:
    return MaskRule(None if threshold is None else int(threshold),
                    None if values is None else tuple(int(v) for v in values))


def load_segmentation_data(path: str | os.PathLike, **kwargs) -> SegDataset:
    """Read a data folder in either layout: UNeXt (``masks/0/...``) or ``images/`` + ``masks/`` files."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"data folder not found: {path}")
    masks = path / "masks"
    if (path / "images").is_dir() and masks.is_dir():
        if any(p.is_dir() and p.name.isdigit() for p in masks.iterdir()):
            return read_unext_folder(path, **kwargs)
        return read_image_mask_dirs(path / "images", masks, **kwargs)
    raise MissingFileError(
        f"{path} is not a segmentation data folder: expected images/<name>.png with masks/0/<name>.png "
        "(UNeXt layout) or with masks/<name>.png")


# ---------------------------------------------------------------------------------------------
# splits

def _resolve_names(names: Sequence[str], known, where: str) -> list[str]:
    """Map names (with or without an image extension) to the data set's names; reject unknowns."""
    out, unknown = [], []
    for n in names:
        if n in known:
            out.append(n)
        elif Path(n).suffix.lower() in IMAGE_EXTS and Path(n).stem in known:
            out.append(Path(n).stem)
        else:
            unknown.append(n)
    if unknown:
        raise UnknownNameError(f"{len(unknown)} name(s) not in the data set {where}: {', '.join(map(repr, unknown[:5]))}"
                               + (" ..." if len(unknown) > 5 else ""))
    if len(set(out)) != len(out):
        dup = sorted({n for n in out if out.count(n) > 1})
        raise UsageError(f"names listed more than once: {', '.join(map(repr, dup[:5]))}")
    return out


def split_names(names: Sequence[str], val_fraction: float = 0.2, seed: int = 41) -> tuple[list[str], list[str]]:
    """A seeded random train/val split of ``names``, both halves sorted.

    ``ceil(N * val_fraction)`` cases go to validation, as scikit-learn's ``train_test_split``
    (used by the official UNeXt code, seed 41) sizes its test set: BUSI's 525 -> 420 / 105.
    The draw depends only on the sorted names and the seed, not on the folder's listing order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    names = sorted(names)
    n_val = math.ceil(len(names) * val_fraction)
    if n_val >= len(names) or n_val == 0:
        raise UsageError(f"cannot split {len(names)} case(s) with val_fraction={val_fraction}")
    perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(names[i] for i in perm[:n_val])
    train = sorted(names[i] for i in perm[n_val:])
    return train, val


def read_split_file(path: str | os.PathLike) -> list[str]:
    """Names listed in a split file: one per line; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"split file not found: {path}")
    names = [line.strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise UsageError(f"split file {path} lists no names")
    return names


def write_split_file(path: str | os.PathLike, names: Sequence[str]) -> None:
    atomic_write_text(path, "".join(f"{n}\n" for n in names))


def split_dataset(ds: SegDataset, val_fraction: float = 0.2, seed: int = 41,
                  train_file: str | os.PathLike | None = None,
                  val_file: str | os.PathLike | None = None) -> tuple[SegDataset, SegDataset]:
    """(train, val) subsets: from split files when given, else a seeded random split.

    With only one file, the other half is every remaining case.
    """
    known = set(ds.names)
    if train_file is None and val_file is None:
        train, val = split_names(ds.names, val_fraction, seed)
    else:
        train = _resolve_names(read_split_file(train_file), known, ds.source) if train_file else None
        val = _resolve_names(read_split_file(val_file), known, ds.source) if val_file else None
        if train is None:
            train = [n for n in ds.names if n not in set(val)]
        if val is None:
            val = [n for n in ds.names if n not in set(train)]
        both = sorted(set(train) & set(val))
        if both:
            raise UsageError(f"{len(both)} case(s) are in both the train and the val split: "
                             f"{', '.join(map(repr, both[:5]))}")
        if not train or not val:
            raise UsageError("the split leaves the train or the val set empty")
    return ds.subset(train), ds.subset(val)


# a test draw must not reuse the validation draw's seed: offset it by a fixed prime
_TEST_SEED_OFFSET = 1_000_003


def three_way_split(ds: SegDataset, val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 41,
                    train_file=None, val_file=None, test_file=None):
    """(train, val or None, test or None) subsets of ``ds``.

    The test cases are set aside first (``test_file``, else a seeded ``ceil(N * test_fraction)``
    of all cases, drawn with ``seed + 1000003``); the train/val split of the rest is then
    :func:`split_dataset`'s (files, else a seeded ``val_fraction`` of the rest). With
    ``test_fraction`` 0 and no test file the split is exactly :func:`split_dataset`'s, so the
    UNeXt paper's 420 / 105 split of BUSI is unchanged. No case is in two parts.
    """
    known = set(ds.names)
    if test_file:
        test = _resolve_names(read_split_file(test_file), known, ds.source)
    elif test_fraction and float(test_fraction) > 0:
        _, test = split_names(ds.names, float(test_fraction), int(seed) + _TEST_SEED_OFFSET)
    else:
        test = []
    rest = ds.subset([n for n in ds.names if n not in set(test)]) if test else ds
    for f, what in ((train_file, "train"), (val_file, "val")):
        if f:
            clash = sorted(set(_resolve_names(read_split_file(f), known, ds.source)) & set(test))
            if clash:
                raise UsageError(f"{len(clash)} case(s) of the {what} split file {f} are in the test split too: "
                                 f"{', '.join(map(repr, clash[:5]))}")
    if train_file or val_file:
        train, val = split_dataset(rest, train_file=train_file, val_file=val_file)
    elif val_fraction and float(val_fraction) > 0:
        train, val = split_dataset(rest, float(val_fraction), int(seed))
    else:
        train, val = rest, None
    return train, val, (ds.subset(sorted(test)) if test else None)


def kfold_names(names: Sequence[str], folds: int, seed: int = 41) -> list[list[str]]:
    """``folds`` disjoint parts of ``names`` covering every name once (sizes differ by at most
    one), drawn by a seeded permutation of the sorted names; each part sorted."""
    names = sorted(names)
    if not 2 <= int(folds) <= len(names):
        raise UsageError(f"folds must be between 2 and the number of cases ({len(names)}), got {folds}")
    perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(int(seed))).tolist()
    k, n = int(folds), len(names)
    bounds = [i * n // k for i in range(k + 1)]
    return [sorted(names[j] for j in perm[bounds[i]:bounds[i + 1]]) for i in range(k)]


# ---------------------------------------------------------------------------------------------
# tensors

def normalize_images(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 (0-255) or float (0-1) images -> float32 ``(x - mean) / std``.

    The defaults are albumentations' ``Normalize()`` ones, which the official UNeXt code
    applies (to OpenCV's BGR channel order; on BUSI's grey ultrasound R = G = B almost
    everywhere, so the order barely matters).
    """
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


class JointAugment:
    """Random augmentation of a batch of images and their masks, on tensors, per sample.

    Geometry is applied identically to an image and its mask: horizontal/vertical flips,
    rotations by a multiple of 90 degrees (only 0/180 for non-square images), and a random
    resized crop (torchvision's box sampling) scaled back to the input size, bilinear for
    the image and nearest for the mask, so masks keep exactly their 0/1 values. Brightness
    and contrast change the image only. The official UNeXt recipe is flips + rot90.

    Call with images ``(B, C, H, W)`` uint8 (0-255) or float (0-1) and masks ``(B, K, H, W)``;
    returns float32 images in 0-1 and masks of the masks' dtype.
    """

    def __init__(self, hflip: float = 0.5, vflip: float = 0.5, rot90: bool = True,
                 crop_scale: tuple[float, float] | None = None, crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 crop_p: float = 1.0, brightness: float = 0.0, contrast: float = 0.0):
        if crop_scale is not None and not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise UsageError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        if brightness < 0 or contrast < 0:
            raise UsageError("brightness and contrast must be >= 0")
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.crop_scale, self.crop_ratio, self.crop_p = crop_scale, crop_ratio, crop_p
        self.brightness, self.contrast = brightness, contrast

    def __repr__(self) -> str:
        keys = ("hflip", "vflip", "rot90", "crop_scale", "crop_ratio", "crop_p", "brightness", "contrast")
        return f"JointAugment({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"

    def __call__(self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None):
        if images.ndim != 4 or masks.ndim != 4 or images.shape[0] != masks.shape[0] \
                or images.shape[-2:] != masks.shape[-2:]:
            raise UsageError(f"images (B, C, H, W) and masks (B, K, H, W) must agree, got "
                             f"{tuple(images.shape)} and {tuple(masks.shape)}")
        x = images.to(torch.float32, copy=True)
        if images.dtype == torch.uint8:
            x.div_(255.0)
        m = masks.clone()
        b, _, h, w = x.shape
        dev = x.device

        def coin(p):
            return (torch.rand(b, generator=generator) < p).to(dev).view(b, 1, 1, 1)

        if self.hflip > 0:
            flip = coin(self.hflip)
            x, m = torch.where(flip, x.flip(-1), x), torch.where(flip, m.flip(-1), m)
        if self.vflip > 0:
            flip = coin(self.vflip)
            x, m = torch.where(flip, x.flip(-2), x), torch.where(flip, m.flip(-2), m)
        if self.rot90:
            k = torch.randint(0, 4, (b,), generator=generator) if h == w else 2 * torch.randint(0, 2, (b,), generator=generator)
            for turns in (1, 2, 3):
                idx = (k == turns).nonzero().squeeze(1).to(dev)
                if idx.numel():
                    x[idx] = torch.rot90(x[idx], turns, dims=(-2, -1))
                    m[idx] = torch.rot90(m[idx], turns, dims=(-2, -1))
        if self.crop_scale is not None and self.crop_p > 0:
            x, m = self._crop(x, m, generator)
        if self.brightness > 0:
            f = torch.empty(b).uniform_(1 - self.brightness, 1 + self.brightness, generator=generator)
            x = x * f.to(dev).view(b, 1, 1, 1)
        if self.contrast > 0:
            f = torch.empty(b).uniform_(1 - self.contrast, 1 + self.contrast, generator=generator).to(dev)
            grey = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - grey) * f.view(b, 1, 1, 1) + grey
        if self.brightness > 0 or self.contrast > 0:
            x = x.clamp_(0.0, 1.0)
        return x, m

    def _crop(self, x: torch.Tensor, m: torch.Tensor, generator):
        b, _, h, w = x.shape
        tries = 10
        area = torch.empty(b, tries).uniform_(*self.crop_scale, generator=generator) * (h * w)
        log_r = torch.empty(b, tries).uniform_(math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]),
                                               generator=generator)
        cw = torch.sqrt(area * log_r.exp()).round()
        ch = torch.sqrt(area / log_r.exp()).round()
        ok = (cw >= 1) & (ch >= 1) & (cw <= w) & (ch <= h)
        first = ok.float().argmax(dim=1, keepdim=True)  # first box that fits, as torchvision
        found = ok.any(dim=1)
        cw = torch.where(found, cw.gather(1, first).squeeze(1), torch.full((b,), float(w)))
        ch = torch.where(found, ch.gather(1, first).squeeze(1), torch.full((b,), float(h)))
        x0 = (torch.rand(b, generator=generator) * (w - cw + 1)).floor()
        y0 = (torch.rand(b, generator=generator) * (h - ch + 1)).floor()
        apply = (torch.rand(b, generator=generator) < self.crop_p) & ((cw < w) | (ch < h))
        idx = apply.nonzero().squeeze(1)
        if idx.numel() == 0:
            return x, m
        cw, ch, x0, y0 = cw[idx], ch[idx], x0[idx], y0[idx]
        # output pixel edges [-1, 1] map onto the crop box's edges (align_corners=False)
        theta = torch.zeros(idx.numel(), 2, 3)
        theta[:, 0, 0] = cw / w
        theta[:, 0, 2] = (2 * x0 + cw) / w - 1
        theta[:, 1, 1] = ch / h
        theta[:, 1, 2] = (2 * y0 + ch) / h - 1
        dev_idx = idx.to(x.device)
        theta = theta.to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, [idx.numel(), x.shape[1], h, w], align_corners=False)
        x[dev_idx] = F.grid_sample(x[dev_idx], grid, mode="bilinear", padding_mode="border", align_corners=False)
        sampled = F.grid_sample(m[dev_idx].to(x.dtype), grid, mode="nearest", padding_mode="border",
                                align_corners=False)
        m[dev_idx] = sampled.round().to(m.dtype)
        return x, m
