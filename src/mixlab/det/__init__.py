"""Instance segmentation: Mask R-CNN on mixlab and timm backbones (`mixlab det`)."""
from __future__ import annotations

from ..errors import UsageError


def require_det_packages() -> None:
    """Raise a one-line error naming what to install when `mixlab det`'s packages are missing
    (pycocotools: COCO annotations and COCOeval; scipy: connected components of mask folders)."""
    import importlib.util

    missing = [p for p in ("pycocotools", "scipy") if importlib.util.find_spec(p) is None]
    if missing:
        raise UsageError(f"`mixlab det` needs {' and '.join(missing)}: pip install 'mixlab[det]' "
                         f"(or pip install {' '.join(missing)})")
