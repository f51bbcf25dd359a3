"""Classification data sets as whole uint8 tensors: CIFAR-10/100 and any image-folder tree.

Sources, in the order they are looked for under a data root:
  1. an image-folder tree: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` (also
     ``ROOT/<dataset>/train/...``), as a CIFAR-10 image-folder copy is often stored;
  2. the python-pickle release (``cifar-10-batches-py``, ``cifar-100-python``);
  3. a download through torchvision into the cache directory, when a network is there.

The decoded images are cached as one safetensors file (uint8 N,3,H,W + int64 labels), written
atomically and keyed by a fingerprint of the source (folder listing and modification times),
so a second run loads in well under a second and a changed source is decoded again.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from ..io import atomic_save_safetensors
from .images import rgb_image

log = logging.getLogger("mixlab.data")

# the files `mixlab predict` takes from a folder as images
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
CIFAR_LAYOUTS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
KNOWN_DATASETS = ("cifar10", "cifar100", "folder")
VAL_HOLDOUTS = ("random", "first", "first_or_random", "test")


class DataError(UsageError):
    """A data set that cannot be read as asked; the message says what and how to fix it."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass
class ClassificationData:
    name: str
    classes: list[str]
    train: Split
    val: Split | None
    test: Split
    source: str
    skipped: list[str] = field(default_factory=list)
    # True where train keeps the release's own stored order (the python-pickle release), False
    # for an image-folder tree (listed by class): what "the first 10%" or a tf.data shuffle
    # buffer over the stored order can mean
    release_order: bool = False
    # the holdout used ("first", "random", "test"; "first_or_random" resolved to one of the two)
    val_holdout: str = "random"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.images.shape[-2:])


# ----------------------------------------------------------------------------- where to look

def default_cache_dir() -> Path:
    return Path(os.environ.get("MIXLAB_CACHE") or Path.home() / ".cache" / "mixlab")


def candidate_roots(data: str | os.PathLike | None) -> list[Path]:
    """--data PATH, else $MIXLAB_DATA, else the default cache directory's data folder."""
    if data:
        return [Path(data).expanduser()]
    roots = []
    if os.environ.get("MIXLAB_DATA"):
        roots.append(Path(os.environ["MIXLAB_DATA"]).expanduser())
    roots.append(default_cache_dir() / "data")
    return roots


def _is_folder_tree(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "test").is_dir()


def locate(dataset: str, data: str | os.PathLike | None) -> tuple[str, Path]:
    """Find a data set: returns (kind, path) with kind 'folder' or 'pickle'."""
    if dataset not in KNOWN_DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(KNOWN_DATASETS)} "
                        "(folder = any train/<class>/ + test/<class>/ image tree)")
    looked = []
    for root in candidate_roots(data):
        for path in ([root, root / dataset] if dataset != "folder" else [root]):
            looked.append(str(path))
            if _is_folder_tree(path):
                return "folder", path
            if dataset in CIFAR_LAYOUTS:
                for p in (path / CIFAR_LAYOUTS[dataset], path):
                    if p.name == CIFAR_LAYOUTS[dataset] and p.is_dir():
                        return "pickle", p
    where = "\n  ".join(dict.fromkeys(looked))
    raise DataError(
        f"could not find the {dataset} data set. Looked in:\n  {where}\n"
        f"Point mixlab at it with --data PATH (or set MIXLAB_DATA=PATH), where PATH holds "
        f"train/<class>/ and test/<class>/ image folders"
        + (f", {CIFAR_LAYOUTS[dataset]}/ (the python release), or pass --download" if dataset in CIFAR_LAYOUTS else "")
    )


# ----------------------------------------------------------------------------- folder trees

def _files_in(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if not name.startswith(".")) if folder.is_dir() else []


