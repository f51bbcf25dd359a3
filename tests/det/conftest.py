"""Fixtures: the synthetic instance set of synthetic_instances.py, written into the test's folder."""
from __future__ import annotations

from pathlib import Path

import pytest

from synthetic_instances import write_coco_folder, write_mask_folder


@pytest.fixture
def mask_folder(tmp_path) -> Path:
    return write_mask_folder(tmp_path / "masks_data")


@pytest.fixture
def coco_folder(tmp_path) -> Path:
    return write_coco_folder(tmp_path / "coco_data")
