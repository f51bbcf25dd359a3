"""Counting, timing and looking inside models."""