def _list_folder(root: Path, say=print, left_out: list[str] | None = None,
                 ) -> tuple[dict[str, list[tuple[Path, int]]], list[str]]:
    """{split: [(file, class_index)]}, classes. Checks that train and test have the same classes.

    A class folder that is empty in every split is left out, saying so (a class with no image
    cannot be learnt or tested); one with test (or val) images but none to train on is refused."""
    splits = {s: root / s for s in ("train", "test", "val") if (root / s).is_dir()}
    class_sets = {s: sorted(d.name for d in p.iterdir() if d.is_dir()) for s, p in splits.items()}
    empty = {c for c in class_sets["train"] if not _files_in(splits["train"] / c)}
    if empty:
        elsewhere = {c: [s for s in splits if s != "train" and _files_in(splits[s] / c)] for c in sorted(empty)}
        untrainable = {c: where for c, where in elsewhere.items() if where}
        if untrainable:
            c, where = next(iter(untrainable.items()))
            more = f" ({len(untrainable) - 1} more such class(es))" if len(untrainable) > 1 else ""
            raise DataError(f"class folder {splits['train'] / c} is empty but {splits[where[0]] / c} has images: "
                            "a class with nothing to train on cannot be learnt. Add training images, or remove the "
                            f"class from every split{more}")
        say(f"data: left out empty class folder(s) {', '.join(sorted(empty))} (no images in any split)")
        if left_out is not None:
            left_out.extend(sorted(empty))
        class_sets = {s: [c for c in names if c not in empty] for s, names in class_sets.items()}
    classes = class_sets["train"]
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders (expected train/<class>/<image>)")
    for s, names in class_sets.items():
        if s == "train":
            continue
        missing, extra = sorted(set(classes) - set(names)), sorted(set(names) - set(classes))
        if missing:
            raise DataError(f"class(es) {', '.join(missing)} are in {root / 'train'} but missing from "
                            f"{root / s}: every class must appear in both, so that accuracy per class means something")
        if extra:
            raise DataError(f"class(es) {', '.join(extra)} are in {root / s} but not in {root / 'train'}")
    files = {}
    for s, p in splits.items():
        items = []
        for ci, c in enumerate(classes):
            for name in _files_in(p / c):
                items.append((p / c / name, ci))
        files[s] = items
    return files, classes


def _fingerprint_folder(root: Path) -> str:
    # Folder mtimes and the sorted listing, not a stat of every file: 60,000 stats cost about
    # a second, a listing about 30 ms. Files added, removed or renamed change the key; a file
    # overwritten in place keeps its folder's mtime: load_dataset(rebuild_cache=True), or deleting the
    # cache file under ~/.cache/mixlab/datasets, covers that case.
    h = hashlib.sha256(str(root.resolve()).encode())
    for s in ("train", "val", "test"):
        base = root / s
        if not base.is_dir():
            continue
        for c in sorted(os.listdir(base)):
            d = base / c
            if d.is_dir():
                h.update(f"{s}/{c}:{d.stat().st_mtime_ns}:".encode())
                h.update("\n".join(sorted(os.listdir(d))).encode())
    return h.hexdigest()[:16]


def _decode(path: Path, resize: int | None):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = rgb_image(im)  # 16-bit greyscale scaled to 0-255, not clipped
            if resize and im.size != (resize, resize):
                im = im.resize((resize, resize), Image.BILINEAR)
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        return f"{path}: not a readable image ({type(e).__name__})"


_SKIP_HINT = ". To skip such files (counted and logged), use --set data.on_bad_image=skip"


def _decode_all(items, resize: int | None, on_bad: str, skipped: list[str]) -> Split:
    # A plain loop, on purpose: a 32x32 JPEG decodes in ~65 us, too little for Pillow's GIL
    # release to pay off; a 2-thread pool took 1.53 s for CIFAR-10's 10,000 test images where
    # this loop takes 0.64-0.75 s (2-core EPYC, Pillow 13).
    decoded = [_decode(path, resize) for path, _ in items]
    arrays, labels, shape = [], [], None
    for (path, label), arr in zip(items, decoded):
        problem = arr if isinstance(arr, str) else None
        if problem is None:
            if shape is None:
                shape = arr.shape
            elif arr.shape != shape:
                problem = (f"{path}: image is {arr.shape[1]}x{arr.shape[0]}, the others are {shape[1]}x{shape[0]}; "
                           "resize them all at load time with --set data.resize=N")
        if problem:
            if on_bad == "skip":
                skipped.append(problem)
                continue
            raise DataError(problem + _SKIP_HINT)
        arrays.append(arr)
        labels.append(label)
    if not arrays:
        raise DataError("no readable images found")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return Split(images, torch.tensor(labels, dtype=torch.int64))


