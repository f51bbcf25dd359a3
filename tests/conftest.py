"""Shared fixtures: tiny generated data sets in every supported format."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from data_helpers import _class_image  # noqa: F401  (also used by tests that build data at module scope)

# Tests run on 2 cores next to nothing else: one thread avoids OpenMP oversubscription when
# pytest-xdist or a parallel job shares the machine, and keeps timings stable.
torch.set_num_threads(int(os.environ.get("MIXLAB_TEST_THREADS", "1")))
os.environ.setdefault("MIXLAB_NO_PROGRESS", "1")


@pytest.fixture
def make_folder_dataset(tmp_path):
    """make(n_classes=3, per_class=(8, 4), size=16, fmt='png') -> root with train/ and test/."""
    from PIL import Image

    def make(n_classes=3, per_class=(8, 4), size=16, fmt="png", root=None, seed=0):
        root = root or tmp_path / "folder"
        rng = np.random.default_rng(seed)
        for split, n in zip(("train", "test"), per_class):
            for k in range(n_classes):
                d = root / split / f"class{k}"
                d.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    Image.fromarray(_class_image(rng, k, size)).save(d / f"{i:04d}.{fmt}")
        return root

    return make


@pytest.fixture
def make_cifar_pickle(tmp_path):
    """make(kind='cifar10'|'cifar100', n_train=50, n_test=20) -> root holding the python release."""

    def make(kind="cifar10", n_train=50, n_test=20, seed=0):
        rng = np.random.default_rng(seed)
        n_classes = 10 if kind == "cifar10" else 100
        folder = tmp_path / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
        folder.mkdir(parents=True)

        def batch(n, key):
            labels = rng.integers(0, n_classes, n).tolist()
            data = np.stack([_class_image(rng, lab, 32).transpose(2, 0, 1).reshape(-1) for lab in labels])
            return {b"data": data, key: labels}

        def dump(name, obj):
            with open(folder / name, "wb") as f:
                pickle.dump(obj, f)

        if kind == "cifar10":
            dump("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
            per = n_train // 5
            for i in range(1, 6):
                dump(f"data_batch_{i}", batch(per, b"labels"))
            dump("test_batch", batch(n_test, b"labels"))
        else:
            dump("meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
            dump("train", batch(n_train, b"fine_labels"))
            dump("test", batch(n_test, b"fine_labels"))
        return tmp_path

    return make


@pytest.fixture(autouse=True, scope="session")
def isolated_kernel_cache(tmp_path_factory):
    """One build of the fast depthwise kernel per test session, in a folder of the session's own
    (not the user's ~/.cache/mixlab/kernels)."""
    old = os.environ.get("MIXLAB_KERNEL_CACHE")
    os.environ["MIXLAB_KERNEL_CACHE"] = str(tmp_path_factory.mktemp("kernels"))
    yield
    if old is None:
        os.environ.pop("MIXLAB_KERNEL_CACHE", None)
    else:
        os.environ["MIXLAB_KERNEL_CACHE"] = old


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own mixlab cache directory and no MIXLAB_DATA from the caller."""
    monkeypatch.setenv("MIXLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MIXLAB_DATA", raising=False)


@pytest.fixture
def make_mask_dataset():
    """make(root, n=12, size=32) -> a UNeXt-layout folder (images/, masks/0/) whose masks are a
    bright rectangle on noise (learnable, so IoU can rise above chance)."""
    from data_helpers import make_mask_folder

    return make_mask_folder
