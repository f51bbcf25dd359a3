"""The model and the images that `mixlab viz` and `mixlab rf` look at.

The model comes from a trained run (its best or last weights) or is built untrained from
its registered name. Images are files (resized to the model's input size) or a run's test
split, normalised as the run's data was (``data.mean`` / ``data.std``, which `mixlab train`
records) or, without a run, as the model's pretrained config says.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from .probe import model_device
from ..errors import MissingFileError, UsageError

__all__ = [
    "CIFAR10_CLASSES", "load_model", "model_input_size", "normalisation", "class_names", "label_of", "read_image",
    "to_model_input", "for_display", "load_test_split", "misclassified", "pick_images",
]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_model(checkpoint: str | None = None, model: str | None = None,
               which: str = "best") -> tuple[torch.nn.Module, dict | None, str]:
    """(model in eval mode, run config or None, display name) from a run directory ``checkpoint``
    (its ``which`` weights: best or last) or, untrained, from the registered name ``model``."""
    if checkpoint:
        from ..tasks import load_run_model

        net, config = load_run_model(checkpoint, which=which)
        name = f"{config.get('model', type(net).__name__)} ({Path(checkpoint).name})"
        return net.eval(), config, name
    from ..registry import create_model

    torch.manual_seed(0)  # an untrained model's pictures are the same on every run
    return create_model(model).eval(), None, f"{model} (untrained)"


def model_input_size(model, config: dict | None) -> tuple[int, int]:
    """(H, W): the run's ``img_size``, else the model's pretrained config input size."""
    from .viz import input_hw

    if config and config.get("img_size"):
        return input_hw(model, config["img_size"])
    return input_hw(model)


def normalisation(model, config: dict | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the inputs were normalised with: a run's ``data.mean``/``data.std`` (which
    `mixlab train` records), else the trainer's defaults for its data set; without a run, the
    model's pretrained_cfg, else ImageNet's."""
    from ..data.constants import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD

    if config is not None:
        data = config.get("data") or {}
        if data.get("mean") is not None and data.get("std") is not None:
            return tuple(data["mean"]), tuple(data["std"])
        if str(data.get("dataset", "")).lower().startswith("cifar"):
            return CIFAR_MEAN, CIFAR_STD
        return (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # the trainer's default for other data sets
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("mean") and cfg.get("std"):
        return tuple(cfg["mean"]), tuple(cfg["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def class_names(config: dict | None, num_classes: int, data=None) -> list[str] | None:
    """The class names of the data or the run (CIFAR-10's when the run names none), if they are
    ``num_classes`` of them; else None."""
    names = getattr(data, "classes", None) if data is not None else None
    if not names and config:
        names = config.get("classes") or (config.get("data") or {}).get("classes")
        if not names and str((config.get("data") or {}).get("dataset", "")).lower() == "cifar10":
            names = CIFAR10_CLASSES
    names = list(names) if names else None
    return names if names and len(names) == num_classes else None


def label_of(names: list[str] | None, k: int) -> str:
    return names[k] if names else f"class {k}"


def _in_chans(model) -> int:
    from .viz import stem_conv

    return getattr(model, "in_chans", None) or stem_conv(model)[1].in_channels


def read_image(path: str, size: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """An image file as uint8 (C, H, W), resized to ``size`` (H, W) with bicubic filtering."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"image not found: {p}")
    img = Image.open(p).convert("RGB" if channels == 3 else "L")
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def to_model_input(images_u8: torch.Tensor, mean, std) -> torch.Tensor:
    x = images_u8.float() / 255.0
    c = x.shape[1]
    m = torch.tensor(mean[:c] if len(mean) >= c else mean * c).view(1, c, 1, 1)
    s = torch.tensor(std[:c] if len(std) >= c else std * c).view(1, c, 1, 1)
    return (x - m) / s


def for_display(images_u8: torch.Tensor) -> list[np.ndarray]:
    out = []
    for img in images_u8:
        arr = img.permute(1, 2, 0).float().numpy() / 255.0
        out.append(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    return out


def _split_tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(split, (tuple, list)) and len(split) == 2:
        return split[0], split[1]
    if isinstance(split, dict):
        for a, b in (("images", "labels"), ("x", "y"), ("data", "targets")):
            if a in split and b in split:
                return split[a], split[b]
    for a, b in (("images", "labels"), ("x", "y"), ("data", "targets"), ("inputs", "targets")):
        if hasattr(split, a) and hasattr(split, b):
            return getattr(split, a), getattr(split, b)
    raise UsageError(f"cannot read images and labels from a data split of type {type(split).__name__}")


def load_test_split(config: dict | None, size: tuple[int, int]):
    """(uint8 images (N, C, H, W) at ``size``, int64 labels, data object) of the run's test split."""
    if config is None:
        raise UsageError("--index and --misclassified read the run's test split: give --checkpoint RUN_DIR "
                         "(with --model, use --image PATH)")
    from ..data import classification

    data = classification.load_classification_data(config)
    split = getattr(data, "test", None)
    if split is None:
        raise UsageError("the run's data has no test split")
    images, labels = _split_tensors(split)
    images, labels = torch.as_tensor(images), torch.as_tensor(labels).long()
    if tuple(images.shape[-2:]) != tuple(size):
        resized = torch.nn.functional.interpolate(images.float(), size=size, mode="bilinear", antialias=True,
                                                  align_corners=False)
        images = resized.round().clamp(0, 255).to(torch.uint8)
    return images, labels, data


def misclassified(model, images, labels, k: int, mean, std, batch: int = 256) -> list[int]:
    """Indices of the first ``k`` images the model (in eval mode) gets wrong; fewer, said on
    stderr, when there are not so many."""
    if k < 1:
        raise UsageError(f"--misclassified must be at least 1, got {k}")
    device = model_device(model)
    found: list[int] = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = to_model_input(images[start: start + batch], mean, std).to(device)
            pred = model(x).argmax(1).cpu()
            wrong = (pred != labels[start: start + batch]).nonzero().flatten() + start
            found.extend(wrong.tolist())
            if len(found) >= k:
                break
    if not found:
        raise UsageError("the model classifies every test image correctly: nothing misclassified to show")
    if len(found) < k:
        print(f"only {len(found)} misclassified test images", file=sys.stderr)
    return found[:k]


def pick_images(model, config: dict | None, image: list[str] | None = None, index: list[int] | None = None,
                misclassified_k: int | None = None, can_misclassify: bool = False):
    """The images to show: files ``image``, or (a run only) test-split ``index`` numbers or the first
    ``misclassified_k`` misclassified test images. Returns (uint8 images, normalised inputs on the
    model's device, true labels or None, source descriptions, class names or None).
    ``can_misclassify`` only says, in the error for no images, that ``--misclassified`` is an option."""
    size = model_input_size(model, config)
    mean, std = normalisation(model, config)
    chans = _in_chans(model)
    labels, data = None, None
    if image:
        images = torch.stack([read_image(p, size, chans) for p in image])
        sources = [f"{Path(p).parent.name}/{Path(p).name}" if Path(p).parent.name else Path(p).name
                   for p in image]
    elif index is not None or misclassified_k is not None:
        all_images, all_labels, data = load_test_split(config, size)
        if index is not None:
            bad = [i for i in index if not 0 <= i < len(all_images)]
            if bad:
                raise UsageError(f"--index {bad[0]} is out of range: the test split has {len(all_images)} images")
            idx = list(index)
        else:
            idx = misclassified(model, all_images, all_labels, misclassified_k, mean, std)
        images, labels = all_images[idx], all_labels[idx]
        sources = [f"test #{i}" for i in idx]
    else:
        raise UsageError("give images: --image PATH, or with --checkpoint --index N"
                         + (" or --misclassified K" if can_misclassify else ""))
    names = class_names(config, getattr(model, "num_classes", 0), data)
    if labels is None and names and image:
        # an image-folder path (.../cat/0001.jpg) names its class
        found = [names.index(Path(p).parent.name) if Path(p).parent.name in names else -1 for p in image]
        if all(k >= 0 for k in found):
            labels = torch.tensor(found)
    return images, to_model_input(images, mean, std).to(model_device(model)), labels, sources, names