# ----------------------------------------------------------------------------- pickle release

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The CIFAR python release is a pickle; a pickle can run code, so allow only what the
    release holds (numpy arrays, built-in containers) and refuse everything else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "bytes"),
                # an empty bytes object in a protocol-2 pickle written by Python 3
                ("__builtin__", "bytes")}

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            # Python 3 writes bytes into a protocol-2 pickle (the release's protocol) as
            # _codecs.encode(text, "latin1"): only that form is taken (other codecs can grow
            # their input many times over, a memory bomb a few hundred bytes long)
            return _latin1_bytes
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _latin1_bytes(text, encoding="latin1", errors="strict"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("refusing _codecs.encode other than text.encode('latin1') in a data file")
    return text.encode("latin1")


def _read_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()


def _load_pickle_release(dataset: str, path: Path) -> tuple[Split, Split, list[str]]:
    def split_of(files, label_key):
        xs, ys = [], []
        for name in files:
            if not (path / name).is_file():
                raise DataError(f"{path / name} is missing: {path} is not a complete {dataset} python release")
            d = _read_pickle(path / name)
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        return Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))

    if dataset == "cifar10":
        meta = _read_pickle(path / "batches.meta")
        classes = [c.decode() for c in meta[b"label_names"]]
        train = split_of([f"data_batch_{i}" for i in range(1, 6)], b"labels")
        test = split_of(["test_batch"], b"labels")
    else:
        meta = _read_pickle(path / "meta")
        classes = [c.decode() for c in meta[b"fine_label_names"]]
        train = split_of(["train"], b"fine_labels")
        test = split_of(["test"], b"fine_labels")
    return train, test, classes


def download(dataset: str, root: Path) -> Path:
    """Fetch the python release with torchvision (needs a network)."""
    if dataset not in CIFAR_LAYOUTS:
        raise DataError(f"--download works for {', '.join(CIFAR_LAYOUTS)}, not {dataset!r}")
    import torchvision

    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        cls(str(root), train=True, download=True)
    except Exception as e:  # URLError, socket errors, ...: say what happened, not where
        raise DataError(f"could not download {dataset} into {root}: {e}. Without a network, point "
                        "--data at a copy of the data set") from None
    return root / CIFAR_LAYOUTS[dataset]


# ----------------------------------------------------------------------------- cache + split

def _cache_file(dataset: str, key: str, resize: int | None) -> Path:
    return default_cache_dir() / "datasets" / f"{dataset}-{key}{f'-r{resize}' if resize else ''}.safetensors"


def _save_cache(path: Path, train: Split, test: Split, extra: Split | None, classes, source: str, skipped,
                left_out=()):
    tensors = {"train_images": train.images, "train_labels": train.labels,
               "test_images": test.images, "test_labels": test.labels}
    if extra is not None:
        tensors.update(val_images=extra.images, val_labels=extra.labels)
    meta = {"classes": json.dumps(classes), "source": source, "skipped": json.dumps(skipped),
            "left_out": json.dumps(list(left_out))}
    atomic_save_safetensors(tensors, path, metadata=meta)


