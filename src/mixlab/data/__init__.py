"""Data sets, caches and on-device augmentation."""