def _load_cache(path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    t = load_file(str(path))
    val = Split(t["val_images"], t["val_labels"]) if "val_images" in t else None
    return (Split(t["train_images"], t["train_labels"]), Split(t["test_images"], t["test_labels"]), val,
            json.loads(meta["classes"]), meta["source"], json.loads(meta.get("skipped", "[]")),
            json.loads(meta.get("left_out", "[]")))


def _classes_without_training_images(train: Split, classes: list[str]) -> list[str]:
    counts = torch.bincount(train.labels, minlength=len(classes)).tolist()
    return [c for c, n in zip(classes, counts) if n == 0]


def holdout(split: Split, fraction: float, seed: int, mode: str = "random") -> tuple[Split, Split | None]:
    """Split off a validation set: a seeded random ``fraction`` (or the first ``fraction``)."""
    if not 0 <= fraction < 1:
        raise DataError(f"val_split must be in [0, 1), got {fraction}")
    n = len(split)
    n_val = int(round(n * fraction))
    if n_val == 0:
        return split, None
    if mode == "first":
        order = torch.arange(n)
    elif mode == "random":
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    else:
        raise DataError(f"val_holdout must be 'random' or 'first' to hold out part of train, got {mode!r}")
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    missing = set(split.labels[train_idx].tolist()) - set(split.labels[val_idx].tolist())
    if mode == "first" and missing:
        if bool((split.labels[1:] >= split.labels[:-1]).all()):  # sorted by class
            raise DataError(
                f"val_holdout 'first' would hold out the first {n_val} images, which miss class(es) "
                f"{sorted(missing)[:5]}: the source is sorted by class (an image-folder tree). "
                "Use val_holdout: random (a fixed, seeded holdout) or first_or_random")
        log.warning("the first %d images held out as val miss %d class(es) of train (e.g. %s): their "
                    "validation accuracy is not measured", n_val, len(missing), sorted(missing)[:5])
    return (Split(split.images[train_idx], split.labels[train_idx]),
            Split(split.images[val_idx], split.labels[val_idx]))


def load_dataset(dataset: str = "cifar10", data: str | os.PathLike | None = None, *, val_split: float = 0.1,
                 val_seed: int = 0, val_holdout: str = "random", resize: int | None = None,
                 on_bad_image: str = "error", rebuild_cache: bool = False, download_ok: bool = False,
                 verbose: bool = True, release_order: bool | None = None) -> ClassificationData:
    """Load a classification data set as uint8 tensors (decoding once, then from the cache).

    ``val_holdout``: ``random`` (a seeded ``val_split`` of train), ``first`` (its first
    ``val_split``), ``first_or_random`` (``first`` where the source keeps the release's stored
    order, the python-pickle release, as Keras' ``x_train[:5000]`` does; ``random`` for an
    image-folder tree, which is listed by class), or ``test``: nothing held out, the validation
    set *is* the test set (the Conv2Former seed's protocol; weights selected on it are selected
    on the test set). ``release_order``: what a run recorded of its source (True: the python
    release, in its stored order; False: an image-folder tree); a source of the other kind is
    refused, since the holdout and the shuffle stream depend on the order.
    """
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    if val_holdout not in VAL_HOLDOUTS:
        raise DataError(f"val_holdout must be 'random', 'first', 'first_or_random' or 'test' (validate on the "
                        f"test set), got {val_holdout!r}")
    t0 = time.perf_counter()
    try:
        kind, path = locate(dataset, data)
    except DataError:
        if not download_ok:
            raise
        kind, path = "pickle", download(dataset, candidate_roots(data)[0])
    if release_order is not None and (kind == "pickle") != bool(release_order):
        was, now = (("the python release (in its stored order)", "an image-folder tree") if release_order
                    else ("an image-folder tree", "the python release"))
        raise DataError(f"this run was trained on {was}, but the data found now ({path}) is {now}: its holdout "
                        "and shuffle order would change. Resume with the run's own data (--data), or start a "
                        "new run")
    key = _fingerprint_folder(path) if kind == "folder" else hashlib.sha256(
        "".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(path.iterdir())).encode()
        + str(path.resolve()).encode()).hexdigest()[:16]
    cache = _cache_file(dataset, key, resize)
    skipped: list[str] = []
    left_out: list[str] = []
    say = print if verbose else log.warning
    loaded = None
    if cache.is_file() and not rebuild_cache:
        try:
            loaded = _load_cache(cache)
        except Exception as e:  # SafetensorError, a cut-short file, missing keys: rebuilt, never trusted
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            say(f"data: the cache {cache} is damaged ({type(e).__name__}: {reason[:160]}): decoding the data again")
    if loaded is not None:
        train, test, extra_val, classes, source, skipped, left_out = loaded
        if skipped and on_bad_image == "error":  # this cache was built with on_bad_image: skip
            raise DataError(skipped[0] + (f" (and {len(skipped) - 1} more bad file(s))" if len(skipped) > 1 else "")
                            + _SKIP_HINT)
        if left_out:
            say(f"data: left out empty class folder(s) {', '.join(left_out)} (no images in any split)")
        how = "cache"
    else:
        extra_val = None
        if kind == "folder":
            files, classes = _list_folder(path, say, left_out)
            train = _decode_all(files["train"], resize, on_bad_image, skipped)
            test = _decode_all(files["test"], resize, on_bad_image, skipped)
            if "val" in files:
                extra_val = _decode_all(files["val"], resize, on_bad_image, skipped)
            if train.images.shape[1:] != test.images.shape[1:]:
                raise DataError(f"train images are {tuple(train.images.shape[1:])} but test images are "
                                f"{tuple(test.images.shape[1:])}; use --set data.resize=N")
            lost = _classes_without_training_images(train, classes)
            if lost:
                raise DataError(f"every training image of class(es) {', '.join(lost)} was unreadable and skipped "
                                f"(on_bad_image: skip), so the class cannot be learnt: fix or replace those files "
                                f"(the first: {skipped[0] if skipped else '?'})")
        else:
            train, test, classes = _load_pickle_release(dataset, path)
        source = str(path)
        _save_cache(cache, train, test, extra_val, classes, source, skipped, left_out)
        how = "decoded"
    for problem in skipped:
        log.warning("skipped %s", problem)
    release_order = kind == "pickle"  # (the recorded value, if any, was checked against it above)
    if val_holdout == "first_or_random":
        val_holdout = "first" if release_order else "random"
    if val_holdout == "test":  # asked for explicitly: all of train is trained on, the test set validates
        val = test
    elif extra_val is not None:  # the tree ships its own val/ folder: use it as is
        val = extra_val
    else:
        train, val = holdout(train, val_split, val_seed, val_holdout)
    if verbose:
        print(f"data: {dataset} from {source} ({how} in {time.perf_counter() - t0:.2f} s): "
              f"{len(train)} train, "
              + ("val = the test set (val_holdout: test)" if val is test else f"{len(val) if val else 0} val")
              + f", {len(test)} test, {len(classes)} classes, "
              f"{tuple(train.images.shape[-2:])} px" + (f"; {len(skipped)} bad files skipped" if skipped else "")
              + ("" if val is test or val is extra_val or not val else
                 f"; val = {'the first' if val_holdout == 'first' else 'a seeded'} {val_split:.0%} of train"
                 + (" (release order)" if release_order and val_holdout == "first" else "")))
    return ClassificationData(dataset, classes, train, val, test, source, skipped, release_order=release_order,
                              val_holdout=val_holdout)


def load_classification_data(config: dict, verbose: bool = False, same_order: bool = False) -> ClassificationData:
    """The data set of a run's resolved config (see ``mixlab.train.config``). ``same_order``
    (training, where the holdout and the shuffle stream must stay the run's): refuse a source
    of another kind than the one the config records (``data.release_order``)."""
    d = config["data"]
    return load_dataset(d["dataset"], d.get("root"), val_split=d.get("val_split", 0.1),
                        val_seed=d.get("val_seed", 0), val_holdout=d.get("val_holdout", "random"),
                        resize=d.get("resize"), on_bad_image=d.get("on_bad_image", "error"),
                        download_ok=bool(d.get("download")), verbose=verbose,
                        release_order=d.get("release_order") if same_order else None)
